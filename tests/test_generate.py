"""Generation on tiny GPT-2 and Llama LMs: every decoding mode against a slow or independent reference,
stopping rules, scores, seeded sampling, and per-language post-processing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import vicap.generate
from tests.conftest import tiny_llama_config
from vicap.decoders import Decoder, load_decoder
from vicap.generate import (
    decode_batch,
    generate,
    generate_captions,
    generate_ids,
    postprocess,
    trim_fragment,
)
from vicap.mappers import MAPPERS
from vicap.model import CaptionModel
from vicap.recipe import DecoderConfig, GenerateConfig, MapperConfig

MAX_NEW = 6
ENCODER_DIM = 24


@pytest.fixture(scope="module")
def gpt2_decoder(tiny_lm_dir: Path) -> Decoder:
    return load_decoder(DecoderConfig(model=str(tiny_lm_dir)))


def _llama_decoder(tokenizer, eos: int) -> Decoder:
    """A tiny Llama (rotary positions, grouped KV heads, a BOS fed after the prefix) built in memory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(len(tokenizer), eos=eos, layers=2)).eval()
    return Decoder(
        lm=lm, tokenizer=tokenizer, hidden_size=32, eos_token_id=eos, pad_token_id=eos, prompt_ids=[1]
    )


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, gpt2_decoder: Decoder) -> CaptionModel:
    if request.param == "gpt2":
        decoder = gpt2_decoder
    else:
        decoder = _llama_decoder(gpt2_decoder.tokenizer, gpt2_decoder.eos_token_id)
    torch.manual_seed(0)
    return CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, decoder, "frozen").eval()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(5, ENCODER_DIM, generator=torch.Generator().manual_seed(0)) * 3


def _cfg(**kw) -> GenerateConfig:
    return GenerateConfig(**{"max_new_tokens": MAX_NEW, **kw})


def _beams(strategy: str, n: int = 3) -> dict:
    """strategy, with beam_size = n when it is beam search (other strategies refuse a beam_size)."""
    return {"strategy": strategy, **({"beam_size": n} if strategy == "beam" else {})}


@contextmanager
def forced_logits(model: CaptionModel, plan) -> Iterator[None]:
    """Make the LM emit plan(call, row) (a token id, or None to leave the row alone) at each step."""
    calls = [0]

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        for row in range(logits.shape[0]):
            token = plan(calls[0], row)
            if token is not None:
                logits[row, -1, token] += 1e4
        calls[0] += 1
        return logits

    handle = model.lm.get_output_embeddings().register_forward_hook(hook)
    try:  # (callers pass share_prefix=False: one LM call per step, no prefix-cache call to count)
        yield
    finally:
        handle.remove()


def _forced_path(model: CaptionModel, text: str) -> list[int]:
    return model.decoder.tokenizer(text, add_special_tokens=False)["input_ids"]


def _follow(ids: list[int], then: int | None):
    return lambda call, row: ids[call] if call < len(ids) else then


