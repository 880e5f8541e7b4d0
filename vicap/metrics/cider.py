"""CIDEr-D exactly as pycocoevalcap computes it, faster, and with the reference side computed once.

pycocoevalcap's `Cider` rebuilds document frequencies and reference tf-idf vectors on every call and
does its arithmetic on tiny numpy arrays. Scoring several systems (vicap, the floor, human rounds)
against the same references repeats that work. `CiderD(gts)` prepares the references once; `score(res)`
then scores any number of hypothesis sets. The arithmetic follows pycocoevalcap's `CiderScorer` step by
step (same quirks: the length penalty counts bigrams, n-grams absent from the references get df 1,
clipping min(hyp, ref) * ref, mean over n, divided by the number of references, x 10), so results agree
to the last bits (tests/test_metrics.py compares them).
"""

from __future__ import annotations

import math

import numpy as np

N = 4
SIGMA = 6.0


def _cook(sentence: str, n: int = N) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = tuple(words[i : i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


class CiderD:
    """Reference side of CIDEr-D for one set of references (image -> token strings)."""

    def __init__(self, gts: dict[str, list[str]], *, n: int = N, sigma: float = SIGMA) -> None:
        self.n, self.sigma = n, sigma
        self.keys = list(gts)
        crefs = {k: [_cook(r, n) for r in gts[k]] for k in self.keys}
        df: dict[tuple[str, ...], float] = {}
        for refs in crefs.values():
            for gram in {g for ref in refs for g in ref}:
                df[gram] = df.get(gram, 0.0) + 1
        self._df = df
        # idf numerator and per-n-gram log document frequency, as pycocoevalcap (np.log) computes them
        self.ref_len = float(np.log(float(len(crefs))))
        self._log_df = {g: float(np.log(max(1.0, d))) for g, d in df.items()}
        self._refs = {k: [self._vec(r) for r in refs] for k, refs in crefs.items()}

    def _vec(self, counts: dict[tuple[str, ...], int], idf=None):
        """tf-idf vectors per n, their norms, and the length; `idf(gram)` defaults to the corpus's."""
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            i = len(gram) - 1
            if idf is None:
                v = float(tf) * (self.ref_len - self._log_df.get(gram, 0.0))  # unseen: log(max(1, 0)) = 0
            else:
                v = float(tf) * idf(gram)
            vec[i][gram] = v
            norm[i] += pow(v, 2)
            if i == 1:  # pycocoevalcap's length is its bigram count
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _image_score(self, hyp, refs) -> float:
        vec, norm, length = hyp
        total = [0.0] * self.n
        two_sigma2 = 2 * self.sigma**2
        for vec_ref, norm_ref, length_ref in refs:
            delta = float(length - length_ref)
            penalty = np.e ** (-(delta**2) / two_sigma2)
            for i in range(self.n):
                ref_i = vec_ref[i]
                val = 0.0
                for gram, v in vec[i].items():
                    r = ref_i.get(gram, 0.0)
                    val += min(v, r) * r
                if norm[i] != 0 and norm_ref[i] != 0:
                    val /= norm[i] * norm_ref[i]
                total[i] += val * penalty
        return float(np.mean(np.array(total))) / len(refs) * 10.0

    def score(self, res: dict[str, list[str]]) -> tuple[float, list[float]]:
        """Corpus CIDEr-D (mean of per-image scores) and the per-image scores, in gts order."""
        scores = [self._image_score(self._vec(_cook(res[k][0], self.n)), self._refs[k]) for k in self.keys]
        return float(np.mean(np.array(scores))), scores

    def image_score(self, key: str, hypothesis: str) -> float:
        """CIDEr-D of `hypothesis` (a token string) for image `key` of this corpus, with the corpus's
        document frequencies: self-critical training's reward (vicap.scst)."""
        return self._image_score(self._vec(_cook(hypothesis, self.n)), self._refs[key])

    def score_new_image(self, hypothesis: str, references: list[str]) -> float:
        """CIDEr-D of `hypothesis` for one more image with `references`, as pycocoevalcap scores that
        image when it is added to this corpus: its references count as one more document.

        With a single image scored on its own, every n-gram has document frequency 1 of 1 and CIDEr-D
        is 0 whatever the caption; a corpus (a run's held-out references) gives the n-grams their weight.
        """
        if not references:
            raise ValueError("score_new_image needs at least one reference")
        crefs = [_cook(r, self.n) for r in references]
        extra = {g for ref in crefs for g in ref}
        ref_len = float(np.log(float(len(self.keys) + 1)))

        def idf(gram) -> float:
            return ref_len - float(np.log(max(1.0, self._df.get(gram, 0.0) + (gram in extra))))

        refs = [self._vec(r, idf) for r in crefs]
        return self._image_score(self._vec(_cook(hypothesis, self.n), idf), refs)
