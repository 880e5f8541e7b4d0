"""English scores equal pycocoevalcap's standard pipeline (Java PTBTokenizer + the same scorers).

Needs Java (pycocoevalcap's PTB tokenizer and METEOR are Java programs); skipped without it. The
METEOR case loads English METEOR's paraphrase table twice (the slowest test, ~20-30 s).
"""

from __future__ import annotations

import shutil

import pytest

from vicap.metrics import score, tokenize_for_metrics
from vicap.metrics.ptb import ptb_tokens

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for pycocoevalcap")

# Caption-like English with the punctuation PTB treats specially: clitics, possessives, quotes,
# brackets (which pycocoevalcap keeps as -lrb- words), hyphens, numbers, abbreviations, ellipses.
REFS = {
    "1": [
        "A man's dog isn't \"happy\" (really).",
        "A dog sits beside a man, looking sad.",
        "The man and his dog are sitting on a bench.",
        "Man with a brown dog on a park bench...",
        "a man 's dog sits on a bench .",
    ],
    "2": [
        "Two people can't see the 3.5-inch screen at 10:30 p.m.",
        "Two people look at a small screen; it's late.",
        "A couple watching a tiny TV -- at night.",
        "Two friends watch TV in the dark!",
        "People watching a small television.",
    ],
    "3": [
        "A black-and-white cat sits on a $5 bill & a 50% coupon!",
        "A cat sitting on money and a coupon.",
        "The cat is sitting on top of some papers.",
        "A cat on a table with a bill and a coupon?",
        "Cat sitting on paper money",
    ],
    "4": [
        "She said: 'don't go'... then left; they'd gone?",
        "A woman is walking away from a group of people.",
        "A woman in a red coat walks down the street.",
        "Woman leaving a crowd of people behind her.",
        "a lady walking away from some people",
    ],
    "5": [
        "A boy w/ a hat, a girl w/o shoes & a dog.",
        "Two kids and a dog playing in the yard.",
        "A boy wearing a hat plays with a girl and a dog.",
        "Children playing with their dog outside",
        "A boy and a girl with their dog.",
    ],
    "6": [
        "It's a 1,000 piece puzzle; we're done. I'm gonna go.",
        "A finished jigsaw puzzle on a table.",
        "A large puzzle that has been completed.",
        "Someone's puzzle, all 1,000 pieces of it.",
        "The kids' puzzle is finished",
    ],
}
HYPS = {
    "1": "A man and his dog sitting on a bench.",
    "2": "Two people watching TV at night.",
    "3": "A cat sitting on a table with money.",
    "4": "A woman walking away from people.",
    "5": "A boy and a girl playing with a dog.",
    "6": "A puzzle on a table (finished).",
}


def _standard_pipeline(families: list[str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    out = {}
    out.update(
        zip(
            ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"],
            Bleu(4).compute_score(gts, res, verbose=0)[0],
            strict=True,
        )
    )
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    if "METEOR" in families:
        meteor = Meteor()
        out["METEOR"] = meteor.compute_score(gts, res)[0]
        del meteor
    return out


def test_tokens_equal_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = [c for v in REFS.values() for c in v] + list(HYPS.values())
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(caps)})
    for i, c in enumerate(caps):
        assert " ".join(ptb_tokens(c)) == java[str(i)][0], c
    assert tokenize_for_metrics(["A man's dog (really)."], "en", "word") == [
        "a man 's dog -lrb- really -rrb-"
    ]


@pytest.mark.parametrize(
    "families",
    [
        pytest.param(["BLEU", "ROUGE-L", "CIDEr-D"], id="bleu-rouge-cider"),
        # English METEOR loads a 60 MB paraphrase table, twice here (~10 s CPU each).
        pytest.param(["BLEU", "METEOR", "ROUGE-L", "CIDEr-D"], id="with-meteor", marks=pytest.mark.slow),
    ],
)
def test_scores_equal_pycocoevalcap(families: list[str]) -> None:
    ours = score(REFS, HYPS, language="en", level="word", metrics=families)
    theirs = _standard_pipeline(families)
    assert set(ours) == set(theirs)
    for m, v in theirs.items():
        assert ours[m] == pytest.approx(v, abs=1e-12), m
