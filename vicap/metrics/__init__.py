"""Caption metrics on language-aware tokens: texts + a language + a level in, scores out.

Metric families and what computes them:

| family  | columns           | computed by                                                           |
|---------|-------------------|-----------------------------------------------------------------------|
| BLEU    | BLEU-1 .. BLEU-4  | pycocoevalcap Bleu(4) (corpus BLEU, closest reference length)         |
| METEOR  | METEOR            | pycocoevalcap's METEOR 1.5 jar (Java), see `vicap.metrics.java`       |
| ROUGE-L | ROUGE-L           | pycocoevalcap Rouge (LCS F-measure, beta 1.2)                         |
| CIDEr-D | CIDEr-D           | `vicap.metrics.cider`: pycocoevalcap's CIDEr-D, bit for bit, faster   |
| SPICE   | SPICE             | pycocoevalcap's SPICE jar, English only, when CoreNLP is present      |
| chrF    | chrF              | `vicap.metrics.chrf` (character 1..6-grams, beta 2; no segmenter)     |

Every family is fed the same tokens (`vicap.metrics.tokens`): the language's metric tokens
(`data_prep.languages`: lowercased, punctuation removed; syllables or segmented words), except English,
whose tokens come from a PTB-compatible tokenizer (`vicap.metrics.ptb`) so that English scores equal
pycocoevalcap's standard pipeline. (pycocoevalcap's own pipeline tokenizes with the Java PTB tokenizer,
written for English: it splits Vietnamese words at non-Latin-1 letters.) A family that cannot run here
(no Java, no CoreNLP, not defined for the language) is left out of the scores and its reason kept in
`Scorer.notes`; `protocol` records what the scores were computed on.

`vicap.metrics.scoring` holds the `Scorer` and the corpus functions (`score`, `score_systems`, human
agreement); `vicap.evaluate` captions a run, scores it with them and writes the reports.
"""

from vicap.metrics.scoring import (
    COLUMNS,
    FAMILIES,
    FAST_FAMILIES,
    HUMAN,
    METRICS,
    Scorer,
    describe,
    human_agreement,
    leave_one_out,
    protocol,
    score,
    score_systems,
    unavailable,
)
from vicap.metrics.tokens import (
    EMPTY,
    map_grouped,
    metric_tokens,
    tokenize_for_metrics,
    tokenize_hypotheses,
    tokenize_references,
    tokenizer_description,
    uses_ptb,
)

__all__ = [
    "COLUMNS",
    "EMPTY",
    "FAMILIES",
    "FAST_FAMILIES",
    "HUMAN",
    "METRICS",
    "Scorer",
    "describe",
    "human_agreement",
    "leave_one_out",
    "map_grouped",
    "metric_tokens",
    "protocol",
    "score",
    "score_systems",
    "tokenize_for_metrics",
    "tokenize_hypotheses",
    "tokenize_references",
    "tokenizer_description",
    "unavailable",
    "uses_ptb",
]
