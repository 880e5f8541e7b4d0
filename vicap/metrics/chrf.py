"""chrF: character n-gram F-score (Popović, WMT 2015), the variant sacreBLEU reports as chrF2.

Character n-grams of orders 1..6 with whitespace removed; per order, precision and recall of the
clipped matches; precision and recall are averaged over the orders that occur in both texts
("effective order"), then combined as F-beta with beta = 2 (recall counts twice as much). With several
references, each hypothesis keeps the statistics of the reference it scores best against; the corpus
score is the F-score of the statistics summed over all hypotheses (as sacreBLEU does). No word
n-grams (that would be chrF++), and no segmenter: it needs only characters.

vicap reports chrF on a 0-1 scale like the other metrics (sacreBLEU prints it x 100).
"""

from __future__ import annotations

from functools import lru_cache

ORDER = 6
BETA = 2.0


@lru_cache(maxsize=200_000)
def _ngrams(text: str, order: int = ORDER) -> tuple[tuple[dict[str, int], int], ...]:
    """Per order n = 1..order: character n-gram counts of `text` without whitespace, and their total."""
    s = "".join(text.split())
    out = []
    for n in range(1, order + 1):
        counts: dict[str, int] = {}
        for i in range(len(s) - n + 1):
            g = s[i : i + n]
            counts[g] = counts.get(g, 0) + 1
        out.append((counts, max(len(s) - n + 1, 0)))
    return tuple(out)


def chrf_stats(hyp: str, ref: str, order: int = ORDER) -> list[int]:
    """[hyp n-grams, ref n-grams, matches] for n = 1..order, flattened (3 * order numbers)."""
    out: list[int] = []
    for (h, n_h), (r, n_r) in zip(_ngrams(hyp, order), _ngrams(ref, order), strict=True):
        get = r.get
        match = 0
        for g, c in h.items():
            rc = get(g)
            if rc:
                match += c if c < rc else rc
        out += [n_h, n_r, match]
    return out


def chrf_from_stats(stats: list[int], beta: float = BETA) -> float:
    """F-beta of the order-averaged precision and recall; 0 when nothing matches."""
    prec = rec = 0.0
    effective = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        if n_hyp > 0 and n_ref > 0:
            prec += n_match / n_hyp
            rec += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    prec, rec = prec / effective, rec / effective
    if prec + rec == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * prec * rec / (b2 * prec + rec)


def corpus_chrf(hyps: list[str], refs: list[list[str]], *, order: int = ORDER, beta: float = BETA) -> float:
    """Corpus chrF of hypotheses against their references (one list of references per hypothesis)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    total = [0] * (3 * order)
    for hyp, rs in zip(hyps, refs, strict=True):
        best, best_f = None, -1.0
        for r in rs:
            stats = chrf_stats(hyp, r, order)
            f = chrf_from_stats(stats, beta)
            if f > best_f:
                best, best_f = stats, f
        if best is not None:
            total = [a + b for a, b in zip(total, best, strict=True)]
    return chrf_from_stats(total, beta)