def _manual_greedy(model: CaptionModel, feats: torch.Tensor, max_new: int = MAX_NEW) -> list[list[int]]:
    """Argmax decoding with full forward passes and no cache: what generate must agree with."""
    eos, out = model.decoder.eos_token_id, []
    with torch.no_grad():
        for f in feats:
            embeds, ids = model.prefix(f[None]), []
            for _ in range(max_new):
                token = int(model.lm(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == eos:
                    break
                ids.append(token)
                embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
            out.append(ids)
    return out


def _repeats(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


# --------------------------------------------------------------------------- correctness of each mode


def test_greedy_matches_a_manual_decoding_loop(model, features) -> None:
    ids = generate_ids(model, features, _cfg(strategy="greedy"))
    assert ids == _manual_greedy(model, features)
    assert len({tuple(i) for i in ids}) > 1  # the prefix matters: images get different captions


@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="greedy"),
        dict(strategy="beam", beam_size=4, n_best=3),
        dict(strategy="sample", top_k=20, temperature=1.5, n_best=2, seed=3),
        dict(strategy="greedy", repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3),
    ],
    ids=["greedy", "beam", "sample", "processors"],
)
def test_kv_cached_output_equals_uncached(model, features, cfg) -> None:
    cfg = _cfg(**cfg)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        results.append(decode_batch(model, features, cfg, use_cache=use_cache))
    cached, uncached = results
    assert [[h.ids for h in hs] for hs in cached] == [[h.ids for h in hs] for hs in uncached]
    for a, b in zip(cached, uncached, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [dict(strategy="beam", beam_size=4, n_best=2), dict(strategy="sample", n_best=3, seed=5)],
    ids=["beam", "sample"],
)
def test_prefix_computed_once_per_image_changes_nothing(model, features, cfg, monkeypatch) -> None:
    cfg = _cfg(**cfg)
    torch.manual_seed(0)
    shared = decode_batch(model, features, cfg)
    torch.manual_seed(0)
    plain = decode_batch(model, features, cfg, share_prefix=False)
    assert [[h.ids for h in hs] for hs in shared] == [[h.ids for h in hs] for hs in plain]
    for a, b in zip(shared, plain, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_greedy_equals_beam_of_one(model, features) -> None:
    greedy = decode_batch(model, features, _cfg(strategy="greedy"))
    beam1 = decode_batch(model, features, _cfg(strategy="beam", beam_size=1, length_penalty=0.0))
    assert [h[0].ids for h in greedy] == [h[0].ids for h in beam1]
    # with length_penalty 0 the beam score is the plain sum of log-probs, as greedy's is
    assert [h[0].score for h in greedy] == pytest.approx([h[0].score for h in beam1], abs=1e-5)
    caps = generate_captions(model, features, _cfg(strategy="greedy"), language="vi")
    assert caps == generate_captions(model, features, _cfg(strategy="beam", beam_size=1), language="vi")


def test_top_k_one_and_tiny_top_p_sample_the_greedy_caption(model, features) -> None:
    greedy = generate_ids(model, features, _cfg(strategy="greedy"))
    assert generate_ids(model, features, _cfg(strategy="sample", top_k=1)) == greedy
    assert generate_ids(model, features, _cfg(strategy="sample", top_p=1e-6)) == greedy


def test_beam_n_best_sorted_and_scored_as_generate_scores_them(model, features) -> None:
    cfg = _cfg(strategy="beam", beam_size=4, n_best=3, length_penalty=0.7)
    nbest = decode_batch(model, features, cfg)
    assert [len(h) for h in nbest] == [3] * 5
    for hyps in nbest:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.ids) for h in hyps}) == 3
    # Same scores as generate's own (which needs the memory-hungry output_scores=True)
    prefix = model.prefix(features)
    with torch.no_grad():
        ref = model.lm.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            max_new_tokens=MAX_NEW,
            num_beams=4,
            num_return_sequences=3,
            length_penalty=0.7,
            eos_token_id=model.decoder.eos_token_id,
            pad_token_id=model.decoder.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
    ours = [h.score for hyps in nbest for h in hyps]
    assert ours == pytest.approx(ref.sequences_scores.tolist(), abs=1e-5)


