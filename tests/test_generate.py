"""Generation: greedy/beam through HF generate, EOS stopping, batching, and post-processing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vicap.decoders import load_decoder
from vicap.generate import generate_captions, generate_ids, postprocess
from vicap.model import CaptionModel
from vicap.recipe import DecoderConfig, GenerateConfig, MapperConfig

MAX_NEW = 6


@pytest.fixture(scope="module")
def model(tiny_lm_dir: Path) -> CaptionModel:
    torch.manual_seed(0)
    decoder = load_decoder(DecoderConfig(model=str(tiny_lm_dir)))
    return CaptionModel(MapperConfig(prefix_length=2), 24, decoder, "frozen").eval()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(5, 24, generator=torch.Generator().manual_seed(0)) * 3


def _cfg(**kw) -> GenerateConfig:
    return GenerateConfig(**{"max_new_tokens": MAX_NEW, **kw})


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
    try:
        yield
    finally:
        handle.remove()


def _manual_greedy(model: CaptionModel, feats: torch.Tensor) -> list[list[int]]:
    """Argmax decoding with full forward passes and no cache: what generate must agree with."""
    eos, out = model.decoder.eos_token_id, []
    with torch.no_grad():
        for f in feats:
            embeds, ids = model.prefix(f[None]), []
            for _ in range(MAX_NEW):
                token = int(model.lm(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == eos:
                    break
                ids.append(token)
                embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
            out.append(ids)
    return out


def test_greedy_matches_a_manual_decoding_loop(model, features) -> None:
    ids = generate_ids(model, features, _cfg(strategy="greedy"))
    assert ids == _manual_greedy(model, features)
    assert len({tuple(i) for i in ids}) > 1  # the prefix matters: images get different captions


def test_greedy_equals_beam_of_one(model, features) -> None:
    greedy = generate_ids(model, features, _cfg(strategy="greedy"))
    beam1 = generate_ids(model, features, _cfg(strategy="beam", beam_size=1))
    assert greedy == beam1
    caps = generate_captions(model, features, _cfg(strategy="greedy"), language="vi")
    assert caps == generate_captions(model, features, _cfg(strategy="beam", beam_size=1), language="vi")


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_returned_ids_never_hold_eos(model, features, strategy: str) -> None:
    eos = model.decoder.eos_token_id
    ids = generate_ids(model, features, _cfg(strategy=strategy, beam_size=3))
    assert len(ids) == 5
    for row in ids:
        assert eos not in row and len(row) <= MAX_NEW


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_eos_first_gives_an_empty_caption(model, features, strategy: str) -> None:
    eos = model.decoder.eos_token_id
    with forced_logits(model, lambda call, row: eos):
        ids = generate_ids(model, features, _cfg(strategy=strategy, beam_size=3))
        caps = generate_captions(model, features, _cfg(strategy=strategy, beam_size=3), language="vi")
    assert ids == [[]] * 5
    assert caps == [""] * 5


def test_each_row_stops_at_its_own_eos(model, features) -> None:
    tok = model.decoder.tokenizer
    a, b = tok.convert_tokens_to_ids(["a", "b"]) if "a" in tok.get_vocab() else (10, 11)
    eos = model.decoder.eos_token_id
    # Row 0 says "a" then EOS; row 1 says "a b" then EOS; after EOS generate pads with pad (= EOS here).
    plans = {0: [a, eos], 1: [a, b, eos]}

    def plan(call: int, row: int):
        steps = plans[row]
        return steps[min(call, len(steps) - 1)]

    with forced_logits(model, plan):
        ids = generate_ids(model, features[:2], _cfg(strategy="greedy"))
    assert ids == [[a], [a, b]]


def test_small_batches_give_the_same_captions(model, features) -> None:
    for strategy in ("greedy", "beam"):
        one = generate_captions(
            model, features, _cfg(strategy=strategy, beam_size=2, batch_size=32), language="vi"
        )
        two = generate_captions(
            model, features, _cfg(strategy=strategy, beam_size=2, batch_size=2), language="vi"
        )
        assert len(one) == 5 and one == two


@pytest.mark.parametrize(
    ("text", "segment", "expected"),
    [
        ("đàn_ông đang đi_bộ .", "word", "đàn ông đang đi bộ."),
        ("  một   con_mèo  ", "word", "một con mèo"),
        ("đàn_ông đi", "none", "đàn_ông đi"),  # not segmented: underscores are the LM's own text
        ("  hai   con chó ", "none", "hai con chó"),
    ],
)
def test_postprocess(text: str, segment: str, expected: str) -> None:
    assert postprocess(text, "vi", segment) == expected
