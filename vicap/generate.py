"""Caption generation from image features, driven through Hugging Face `generate(inputs_embeds=...)`.

`generate` brings the KV cache, batched greedy / beam search / sampling, EOS and stop-string stopping,
min length, repetition penalty and no-repeat n-grams for any causal LM (GPT-2, Llama, ... and peft
LoRA wrappers), so vicap keeps no decoding loop of its own. Each option was checked with
`inputs_embeds` on GPT-2 and Llama (tests/test_generate.py); with embeddings as the prompt, generate
applies the repetition penalty and n-gram rule to the caption's own tokens only, which is what a
caption wants (the prefix has no token ids), so its warnings about that are silenced here.

What vicap adds around it:

- **Scores without the score matrices.** `output_scores=True` keeps a (rows, vocab) float matrix per
  step: measured +620 MB peak RSS at batch 32, beam 5, 20 tokens, GPT-2's 50k vocabulary (1.68 ->
  2.31 GB). A small logits processor (`_TokenLogProbs`) appended after generate's own ones sees the
  same scores and keeps only what is needed to give each chosen token its log-prob (greedy/sample:
  one row of log-probs at a time; beam: each row's top 2 * beam_size log-probs per step, which always
  holds the chosen token, see `_beam_scores`).
- **Large vocabularies in parts.** Nothing of a step's (rows, vocab) scores outlives the step, so peak
  memory does not grow with caption length; it grows with rows x vocab, the matrices generate keeps
  alive within a step. A batch whose matrices would exceed LOGITS_BUDGET floats is decoded in equal
  parts (`images_per_call`): the same greedy and beam captions and scores (sampling stays seeded and
  reproducible, with other draws). Measured with bench/beam_memory.py (Gemma 3's 262,144 tokens, 32
  images, beam 5, 30 tokens, `/usr/bin/time -v`): peak RSS 1,148 MB in one call (1,146 MB at 5
  tokens), 820 MB in two calls of 16 (decoding's share 698 -> 377 MB; 9.7 -> 11.6 s on a shared CPU).
- **What a score is.** Beam search: generate's own beam score, the sum of the token log-probs /
  length ** length_penalty, where length counts the EOS (or the stop token). Greedy and sampling: the
  sum of the token log-probs, EOS included when emitted. Log-probs are those of the LM's distribution
  after generate's repetition-penalty, n-gram and min-length rules but before sampling's temperature,
  top-k and top-p (generate applies those after any caller's processor), so a sample is scored by how
  likely the LM finds it, not by the sampling knobs; for greedy this is what
  `compute_transition_scores(..., normalize_logits=True)` gives. n-best lists are sorted by score.
- **Post-processing per language** (`postprocess`): a caption cut by `max_new_tokens` loses its
  trailing fragment, word segmentation is undone, the language's normalizer tidies whitespace and
  punctuation, and the language entry's `capitalize_first` capitalizes the first letter.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from data_prep.languages import get_language
from vicap.model import CaptionModel, cache_name
from vicap.recipe import GenerateConfig

# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Caption:
    """One generated caption."""

    text: str  # display text (post-processed)
    score: float  # beam: length-penalized beam score; greedy/sample: sum of token log-probs
    token_ids: tuple[int, ...]  # the LM's tokens, EOS removed
    finished: bool  # ended by EOS or the stop string; False: cut by max_new_tokens


@dataclass(frozen=True)
class _Hyp:
    ids: list[int]
    score: float
    finished: bool
    end: int | None = None  # the stop token that ended it (dropped from ids); None: none, or a stop string


# ---------------------------------------------------------------------------------------- post-processing

_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)")
_DANGLING = ",;:-–—(/"


def trim_fragment(text: str) -> str:
    """Cut the tail of a caption that the length limit stopped mid-way.

    The rule: a text that ends with . ! ? or … is complete and kept. Otherwise, when an earlier
    sentence ends inside it, everything after the last sentence end goes ("A dog runs. The" -> "A dog
    runs."). Otherwise the last word goes, since the limit may have cut it inside a word (BPE tokens are
    word pieces; a Vietnamese syllable can be two tokens), along with any comma or colon left dangling
    ("a dog on the gra" -> "a dog on the"). A one-word text is kept as it is.
    """
    text = text.rstrip()
    if not text or text[-1] in ".!?…":
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends:
        return text[: ends[-1]]
    words = text.split()
    if len(words) < 2:
        return text
    return " ".join(words[:-1]).rstrip(_DANGLING + " ")


def _capitalize_first(text: str) -> str:
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1 :]
    return text


def postprocess(text: str, language: str, segment: str = "none", *, truncated: bool = False) -> str:
    """LM output -> display text.

    In order: the trailing fragment of a `truncated` caption (one the length limit stopped) is trimmed
    (`trim_fragment`; on the LM's text, so a segmented word like 'đi_bộ' goes whole); word segmentation
    is undone ('đàn_ông' -> 'đàn ông') when the LM was trained on segmented text; the language's
    normalizer tidies whitespace and punctuation (Vietnamese/English: no space before . , ! ? ; :);
    captions of a language whose entry sets `capitalize_first` (vi, en) start with a capital letter;
    others keep the LM's own case.
    """
    lang = get_language(language)
    text = text.strip()
    if truncated:
        text = trim_fragment(text)
    text = lang.desegment(text) if segment != "none" else lang.normalize(text)
    if lang.capitalize_first:
        text = _capitalize_first(text)
    return text


# ---------------------------------------------------------------------------------------- decoding


class _TokenLogProbs(LogitsProcessor):
    """Appended after generate's own processors (before sampling's warpers, which generate adds last).

    Greedy/sample rows never reorder, and the token picked at step t is `input_ids[:, -1]` at step
    t + 1, so one (rows, vocab) matrix is kept at a time. Beam rows do reorder; each step keeps every
    row's top 2 * beams log-probs, which `_beam_scores` reads back along generate's `beam_indices`.
    """

    def __init__(self, beams: int) -> None:
        self.beams = beams
        self.picked: list[torch.Tensor] = []  # greedy/sample: (rows,) log-prob of each step's token
        self.last: torch.Tensor | None = None
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # beam: per step (values, indices)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.beams == 1:
            if self.last is not None:
                self.picked.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
            self.last = torch.log_softmax(scores.float(), dim=-1)
        else:  # beam search hands processors log-probs already
            values, indices = scores.float().topk(2 * self.beams, dim=-1)
            self.top.append((values, indices))
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-prob of every generated token (greedy/sample)."""
        assert self.last is not None
        last = self.last.gather(1, sequences[:, -1:].to(self.last.device)).squeeze(1)
        return torch.stack([*self.picked, last], dim=1).cpu()