def test_greedy_and_sample_scores_are_the_lms_log_probs(model, features) -> None:
    """Greedy: generate's own transition scores. Sampling: the LM's log-probs before temperature / top-k
    (a sampled caption is scored by how likely the LM finds it, not by the sampling knobs)."""
    for cfg in (_cfg(strategy="greedy"), _cfg(strategy="sample", temperature=0.8, top_k=30, seed=1)):
        prefix = model.prefix(features)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            with torch.no_grad():
                ref = model.lm.generate(
                    inputs_embeds=prefix,
                    attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                    max_new_tokens=MAX_NEW,
                    do_sample=cfg.strategy == "sample",
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,  # 0 = off (generate's own default is 50)
                    eos_token_id=model.decoder.eos_token_id,
                    pad_token_id=model.decoder.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
        logp = torch.stack(ref.logits, dim=1).log_softmax(-1)  # (rows, steps, vocab), raw LM logits
        steps = logp.gather(2, ref.sequences[:, :, None]).squeeze(2)
        caps = generate(model, features, cfg, language="vi")
        for row, (seq, cap) in enumerate(zip(ref.sequences.tolist(), caps, strict=True)):
            n = len(cap[0].token_ids) + (1 if cap[0].finished else 0)
            assert list(cap[0].token_ids) == seq[: len(cap[0].token_ids)]
            assert cap[0].score == pytest.approx(float(steps[row, :n].sum()), abs=1e-4)


def test_seeded_sampling_is_reproducible(model, features) -> None:
    cfg = _cfg(strategy="sample", temperature=2.0, n_best=3, seed=7)
    state = torch.get_rng_state()
    a = generate(model, features, cfg, language="vi")
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    assert a == generate(model, features, cfg, language="vi")
    b = generate(model, features, _cfg(strategy="sample", temperature=2.0, n_best=3, seed=8), language="vi")
    assert [[c.token_ids for c in caps] for caps in a] != [[c.token_ids for c in caps] for caps in b]
    for caps in a:
        assert len(caps) == 3 and [c.score for c in caps] == sorted((c.score for c in caps), reverse=True)


@pytest.mark.parametrize(
    ("strategy", "mapper"), [("greedy", name) for name in MAPPERS.names()] + [("beam", "mlp")]
)
def test_every_mapper_and_lm_tuning_generates(gpt2_decoder, strategy: str, mapper: str) -> None:
    torch.manual_seed(0)
    m = CaptionModel(MapperConfig(type=mapper, prefix_length=2), ENCODER_DIM, gpt2_decoder, "full").eval()
    uses_tokens = getattr(m.mapper, "uses_tokens", False)
    feats = torch.randn(3, 5, ENCODER_DIM) if uses_tokens else torch.randn(3, ENCODER_DIM)
    caps = generate(m, feats, _cfg(**_beams(strategy, 2)), language="vi")
    assert len(caps) == 3 and all(len(c) == 1 and isinstance(c[0].text, str) for c in caps)


def test_lora_wrapped_lm_generates(tiny_lm_dir: Path, features) -> None:
    pytest.importorskip("peft")
    dcfg = DecoderConfig(model=str(tiny_lm_dir), tuning="lora")
    torch.manual_seed(0)
    m = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, load_decoder(dcfg), "lora", lora=dcfg).eval()
    ids = generate_ids(m, features, _cfg(strategy="greedy"))
    assert ids == _manual_greedy(m, features)


# --------------------------------------------------------------------------- stopping and length rules


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_returned_ids_never_hold_eos(model, features, strategy: str) -> None:
    eos = model.decoder.eos_token_id
    for hyps in decode_batch(model, features, _cfg(**_beams(strategy))):
        for h in hyps:
            assert eos not in h.ids and len(h.ids) <= MAX_NEW


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_eos_first_gives_an_empty_finished_caption(model, features, strategy: str) -> None:
    eos = model.decoder.eos_token_id
    with forced_logits(model, lambda call, row: eos):
        caps = generate(model, features, _cfg(**_beams(strategy)), language="vi", share_prefix=False)
    assert [(c[0].text, c[0].token_ids, c[0].finished) for c in caps] == [("", (), True)] * 5
    assert all(c[0].score > -1e-3 for c in caps)  # log p(EOS) ~ 0 when EOS is forced


