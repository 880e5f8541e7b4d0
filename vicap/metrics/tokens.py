"""The tokens every metric family sees: a caption's metric tokens for a language and a level.

Texts are tokenized in batches (a word segmenter is much faster on a batch than caption by caption);
`map_grouped` is the one place that flattens grouped texts (an image's references) into a batch and
groups the results again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from data_prep.languages import get_language
from vicap.metrics.ptb import ptb_tokens

T = TypeVar("T")

EMPTY = "<empty>"  # stands in for an empty hypothesis (ROUGE-L divides by its length); matches nothing


def uses_ptb(language: str, level: str) -> bool:
    """English words and syllables are PTB tokens; other levels (char) keep the language's rules."""
    return language == "en" and level in ("syllable", "word")


def metric_tokens(texts: list[str], language: str, level: str) -> list[list[str]]:
    """Tokens the metrics see, for a batch of captions."""
    if uses_ptb(language, level):
        return [ptb_tokens(t) for t in texts]
    return get_language(language).metric_tokens_many(texts, level)


def tokenizer_description(language: str, level: str) -> str:
    if uses_ptb(language, level):
        return (
            "PTB-compatible (vicap.metrics.ptb): as pycocoevalcap's PTBTokenizer -lowerCase, then its "
            "punctuation list removed"
        )
    return f"{language} metric tokens at level {level!r} (data_prep.languages)"


def tokenize_for_metrics(texts: list[str], language: str, level: str) -> list[str]:
    """Each caption as the space-joined tokens the metrics see (EMPTY for a caption with none)."""
    return [" ".join(t) or EMPTY for t in metric_tokens(texts, language, level)]


def map_grouped(fn: Callable[[list[str]], list[T]], groups: Sequence[Sequence[str]]) -> list[list[T]]:
    """`fn` (a batch function, one result per text) run once on the texts of all `groups`, its results
    grouped as the texts were: [[a, b], [c]] -> [[fn(a), fn(b)], [fn(c)]]."""
    flat = fn([t for g in groups for t in g])
    out, i = [], 0
    for g in groups:
        out.append(flat[i : i + len(g)])
        i += len(g)
    return out


def tokenize_references(refs: Mapping[str, Sequence[str]], language: str, level: str) -> dict[str, list[str]]:
    """image -> its reference captions as metric token strings, images in sorted order (the order
    corpus scores are summed in), as `Scorer.score_tokens` takes them."""
    keys = sorted(refs)
    tokens = map_grouped(lambda texts: tokenize_for_metrics(texts, language, level), [refs[k] for k in keys])
    return dict(zip(keys, tokens, strict=True))


def tokenize_hypotheses(hyps: Mapping[str, str], language: str, level: str) -> dict[str, list[str]]:
    """image -> [its caption as a metric token string], images in sorted order."""
    return tokenize_references({k: [h] for k, h in hyps.items()}, language, level)