def _beam_scores(
    rec: _TokenLogProbs, sequences: torch.Tensor, beam_indices: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs of returned beams, added in generate's order (so they equal its beam scores).

    A token picked from row r at step t is within row r's top 2 * beams log-probs: generate keeps the
    2 * beams best (row, token) pairs over all rows, so fewer than 2 * beams tokens of row r beat it.
    With ties at the cut it may be missing from the stored top-k, but then its log-prob equals the
    smallest stored value, which is what is used.
    """
    n, steps = sequences.shape[0], int(lengths.max()) if lengths.numel() else 0
    total = torch.zeros(n)
    for t in range(steps):
        values, indices = rec.top[t]
        rows = beam_indices[:, t].clamp(min=0).long().to(values.device)
        vals, idx = values[rows], indices[rows]  # (n, 2k)
        match = idx == sequences[:, t : t + 1].to(idx.device)
        lp = torch.where(match, vals, torch.full_like(vals, -torch.inf)).max(dim=1).values
        lp = torch.where(match.any(dim=1), lp, vals[:, -1]).cpu()
        total = torch.where(t < lengths, total + lp, total)
    return total


def _stop_length(ids: list[int], stop: str, tokenizer) -> int | None:
    """Tokens up to and including the one that completes `stop` (as generate's stop-string rule), or None."""
    if stop not in tokenizer.decode(ids, skip_special_tokens=True):
        return None
    for n in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:n], skip_special_tokens=True):
            return n
    return None


def generate_kwargs(cfg: GenerateConfig, model: CaptionModel) -> dict:
    """The `generate` arguments for a GenerateConfig. Everything is passed explicitly, so an LM's own
    generation_config.json (sampling defaults, say) does not leak into captioning."""
    dec = model.decoder
    kw: dict = {
        "max_new_tokens": cfg.max_new_tokens,
        "min_new_tokens": cfg.min_new_tokens,
        "eos_token_id": list(dec.stop_ids),
        "pad_token_id": dec.pad_token_id,
        "repetition_penalty": cfg.repetition_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
        "num_return_sequences": cfg.n_best,
        "num_beams": cfg.beam_size if cfg.strategy == "beam" else 1,
        "do_sample": cfg.strategy == "sample",
        "use_cache": True,
    }
    if cfg.strategy == "sample":  # top_k = 0 is off (generate's own default is 50)
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.strategy == "beam":
        kw.update(length_penalty=cfg.length_penalty, early_stopping=False)
    if cfg.stop:
        kw.update(stop_strings=[cfg.stop], tokenizer=dec.tokenizer)
    return kw


