"""Scoring metric tokens: the `Scorer` (one language, chosen metric families), corpus scores of
systems against references, human agreement (leave-one-out), and the protocol a report records.

Beside each system a report scores human agreement under the same protocol: each human caption against
the image's other captions (leave-one-out).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from data_prep.languages import get_language
from vicap.metrics import java
from vicap.metrics.chrf import corpus_chrf
from vicap.metrics.cider import CiderD
from vicap.metrics.tokens import (
    EMPTY,
    tokenize_hypotheses,
    tokenize_references,
    tokenizer_description,
    uses_ptb,
)

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
# The columns `score` returns by default (pure Python, no Java): BLEU-1..4, ROUGE-L, CIDEr-D.
METRICS = tuple(c for fam in FAST_FAMILIES for c in FAMILIES[fam])
HUMAN = "human (leave-one-out)"  # the row of human agreement in `score_systems`


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


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
    coco = " ".join(filter(None, ("pycocoevalcap", _pkg_version("pycocoevalcap"))))
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


def _check_keys(refs: Mapping, hyps: Mapping) -> None:
    if set(refs) != set(hyps):
        raise ValueError(f"references and hypotheses cover different images ({len(refs)} vs {len(hyps)})")
    if not refs:
        raise ValueError("nothing to score")


def score(
    refs: Mapping[str, Sequence[str]],
    hyps: Mapping[str, str],
    *,
    language: str,
    level: str = "syllable",
    metrics: Sequence[str] = FAST_FAMILIES,
) -> dict[str, float]:
    """Corpus scores for hypotheses against references (same keys), on `level` metric tokens.

    `metrics` names families (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, chrF); one that cannot run here
    (no Java, not defined for the language) is left out of the result, with a logged reason.
    """
    _check_keys(refs, hyps)
    with Scorer(language, metrics) as scorer:
        return scorer.score_tokens(
            tokenize_references(refs, language, level), tokenize_hypotheses(hyps, language, level)
        )


def leave_one_out(gts: dict[str, list[str]]) -> list[tuple[dict[str, list[str]], dict[str, list[str]]]]:
    """Human-agreement rounds: in round r each image with n >= 2 captions offers caption r mod n as the
    hypothesis and its other n - 1 captions as references. There are as many rounds as the most
    captions any image has, so every caption is a hypothesis once (or more, on images with fewer)."""
    usable = {k: v for k, v in gts.items() if len(v) >= 2}
    rounds = []
    for r in range(max((len(v) for v in usable.values()), default=0)):
        refs, hyps = {}, {}
        for k, caps in usable.items():
            i = r % len(caps)
            hyps[k] = [caps[i]]
            refs[k] = caps[:i] + caps[i + 1 :]
        rounds.append((refs, hyps))
    return rounds


def human_agreement(scorer: Scorer, gts: dict[str, list[str]]) -> dict[str, float] | None:
    """Mean over leave-one-out rounds of the scores of human captions against the others."""
    rounds = leave_one_out(gts)
    if not rounds:
        return None
    per_round = [scorer.score_tokens(refs, hyps) for refs, hyps in rounds]
    return {m: sum(s[m] for s in per_round) / len(per_round) for m in per_round[0]}


def score_systems(
    refs: Mapping[str, Sequence[str]],
    systems: Mapping[str, Mapping[str, str]],
    *,
    language: str,
    levels: Sequence[str] = ("syllable",),
    metrics: Sequence[str] = FAST_FAMILIES,
    human: bool = True,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Scores of each system (and, when `human`, of the human captions, leave-one-out) at each level.

    References are tokenized once per level and shared by all systems; one METEOR process serves all.
    Returns ({level: {system: {column: value}}}, {metric family: how it was computed or why not}).
    """
    for name, hyps in systems.items():
        try:
            _check_keys(refs, hyps)
        except ValueError as e:
            raise ValueError(f"system {name!r}: {e}") from None
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with Scorer(language, metrics) as scorer:
        for level in levels:
            gts = tokenize_references(refs, language, level)
            rows = {
                name: scorer.score_tokens(gts, tokenize_hypotheses(h, language, level))
                for name, h in systems.items()
            }
            if human:
                agreement = human_agreement(scorer, gts)
                if agreement is not None:
                    rows[HUMAN] = agreement
            scores[level] = rows
        notes = dict(scorer.notes)
    return scores, notes


def protocol(language: str, levels: Sequence[str], notes: Mapping[str, str] | None = None) -> dict:
    """What the scores were computed on: per level, the language's normalizer, segmenter and text rules."""
    lang = get_language(language)
    levels_info = {}
    for lv in levels:
        info = lang.protocol(lv)
        if uses_ptb(language, lv):  # English: pycocoevalcap's pipeline, not the language's rules
            info.update(
                normalizer="none (Unicode NFC only)",
                segmentation="PTB tokenizer",
                punctuation="pycocoevalcap's PTB punctuation tokens removed (brackets stay as -lrb- -rrb- ...)",
            )
        info["tokenizer"] = tokenizer_description(language, lv)
        levels_info[lv] = info
    out = {
        "language": language,
        "levels": levels_info,
        "scorers": f"pycocoevalcap {_pkg_version('pycocoevalcap') or 'not installed'} (BLEU, ROUGE-L; "
        "METEOR 1.5 and SPICE 1.0 jars), CIDEr-D as pycocoevalcap computes it (vicap.metrics.cider), "
        "chrF (vicap.metrics.chrf)",
        "empty_hypothesis": f"scored as the token {EMPTY!r}, which matches nothing (empty text for chrF)",
    }
    if notes:
        out["metrics"] = dict(notes)
    return out
