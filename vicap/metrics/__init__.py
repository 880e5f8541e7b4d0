"""Caption metrics on language-aware tokens: one `Scorer` for BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, chrF.

Metric families and what computes them:

| family  | columns           | computed by                                                           |
|---------|-------------------|-----------------------------------------------------------------------|
| BLEU    | BLEU-1 .. BLEU-4  | pycocoevalcap Bleu(4) (corpus BLEU, closest reference length)         |
| METEOR  | METEOR            | pycocoevalcap's METEOR 1.5 jar (Java), see `vicap.metrics.java`       |
| ROUGE-L | ROUGE-L           | pycocoevalcap Rouge (LCS F-measure, beta 1.2)                         |
| CIDEr-D | CIDEr-D           | `vicap.metrics.cider`: pycocoevalcap's CIDEr-D, bit for bit, faster   |
| SPICE   | SPICE             | pycocoevalcap's SPICE jar, English only, when CoreNLP is present      |
| chrF    | chrF              | `vicap.metrics.chrf` (character 1..6-grams, beta 2; no segmenter)     |

Every family is fed the same tokens: the language's metric tokens (`data_prep.languages`), except
English, whose tokens come from a PTB-compatible tokenizer (`vicap.metrics.ptb`) so that English
scores equal pycocoevalcap's standard pipeline. A family that cannot run here (no Java, no CoreNLP,
not defined for the language) is left out of the scores and its reason kept in `Scorer.notes`.
"""

from __future__ import annotations

import logging
import threading

from data_prep.languages import get_language
from vicap.metrics import java
from vicap.metrics.chrf import corpus_chrf
from vicap.metrics.cider import CiderD
from vicap.metrics.ptb import ptb_tokens

log = logging.getLogger(__name__)

FAMILIES: dict[str, tuple[str, ...]] = {
    "BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "METEOR": ("METEOR",),
    "ROUGE-L": ("ROUGE-L",),
    "CIDEr-D": ("CIDEr-D",),
    "SPICE": ("SPICE",),
    "chrF": ("chrF",),
}
# Column order in every table.
COLUMNS: tuple[str, ...] = tuple(c for cols in FAMILIES.values() for c in cols)
# The pure-Python families: no Java process to start, so the default for quick scoring.
FAST_FAMILIES = ("BLEU", "ROUGE-L", "CIDEr-D")
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


def unavailable(family: str, language: str) -> str | None:
    """Why `family` cannot be computed here for `language`, or None when it can."""
    if family not in FAMILIES:
        raise ValueError(f"unknown metric {family!r}; known: {', '.join(FAMILIES)}")
    if family == "METEOR":
        return java.meteor_unavailable(language)
    if family == "SPICE":
        return java.spice_unavailable(language)
    return None


def describe(family: str, language: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        coco = f"pycocoevalcap {version('pycocoevalcap')}"
    except PackageNotFoundError:
        coco = "pycocoevalcap"
    return {
        "BLEU": f"{coco} Bleu(4): corpus-level, closest reference length for the brevity penalty",
        "METEOR": java.meteor_description(language),
        "ROUGE-L": f"{coco} Rouge: LCS-based F-measure (beta 1.2), best reference per image, mean over images",
        "CIDEr-D": f"CIDEr-D as {coco} Cider computes it (sigma 6, clipped counts, x10; vicap.metrics.cider), "
        "document frequencies from the references",
        "SPICE": java.spice_description(),
        "chrF": "vicap.metrics.chrf: character 1..6-grams without spaces, beta 2, best reference per caption, "
        "corpus F from summed statistics (sacreBLEU's chrF2, 0-1 scale)",
    }[family]


class Scorer:
    """Scores tokenized captions with the chosen metric families, for one language.

    Holds the METEOR process (started on first use) so many systems and rounds share one JVM; use it as
    a context manager, or call `close()`.
    """

    def __init__(self, language: str, families: tuple[str, ...] | list[str] = FAST_FAMILIES) -> None:
        self.language = language
        self.families: list[str] = []
        self.notes: dict[str, str] = {}  # family -> how it was computed, or why it was not
        for fam in families:
            reason = unavailable(fam, language)
            if reason:
                self.notes[fam] = reason
                log.info("%s %s", fam, reason)
            else:
                self.families.append(fam)
                self.notes[fam] = describe(fam, language)
        self._meteor: java.Meteor | None = None
        self._cider: tuple[dict, CiderD] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for fam in FAMILIES if fam in self.families for c in FAMILIES[fam])

    def score_tokens(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
        """Corpus scores; gts/res map image -> token strings (res: one per image), as pycocoevalcap takes."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge

        out: dict[str, float] = {}
        meteor_thread, meteor_out = None, {}
        if "METEOR" in self.families:
            # METEOR runs in its own JVM: start it first and let it work while Python scores the rest.
            if self._meteor is None:
                self._meteor = java.Meteor(self.language)
            meteor = self._meteor

            def run_meteor() -> None:
                try:
                    meteor_out["METEOR"] = meteor.compute(gts, res)
                except Exception as e:  # re-raised in the caller's thread below
                    meteor_out["error"] = e

            meteor_thread = threading.Thread(target=run_meteor, daemon=True)
            meteor_thread.start()
        if "BLEU" in self.families:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update(zip(FAMILIES["BLEU"], map(float, bleu), strict=True))
        if "ROUGE-L" in self.families:
            out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr-D" in self.families:
            # The reference side (document frequencies, tf-idf vectors) is built once per reference set
            # and reused for every system scored against it.
            if self._cider is None or self._cider[0] is not gts:
                self._cider = (gts, CiderD(gts))
            out["CIDEr-D"] = self._cider[1].score(res)[0]
        if "SPICE" in self.families:
            out["SPICE"] = java.spice_score(gts, res)
        if "chrF" in self.families:
            # Characters only: the word joiner goes, so chrF is the same at every level.
            joiner = get_language(self.language).joiner

            def chars(t: str) -> str:
                return "" if t == EMPTY else t.replace(joiner, "") if joiner else t

            keys = list(gts)
            out["chrF"] = corpus_chrf(
                [chars(res[k][0]) for k in keys], [[chars(r) for r in gts[k]] for k in keys]
            )
        if meteor_thread is not None:
            meteor_thread.join()
            if "error" in meteor_out:
                raise meteor_out["error"]
            out["METEOR"] = meteor_out["METEOR"]
        return {c: out[c] for c in COLUMNS if c in out}

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