def _prefix_cache(model: CaptionModel, prefix: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of all but the last prefix position, computed once per image and copied `copies` times.

    generate expands its inputs to one row per beam (or per sample) before the first forward pass, so
    each image's prefix would go through the LM beam_size times. Given a cache and the full
    inputs_embeds, generate feeds only the positions past the cache. Measured on a GPT-2-small-shaped LM,
    prefix 10, beam 5, 32 images, 20 tokens, 2 CPU cores: 7.8 -> 6.2 s (best of 2), the same captions.
    None when the LM's cache cannot be copied that way (generate then prefills every row itself).
    """
    kw = {"logits_to_keep": 1} if _takes(model.lm.forward, "logits_to_keep") else {}
    out = model.lm(inputs_embeds=prefix[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **kw)
    cache = getattr(out, cache_name(), None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(copies)
    return cache


def _takes(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# Each decoding step handles (rows, vocabulary) float32 matrices, several alive at once inside generate
# (the logits, their log-softmax, the processors' output, beam search's running sums), with rows =
# images x beams (or x n_best). A batch whose matrices would exceed this many floats is decoded in equal
# parts, one after the other: 2**25 floats = 128 MiB. GPT-2 (50,257 tokens) decodes 32 images x 5
# beams in one call (8 M floats); Gemma 3 (262,144 tokens) in two of 16 (21 M floats each). Rows never
# interact in generate, so greedy and beam captions are the same (tests/test_generate.py).
LOGITS_BUDGET = 2**25


def images_per_call(model: CaptionModel, cfg: GenerateConfig) -> int:
    """How many images one generate call decodes at most, by LOGITS_BUDGET."""
    rows = cfg.beam_size if cfg.strategy == "beam" else cfg.n_best
    vocab = model.lm.get_input_embeddings().num_embeddings
    return max(1, LOGITS_BUDGET // (rows * vocab))


@torch.no_grad()
def decode_batch(
    model: CaptionModel, features: torch.Tensor, cfg: GenerateConfig, *, share_prefix: bool = True, **extra
) -> list[list[_Hyp]]:
    """One batch of features -> per image, cfg.n_best hypotheses (token ids without EOS), best first.

    `share_prefix` computes each image's prefix once and copies its KV cache to the image's beams or
    samples (see `_prefix_cache`); False lets generate prefill every row itself (same captions; tests
    and the benchmark compare the two). `extra` goes to `generate` as is (tests pass use_cache=False to
    compare with the cache off).
    """
    model.check_length("generate.max_new_tokens", cfg.max_new_tokens)  # before the LM fails mid-way
    per_call = images_per_call(model, cfg)
    if features.shape[0] > per_call:  # a large vocabulary: the batch in equal parts (see LOGITS_BUDGET)
        parts = features.tensor_split(-(-features.shape[0] // per_call))
        return [
            h for part in parts for h in decode_batch(model, part, cfg, share_prefix=share_prefix, **extra)
        ]
    model.eval()
    features = features.to(next(model.parameters()).device)
    prefix = model.prefix(features)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    dec = model.decoder
    beams = cfg.beam_size if cfg.strategy == "beam" else 1
    rec = _TokenLogProbs(beams)
    kwargs = {**generate_kwargs(cfg, model), **extra}
    copies = beams if beams > 1 else cfg.n_best  # rows generate makes of each image
    if copies > 1 and kwargs["use_cache"] and share_prefix and prefix.shape[1] > 1:
        cache = _prefix_cache(model, prefix, mask, copies)
        if cache is not None:
            kwargs[cache_name()] = cache
    with warnings.catch_warnings():
        # "... with inputs_embeds ... only to newly generated tokens": exactly what captions want
        warnings.filterwarnings("ignore", message=r".*inputs_embeds.*without `input_ids`")
        out = model.lm.generate(
            inputs_embeds=prefix,
            attention_mask=mask,
            logits_processor=LogitsProcessorList([rec]),
            return_dict_in_generate=True,
            **kwargs,
        )
    seqs = out.sequences.cpu()  # decoder-only generate with inputs_embeds returns only the new tokens
    rows, width = seqs.shape
    stops = torch.tensor(dec.stop_ids)
    if beams > 1:
        # generate's beam_indices is -1 past each hypothesis' own end: that gives its length
        lengths = (out.beam_indices.cpu() >= 0).sum(dim=1)
    else:
        is_eos = torch.isin(seqs, stops)
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full((rows,), width))
        lengths = first
    hyps: list[_Hyp] = []
    for r in range(rows):
        n = int(lengths[r])
        ids = seqs[r, :n].tolist()
        finished = bool(ids) and ids[-1] in dec.stop_ids
        end = ids[-1] if finished else None
        ids = ids[:-1] if finished else ids
        if cfg.stop:
            # A row generate stopped at the stop string ends there; in greedy/sample output it is
            # followed by padding, which may be the EOS token and must not count.
            stop_n = _stop_length(ids, cfg.stop, dec.tokenizer)
            if stop_n is not None:
                ids, n, finished, end = ids[:stop_n], stop_n, True, None
        lengths[r] = n
        hyps.append(_Hyp(ids, 0.0, finished, end))
    if beams > 1:
        scores = _beam_scores(rec, seqs, out.beam_indices.cpu(), lengths)
    else:  # (generate decodes beam_size = 1 greedily)
        logp = rec.finish(out.sequences)
        steps = torch.arange(logp.shape[1])
        scores = torch.where(steps[None, :] < lengths[:, None], logp, torch.zeros_like(logp)).sum(dim=1)
    if cfg.strategy == "beam":
        scores = scores / lengths.clamp(min=1).double().pow(cfg.length_penalty).float()
    hyps = [_Hyp(h.ids, float(s), h.finished, h.end) for h, s in zip(hyps, scores.tolist(), strict=True)]
    n = cfg.n_best
    return [sorted(hyps[i : i + n], key=lambda h: -h.score) for i in range(0, rows, n)]


def generate(
    model: CaptionModel,
    features: torch.Tensor,
    cfg: GenerateConfig,
    *,
    language: str,
    segment: str = "none",
    seed_offset: int = 0,
    share_prefix: bool = True,
) -> list[list[Caption]]:
    """Image features -> per image, cfg.n_best captions, best first, in batches of cfg.batch_size.

    Sampling draws from its own seeded generator state (cfg.seed + seed_offset), leaving the global
    one as it was; the same inputs, seed and batch size give the same captions.
    """
    device = next(model.parameters()).device
    sampling = cfg.strategy == "sample"
    rng = (
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)
        if sampling
        else None
    )
    with rng or contextlib.nullcontext():
        if sampling:
            torch.manual_seed(cfg.seed + seed_offset)
        results: list[list[Caption]] = []
        for start in range(0, features.shape[0], cfg.batch_size):
            batch = features[start : start + cfg.batch_size]
            for hyps in decode_batch(model, batch, cfg, share_prefix=share_prefix):
                texts = hyp_texts(model, hyps, cfg.stop, language=language, segment=segment)
                results.append(
                    [
                        Caption(text=t, score=h.score, token_ids=tuple(h.ids), finished=h.finished)
                        for h, t in zip(hyps, texts, strict=True)
                    ]
                )
    return results


def hyp_texts(
    model: CaptionModel, hyps: list[_Hyp], stop: str = "", *, language: str, segment: str
) -> list[str]:
    """The display text of each hypothesis: decoded, cut at the stop string, post-processed."""
    texts = model.decoder.tokenizer.batch_decode([h.ids for h in hyps], skip_special_tokens=True)
    return [
        postprocess(_cut_at_stop(t, stop), language, segment, truncated=not h.finished)
        for h, t in zip(hyps, texts, strict=True)
    ]


def _cut_at_stop(text: str, stop: str) -> str:
    """Drop what the token that completed the stop string carried past it ('st' + 'opera' -> 'stop')."""
    if stop and stop in text:
        return text[: text.index(stop) + len(stop)]
    return text


def generate_ids(model: CaptionModel, features: torch.Tensor, cfg: GenerateConfig) -> list[list[int]]:
    """The best caption's token ids (no EOS) for each image of one batch."""
    return [hyps[0].ids for hyps in decode_batch(model, features, cfg)]


def generate_captions(
    model: CaptionModel, features: torch.Tensor, cfg: GenerateConfig, *, language: str, segment: str = "none"
) -> list[str]:
    """The best caption's display text for each image."""
    return [caps[0].text for caps in generate(model, features, cfg, language=language, segment=segment)]
