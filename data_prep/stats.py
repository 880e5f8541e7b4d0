"""Caption statistics for the prepare report: lengths in syllables / words / LM tokens, vocabulary."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from data_prep.errors import SourceNotFoundError
from data_prep.languages import Language

log = logging.getLogger(__name__)


def distribution(lengths: Sequence[int]) -> dict[str, float | int]:
    """Mean, min, percentiles and max of a list of lengths."""
    if not lengths:
        return {"n": 0, "mean": 0.0, "min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    a = np.asarray(lengths)
    p50, p90, p99 = (int(x) for x in np.percentile(a, [50, 90, 99], method="inverted_cdf"))
    return {
        "n": int(a.size),
        "mean": round(float(a.mean()), 2),
        "min": int(a.min()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": int(a.max()),
    }


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from the local cache or a local folder; never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(
            f"tokenizer {name_or_path!r} not found locally (looked in the Hugging Face cache and as a folder). "
            f"Download it once with `huggingface-cli download {name_or_path}` or pass a local folder. ({err})"
        ) from None


def caption_stats(captions: Sequence[str], language: Language, tokenizer=None) -> dict:
    """Length distributions and vocabulary sizes of (normalized) captions.

    Units: "syllables" (whitespace tokens) and, where the language has a word segmenter,
    "words"; with a tokenizer, "lm_tokens" of the caption as is and, for segmented
    languages, "lm_tokens_segmented" -- what word segmentation does to sequence length.
    Lengths exclude special tokens (training adds one EOS).
    """
    captions = list(captions)
    if not captions:
        return {"lengths": {}, "vocab": {}}
    word_mode = language.metric_levels.get("word", "none")
    lengths: dict[str, dict] = {}
    vocab: dict[str, int] = {}
    plain = language.tokens_of_segmented(captions, "none")
    unit = "syllables" if word_mode != "none" else "words"
    lengths[unit] = distribution([len(t) for t in plain])
    vocab[unit] = len({w for t in plain for w in t})
    segmented = None
    if word_mode != "none":
        log.info("word-segmenting %d captions for statistics", len(captions))
        segmented = language.segment_many(captions, word_mode)
        words = language.tokens_of_segmented(segmented, word_mode)
        lengths["words"] = distribution([len(t) for t in words])
        vocab["words"] = len({w for t in words for w in t})
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        ids = tok(captions, add_special_tokens=False)["input_ids"]
        lengths["lm_tokens"] = distribution([len(x) for x in ids])
        if segmented is not None:
            ids = tok(segmented, add_special_tokens=False)["input_ids"]
            lengths["lm_tokens_segmented"] = distribution([len(x) for x in ids])
    return {"lengths": lengths, "vocab": vocab}