def test_each_row_stops_at_its_own_eos(model, features) -> None:
    a, b = _forced_path(model, " hai")[0], _forced_path(model, ".")[0]
    eos = model.decoder.eos_token_id
    plans = {0: [a, eos], 1: [a, b, eos]}

    def plan(call: int, row: int):
        steps = plans[row]
        return steps[min(call, len(steps) - 1)]

    with forced_logits(model, plan):
        hyps = decode_batch(model, features[:2], _cfg(strategy="greedy"), share_prefix=False)
    assert [h[0].ids for h in hyps] == [[a], [a, b]]
    assert [h[0].finished for h in hyps] == [True, True]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_every_eos_the_lm_declares_ends_a_caption(model, features, strategy: str, monkeypatch) -> None:
    """Gemma's <end_of_turn> or an instruct model's end of message stops a caption like the EOS it was
    trained to end with: the row stops there, finished, without the token."""
    a, b = _forced_path(model, " hai")[0], _forced_path(model, ".")[0]
    eos = model.decoder.eos_token_id
    monkeypatch.setattr(model, "decoder", dataclasses.replace(model.decoder, stop_ids=(b,)))
    assert model.decoder.stop_ids == (eos, b)
    plans = {0: [a, b], 1: [a, a, eos]}
    rows = 3 if strategy == "beam" else 1  # per image

    def plan(call: int, row: int):
        steps = plans[row // rows]
        return steps[min(call, len(steps) - 1)]

    with forced_logits(model, plan):
        hyps = decode_batch(model, features[:2], _cfg(**_beams(strategy)), share_prefix=False)
    assert [(h[0].ids, h[0].finished) for h in hyps] == [([a], True), ([a, a], True)]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_min_new_tokens_holds_eos_back(model, features, strategy: str) -> None:
    eos = model.decoder.eos_token_id
    with forced_logits(model, lambda call, row: eos):
        hyps = decode_batch(
            model, features, _cfg(**_beams(strategy, 2), min_new_tokens=3), share_prefix=False
        )
    assert [len(h[0].ids) for h in hyps] == [3] * 5
    assert all(h[0].finished for h in hyps)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("n", [1, 2])
def test_no_repeat_ngram_size(model, features, strategy: str, n: int) -> None:
    plain = generate_ids(model, features, _cfg(strategy="greedy", max_new_tokens=10))
    assert any(_repeats(ids, n) for ids in plain)  # the tiny random LM loves repeating itself
    cfg = _cfg(**_beams(strategy, 3), max_new_tokens=10, no_repeat_ngram_size=n)
    for ids in generate_ids(model, features, cfg):
        assert not _repeats(ids, n), ids


def test_repetition_penalty_discourages_repeats(model, features) -> None:
    def repeated(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    plain = generate_ids(model, features, _cfg(strategy="greedy", max_new_tokens=10))
    penalized = generate_ids(
        model, features, _cfg(strategy="greedy", max_new_tokens=10, repetition_penalty=50.0)
    )
    assert sum(map(repeated, penalized)) < sum(map(repeated, plain))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_stop_string_ends_the_caption(model, features, strategy: str) -> None:
    path = _forced_path(model, " một con chó. hai con")
    with forced_logits(model, _follow(path, None)):
        caps = generate(
            model,
            features[:2],
            _cfg(**_beams(strategy, 2), max_new_tokens=20, stop="."),
            language="vi",
            share_prefix=False,
        )
    dot = path.index(_forced_path(model, ".")[0])
    for c in caps:
        assert c[0].text == "Một con chó." and c[0].finished
        assert list(c[0].token_ids) == path[: dot + 1]
        assert c[0].score > -1e-3  # forced tokens only: the padding after the stop is not scored


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_caption_cut_by_the_length_limit_loses_its_fragment(model, features, strategy: str) -> None:
    path = _forced_path(model, " một con chó. hai con")
    with forced_logits(model, _follow(path, None)):
        caps = generate(
            model,
            features[:2],
            _cfg(**_beams(strategy, 2), max_new_tokens=len(path)),
            language="vi",
            share_prefix=False,
        )
    for c in caps:
        assert list(c[0].token_ids) == path and not c[0].finished
        assert c[0].text == "Một con chó."


def test_small_batches_give_the_same_captions(model, features) -> None:
    for strategy in ("greedy", "beam"):
        one = generate_captions(model, features, _cfg(**_beams(strategy, 2), batch_size=32), language="vi")
        two = generate_captions(model, features, _cfg(**_beams(strategy, 2), batch_size=2), language="vi")
        assert len(one) == 5 and one == two


@pytest.mark.parametrize(("strategy", "n_best"), [("greedy", 1), ("beam", 3), ("sample", 2)])
def test_a_large_vocabulary_decodes_in_parts_with_the_same_results(
    model, features, monkeypatch, strategy: str, n_best: int
) -> None:
    """A batch whose (rows, vocabulary) matrices exceed the budget goes to generate in equal parts of at
    most images_per_call images; hypotheses and scores are those of one call."""
    cfg = _cfg(**_beams(strategy), n_best=n_best)
    whole = decode_batch(model, features, cfg)
    vocab = model.lm.get_input_embeddings().num_embeddings
    monkeypatch.setattr(vicap.generate, "LOGITS_BUDGET", 2 * 3 * vocab)  # 2 images of 3 rows
    calls = []
    real = model.lm.generate
    monkeypatch.setattr(
        model.lm, "generate", lambda **kw: calls.append(kw["inputs_embeds"].shape[0]) or real(**kw)
    )
    parts = decode_batch(model, features, cfg)
    # images per call: beam 6 // 3 rows = 2, sample 6 // 2 = 3, greedy 6 // 1 = 6 (all 5 at once)
    assert calls == {"beam": [2, 2, 1], "sample": [3, 2], "greedy": [5]}[strategy]
    if strategy == "sample":  # the generator runs on through the parts: other draws, as many of them
        assert [len(h) for h in parts] == [n_best] * 5
        return
    assert [[(h.ids, h.finished) for h in hyps] for hyps in parts] == [
        [(h.ids, h.finished) for h in hyps] for hyps in whole
    ]
    torch.testing.assert_close(
        torch.tensor([[h.score for h in hyps] for hyps in parts]),
        torch.tensor([[h.score for h in hyps] for hyps in whole]),
    )


# --------------------------------------------------------------------------- config and post-processing


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(strategy="nucleus"), "generate.strategy"),
        (dict(strategy="beam", beam_size=3, n_best=4), "generate.n_best = 4: beam search returns at most"),
        (dict(strategy="greedy", n_best=2), "generate.n_best"),
        (dict(temperature=0.0), "generate.temperature"),
        (dict(top_p=0.0), "generate.top_p"),
        (dict(top_k=-1), "generate.top_k"),
        (dict(max_new_tokens=5, min_new_tokens=6), "generate.min_new_tokens"),
        (dict(repetition_penalty=0.0), "generate.repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "generate.no_repeat_ngram_size"),
    ],
)
def test_generate_config_rejects_bad_values(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerateConfig(**kw)


@pytest.mark.parametrize(
    ("text", "language", "segment", "truncated", "expected"),
    [
        # word segmentation undone, punctuation spacing, first letter capitalized
        ("đàn_ông đang đi_bộ .", "vi", "word", False, "Đàn ông đang đi bộ."),
        ("  một   con_mèo  ", "vi", "word", False, "Một con mèo"),
        ("đàn_ông đi", "vi", "none", False, "Đàn_ông đi"),  # not segmented: underscores are the LM's text
        ("  hai   con chó ,nằm trên ghế .", "vi", "none", False, "Hai con chó, nằm trên ghế."),
        ("ồ ! một con mèo ?", "vi", "none", False, "Ồ! một con mèo?"),
        ("a dog runs .", "en", "none", False, "A dog runs."),
        ('"a dog" runs', "en", "none", False, '"A dog" runs'),
        # languages without a case policy keep the LM's case; generic keeps French spacing
        ("un chien court !", "fr", "none", False, "un chien court !"),
        # length-limited captions: back to the last sentence end, else drop the cut word
        ("a dog runs . the cat", "en", "none", True, "A dog runs."),
        ("a dog on the gra", "en", "none", True, "A dog on the"),
        ("a dog , a", "en", "none", True, "A dog"),
        ("a dog runs.", "en", "none", True, "A dog runs."),
        ("một con chó đang nằm_trên", "vi", "word", True, "Một con chó đang"),
        ("xin", "vi", "none", True, "Xin"),
        ("", "vi", "none", True, ""),
    ],
)
def test_postprocess(text: str, language: str, segment: str, truncated: bool, expected: str) -> None:
    assert postprocess(text, language, segment, truncated=truncated) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b. c d", "a b."),
        ("a b! c? d e", "a b! c?"),
        ("giá 2.5 triệu đồng", "giá 2.5 triệu"),  # a decimal point is not a sentence end
        ("a b c…", "a b c…"),
        ("one", "one"),
    ],
)
def test_trim_fragment(text: str, expected: str) -> None:
    assert trim_fragment(text) == expected


