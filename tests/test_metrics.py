"""Metrics beyond BLEU/ROUGE/CIDEr: chrF by hand, METEOR and SPICE availability, human agreement;
grouped tokenization, and the layering of vicap.metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from vicap.metrics import (
    EMPTY,
    HUMAN,
    Scorer,
    java,
    leave_one_out,
    map_grouped,
    score,
    score_systems,
    tokenize_hypotheses,
    tokenize_references,
)
from vicap.metrics.chrf import chrf_from_stats, chrf_stats, corpus_chrf

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")


# --------------------------------------------------------------------------- chrF


@pytest.mark.parametrize(
    ("hyp", "refs", "expected"),
    [
        ("ab", ["ab"], 1.0),  # orders 1-2 match fully; orders 3-6 are absent and not averaged
        # order 1: P = R = 1/2; order 2: "ab" vs "ac", 0/1 -> P = R = 1/4 -> F = 1/4
        ("ab", ["ac"], 0.25),
        # order 1: P 2/3, R 1; order 2: P 1/2, R 1; order 3 only in the hypothesis -> not averaged.
        # P = 7/12, R = 1, F2 = 5 * 7/12 / (4 * 7/12 + 1) = 35/40
        ("abc", ["ab"], 0.875),
        ("a b", ["ab"], 1.0),  # whitespace is not a character n-gram
        ("ab", ["xy", "ab"], 1.0),  # the best reference counts
        ("", ["ab"], 0.0),
        ("xy", ["ab"], 0.0),
    ],
)
def test_chrf_hand_cases(hyp: str, refs: list[str], expected: float) -> None:
    assert corpus_chrf([hyp], [refs]) == pytest.approx(expected, abs=1e-12)


def test_chrf_corpus_sums_statistics() -> None:
    # "ab"/"ab": order 1 (2, 2, 2), order 2 (1, 1, 1); "ab"/"ac": order 1 (2, 2, 1), order 2 (1, 1, 0).
    assert chrf_stats("ab", "ac")[:6] == [2, 2, 1, 1, 1, 0]
    # summed: order 1 3/4, order 2 1/2 -> P = R = 5/8 -> F = 5/8 (the mean of sentence scores would be 5/8
    # too here, so check against the statistics directly)
    assert corpus_chrf(["ab", "ab"], [["ab"], ["ac"]]) == pytest.approx(0.625)
    assert chrf_from_stats([4, 4, 3, 2, 2, 1]) == pytest.approx(0.625)
    # beta = 2 weighs recall: P = 1, R = 1/2 -> 5 * 1/2 / (4 + 1/2) = 5/9
    assert chrf_from_stats([1, 2, 1]) == pytest.approx(5 / 9)


def test_chrf_through_score_ignores_case_punctuation_and_level() -> None:
    refs = {"1": ["Người đàn ông đi xe đạp."]}
    s = score(refs, {"1": "người đàn ông đi xe đạp"}, language="vi", metrics=["chrF"])
    assert s == {"chrF": pytest.approx(1.0)}
    hyp = {"1": "người đàn bà đi xe máy"}
    syl = score(refs, hyp, language="vi", level="syllable", metrics=["chrF"])
    word = score(refs, hyp, language="vi", level="word", metrics=["chrF"])
    assert 0 < syl["chrF"] < 1 and syl == word  # characters need no segmenter: the same at every level


# --------------------------------------------------------------------------- METEOR


def test_meteor_without_java_is_reported_not_raised(monkeypatch) -> None:
    monkeypatch.setattr(java, "java_executable", lambda: None)
    refs, hyps = {"1": ["một con mèo"]}, {"1": "một con mèo"}
    s = score(refs, hyps, language="vi", metrics=["BLEU", "METEOR"])
    assert "METEOR" not in s and s["BLEU-1"] == pytest.approx(1.0)
    scores, notes = score_systems(refs, {"x": hyps}, language="vi", metrics=["METEOR", "chrF"], human=False)
    assert notes["METEOR"].startswith("unavailable: java not found")
    assert scores["syllable"]["x"] == {"chrF": pytest.approx(1.0)}


class _PycocoProtocolMeteor:
    """pycocoevalcap's own Meteor wrapper code, started with vicap's options for a non-English language."""

    def __init__(self, options: list[str]) -> None:
        from pycocoevalcap.meteor import meteor

        self.meteor_p = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", *options],
            cwd=os.path.dirname(os.path.abspath(meteor.__file__)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()
        self.compute_score = meteor.Meteor.compute_score.__get__(self)
        self._stat = meteor.Meteor._stat.__get__(self)

    def close(self) -> None:
        self.meteor_p.stdin.close()
        self.meteor_p.kill()
        self.meteor_p.wait()


@needs_java
def test_meteor_vietnamese_exact_mode_matches_pycocoevalcap_protocol() -> None:
    gts = {
        "1": ["một con mèo đen nằm trên ghế", "con mèo đen đang ngủ"],
        "2": ["người đàn_ông đi xe_đạp trên đường"],
        "3": ["hai con chó chạy"],
    }
    res = {"1": ["con mèo đen nằm ngủ"], "2": ["người đàn_ông đi xe_máy"], "3": ["xe buýt vàng"]}
    reference = _PycocoProtocolMeteor(java.meteor_options("vi"))
    try:
        expected = reference.compute_score(gts, res)[0]
    finally:
        reference.close()
    with java.Meteor("vi") as meteor:
        got = meteor.compute(gts, res)
        assert meteor.compute({"3": gts["3"]}, {"3": res["3"]}) == 0.0  # nothing in common
        # accents matter: "mèo" and "méo" are different words (UTF-8 end to end, no ASCII folding)
        assert meteor.compute({"1": ["mèo"]}, {"1": ["méo"]}) == 0.0
    assert 0 < got < 1 and got == pytest.approx(expected, abs=1e-12)
    assert java.meteor_options("vi") == ["-l", "other", "-m", "exact", "-lower"]  # never -norm on vi
    assert java.meteor_options("en") == ["-l", "en", "-norm"]  # pycocoevalcap's settings


# --------------------------------------------------------------------------- SPICE


def test_spice_not_applicable_beyond_english() -> None:
    reason = java.spice_unavailable("vi")
    assert reason.startswith("not applicable") and "English" in reason


def test_spice_without_corenlp_says_what_is_missing(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "spice-1.0.jar").write_bytes(b"")
    monkeypatch.setattr(java, "spice_dir", lambda: tmp_path)
    monkeypatch.setattr(java, "java_executable", lambda: "/usr/bin/java")
    reason = java.spice_unavailable("en")
    assert reason.startswith("unavailable:")
    assert "stanford-corenlp-3.6.0.jar" in reason and "stanford-corenlp-3.6.0-models.jar" in reason
    assert str(tmp_path / "lib") in reason and "never downloads" in reason
    with Scorer("en", ["BLEU", "SPICE"]) as scorer:  # no crash, no download: SPICE is just left out
        assert scorer.families == ["BLEU"] and scorer.notes["SPICE"] == reason
        assert set(scorer.score_tokens({"1": ["a cat"]}, {"1": ["a cat"]})) == {
            "BLEU-1",
            "BLEU-2",
            "BLEU-3",
            "BLEU-4",
        }
    monkeypatch.setattr(java, "java_executable", lambda: None)
    assert "java not found" in java.spice_unavailable("en")


# --------------------------------------------------------------------------- human agreement


def test_leave_one_out_rounds() -> None:
    rounds = leave_one_out({"a": ["x", "y", "z"], "b": ["p", "q"], "c": ["only"]})
    assert len(rounds) == 3  # as many rounds as the most captions; "c" (one caption) cannot take part
    assert rounds[0] == ({"a": ["y", "z"], "b": ["q"]}, {"a": ["x"], "b": ["p"]})
    assert rounds[1] == ({"a": ["x", "z"], "b": ["p"]}, {"a": ["y"], "b": ["q"]})
    assert rounds[2] == ({"a": ["x", "y"], "b": ["q"]}, {"a": ["z"], "b": ["p"]})  # "b" wraps around


def test_human_agreement_by_hand() -> None:
    refs = {"1": ["một con mèo", "Một con mèo.", "hai con chó"], "2": ["chỉ một câu"]}
    system = {"1": "một con mèo", "2": "chỉ một câu"}
    scores, _ = score_systems(refs, {"sys": system}, language="vi", metrics=["BLEU"], human=True)
    # Round 0 and 1: "một con mèo" against ["một con mèo", "hai con chó"] -> BLEU-1 = 1.
    # Round 2: "hai con chó" against two "một con mèo" -> only "con" matches: 1/3 (same length, no BP).
    # Image "2" has a single caption and takes no part.
    assert scores["syllable"][HUMAN]["BLEU-1"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert scores["syllable"]["sys"]["BLEU-1"] == pytest.approx(1.0)
    scores, _ = score_systems(refs, {"sys": system}, language="vi", metrics=["BLEU"], human=False)
    assert HUMAN not in scores["syllable"]


# --------------------------------------------------------------------------- CIDEr-D


def test_cider_equals_pycocoevalcap_bit_for_bit() -> None:
    import random

    from pycocoevalcap.cider.cider import Cider

    from vicap.metrics.cider import CiderD

    rng = random.Random(0)
    words = "một hai con mèo chó đen trắng nằm chạy trên dưới ghế cỏ xe_đạp người".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    gts = {str(i): [sentence() for _ in range(rng.randint(1, 5))] for i in range(60)}
    cider = CiderD(gts)
    for _ in range(3):  # one reference side, several systems
        res = {k: [sentence()] for k in gts}
        expected, per_image = Cider().compute_score(gts, res)
        got, got_per_image = cider.score(res)
        assert got == expected and got_per_image == list(per_image)


def test_cider_of_one_new_image_against_a_corpus() -> None:
    # A caption scored against one typed reference takes its document frequencies from a corpus (a
    # run's held-out references): the same number pycocoevalcap gives that image when the corpus and
    # the image are scored together.
    import random

    from pycocoevalcap.cider.cider import Cider

    from vicap.metrics.cider import CiderD

    rng = random.Random(1)
    words = "một hai con mèo chó đen trắng nằm chạy trên dưới ghế cỏ".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))

    corpus = {str(i): [sentence() for _ in range(5)] for i in range(30)}
    cider = CiderD(corpus)
    for refs in ([sentence()], [sentence(), sentence()]):
        hyp = sentence()
        gts = {**corpus, "new": refs}
        res = {k: [corpus[k][0]] for k in corpus} | {"new": [hyp]}
        _, per_image = Cider().compute_score(gts, res)
        assert cider.score_new_image(hyp, refs) == per_image[list(gts).index("new")]
    assert cider.score_new_image(refs[0], refs) > 0
    # on its own, one image scores 0 whatever the caption: why the corpus is needed
    assert Cider().compute_score({"new": ["con mèo đen"]}, {"new": ["con mèo đen"]})[0] == 0


# --------------------------------------------------------------------------- tokenizing grouped texts


@pytest.mark.parametrize(
    ("case", "groups", "expected"),
    [
        ("two groups", [["a", "b"], ["c"]], [["A", "B"], ["C"]]),
        ("an empty group keeps its place", [["a"], [], ["b", "c"]], [["A"], [], ["B", "C"]]),
        ("no groups", [], []),
    ],
)
def test_map_grouped_runs_one_batch_and_regroups(case: str, groups, expected) -> None:
    batches = []

    def upper(texts: list[str]) -> list[str]:
        batches.append(list(texts))
        return [t.upper() for t in texts]

    assert map_grouped(upper, groups) == expected, case
    assert batches == [[t for g in groups for t in g]], case  # one call, every text in order


def test_tokenize_references_and_hypotheses_key_images_in_sorted_order() -> None:
    refs = tokenize_references(
        {"b": ["Hai con chó."], "a": ["Một con mèo!", "MỘT  con mèo"]}, "vi", "syllable"
    )
    assert list(refs.items()) == [("a", ["một con mèo", "một con mèo"]), ("b", ["hai con chó"])]
    hyps = tokenize_hypotheses({"b": "", "a": "Con mèo."}, "vi", "word")
    assert list(hyps.items()) == [("a", ["con mèo"]), ("b", [EMPTY])]