@pytest.mark.parametrize(
    ("case", "capitalize_first", "text", "expected"),
    [
        ("entry capitalizes", True, "  élan vital !", "Élan vital !"),
        ("entry capitalizes the first letter, not the first character", True, '"ồ" con mèo', '"Ồ" con mèo'),
        ("entry keeps the LM's case", False, "élan vital !", "élan vital !"),
        ("the default keeps the LM's case", None, "élan vital !", "élan vital !"),
    ],
)
def test_postprocess_capitalizes_as_the_language_entry_says(
    monkeypatch, case: str, capitalize_first: bool | None, text: str, expected: str
) -> None:
    from data_prep.languages import LANGUAGES, Language

    kw = {} if capitalize_first is None else {"capitalize_first": capitalize_first}
    monkeypatch.setitem(LANGUAGES, "xx", Language(code="xx", name="test language", **kw))
    assert postprocess(text, "xx") == expected, case


def test_capitalization_of_the_shipped_language_entries() -> None:
    from data_prep.languages import get_language

    # vi and en captions start with a capital; the generic entry and the fallback for any other code don't
    assert {code: get_language(code).capitalize_first for code in ("vi", "en", "generic", "fr")} == {
        "vi": True,
        "en": True,
        "generic": False,
        "fr": False,
    }
