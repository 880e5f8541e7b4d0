"""Scoring: hand-computed BLEU / ROUGE-L / CIDEr-D cases on vicap's language-aware metric tokens; a
run's report scored (writing nothing), then written (three files)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from data_prep.manifest import Manifest, Record
from vicap.evaluate import (
    FLOOR,
    most_frequent_caption,
    report_markdown,
    score_report,
    score_table,
    write_report,
)
from vicap.metrics import EMPTY, HUMAN, METRICS, protocol, score, score_systems, tokenize_for_metrics
from vicap.recipe import EvalConfig

REFS = {
    "1": ["một con mèo đen nằm trên ghế"],
    "2": ["hai con chó đang chạy trên bãi cỏ xanh"],
    "3": ["người đàn ông đi xe đạp trên đường phố"],
}


def _bleu1(hyp: str, ref: str) -> float:
    return score({"x": [ref]}, {"x": hyp}, language="vi")["BLEU-1"]


def test_identical_captions_score_one() -> None:
    s = score(REFS, {k: v[0] for k, v in REFS.items()}, language="vi")
    assert set(s) == set(METRICS)
    for m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert s[m] == pytest.approx(1.0, abs=1e-6), m
    assert s["CIDEr-D"] > 1.0  # pycocoevalcap's CIDEr is scaled by 10; every n-gram is matched


def test_disjoint_captions_score_zero() -> None:
    hyps = {"1": "xe buýt vàng", "2": "bầu trời thẳm", "3": "những quả táo"}
    for k in REFS:
        assert not set(hyps[k].split()) & set(REFS[k][0].split())
    s = score(REFS, hyps, language="vi")
    for m in METRICS:
        assert s[m] == pytest.approx(0.0, abs=1e-9), m
    assert s["CIDEr-D"] == 0.0 and s["ROUGE-L"] == 0.0


def test_metric_tokens_ignore_case_and_punctuation() -> None:
    assert (
        tokenize_for_metrics(["Một Con Mèo.", "một con mèo", "  một, con  mèo!  "], "vi", "syllable")
        == ["một con mèo"] * 3
    )
    loud = {"1": ["Một Con Mèo Đen Nằm Trên Ghế."], "2": ["Hai con chó, đang chạy trên bãi cỏ xanh!"]}
    quiet = {"1": ["một con mèo đen nằm trên ghế"], "2": ["hai con chó đang chạy trên bãi cỏ xanh"]}
    hyps = {"1": "Một con mèo đen.", "2": "hai con chó chạy trên cỏ"}
    quiet_hyps = {"1": "một con mèo đen", "2": "hai con chó chạy trên cỏ"}
    assert score(loud, hyps, language="vi") == score(quiet, quiet_hyps, language="vi")


def test_empty_hypothesis_scores_zero() -> None:
    assert tokenize_for_metrics(["", " . "], "vi", "syllable") == [EMPTY, EMPTY]
    s = score({"1": ["một con mèo"], "2": ["hai con chó"]}, {"1": "", "2": "..."}, language="vi")
    for m in METRICS:
        assert s[m] == pytest.approx(0.0, abs=1e-9), m
    # One empty hypothesis among good ones lowers the score but does not break it.
    mixed = score({"1": ["một con mèo"], "2": ["hai con chó"]}, {"1": "", "2": "hai con chó"}, language="vi")
    assert 0.0 < mixed["BLEU-1"] < 1.0 and mixed["ROUGE-L"] == pytest.approx(0.5)


def test_keys_must_match() -> None:
    with pytest.raises(ValueError, match="different images"):
        score({"1": ["một con mèo"]}, {"2": "một con mèo"}, language="vi")
    with pytest.raises(ValueError, match="different images"):
        score({"1": ["a"], "2": ["b"]}, {"1": "a"}, language="vi")
    with pytest.raises(ValueError, match="nothing to score"):
        score({}, {}, language="vi")


def test_bleu1_by_hand() -> None:
    # Clipped unigram precision: "con" x3 counts once (the reference has one), "mèo" once -> 2/4.
    # Brevity penalty: hypothesis 4 tokens, reference 6 -> exp(1 - 6/4).
    assert _bleu1("con con con mèo", "một con mèo nằm trên ghế") == pytest.approx(
        2 / 4 * math.exp(1 - 6 / 4), rel=1e-6
    )
    # Longer than the reference: no brevity penalty, precision 3/5.
    assert _bleu1("một con mèo màu đen", "một con mèo") == pytest.approx(3 / 5, rel=1e-6)


def test_bleu1_multiple_references_and_corpus_level() -> None:
    # Clipping takes the largest count in any reference ("con" twice in the second); the brevity
    # penalty uses the closest reference length (3, not 6), and 4 > 3 means no penalty.
    s = score({"x": ["một con mèo", "con mèo và con chó nằm"]}, {"x": "con mèo con mèo"}, language="vi")
    assert s["BLEU-1"] == pytest.approx(3 / 4, rel=1e-6)
    # BLEU is corpus-level: matches and lengths are summed over images, not averaged per image:
    # (3 + 1) / (3 + 5) = 0.5, where the mean of per-image scores would be (1 + 1/5) / 2 = 0.6.
    refs = {"1": ["một con mèo"], "2": ["xe máy"]}
    hyps = {"1": "một con mèo", "2": "xe đạp đỏ trên đường"}
    assert score(refs, hyps, language="vi")["BLEU-1"] == pytest.approx(0.5, rel=1e-6)


def test_word_level_counts_words_not_syllables() -> None:
    refs, hyps = {"1": ["người đàn ông đi xe đạp"]}, {"1": "người đàn bà đi xe máy"}
    assert tokenize_for_metrics(refs["1"], "vi", "word") == ["người đàn_ông đi xe_đạp"]
    # syllables: người đàn đi xe match, 4 of 6; words: người đi match, 2 of 4 (đàn_bà, xe_máy do not).
    assert score(refs, hyps, language="vi", level="syllable")["BLEU-1"] == pytest.approx(4 / 6, rel=1e-6)
    assert score(refs, hyps, language="vi", level="word")["BLEU-1"] == pytest.approx(2 / 4, rel=1e-6)


def _record(i: int, split: str, *captions: str) -> Record:
    return Record(str(i), f"{i}.jpg", split, captions, tuple(str(j) for j in range(len(captions))))


def test_most_frequent_caption() -> None:
    manifest = Manifest(
        Path("m.jsonl"),
        {"language": "vi", "dataset": "t"},
        [
            _record(1, "train", "một con mèo", "một con chó"),
            _record(2, "train", "một con chó", "hai con mèo"),
            _record(3, "train", "một con chó"),
            _record(4, "test", "hai con mèo", "hai con mèo", "hai con mèo", "hai con mèo"),
        ],
    )
    assert most_frequent_caption(manifest) == "một con chó"  # 3 times in train
    assert most_frequent_caption(manifest, "test") == "hai con mèo"  # test captions stay in test
    with pytest.raises(ValueError, match="split 'val' has no captions"):
        most_frequent_caption(manifest, "val")


def test_score_table_marks_missing_metrics() -> None:
    table = score_table({"a": {"BLEU-4": 0.5, "chrF": 0.25}, "b": {"BLEU-4": 0.125}})
    assert table.splitlines()[0] == "| system | BLEU-4 | chrF |"
    assert table.splitlines()[2:] == ["| a | 0.5000 | 0.2500 |", "| b | 0.1250 | n/a |"]


def test_score_extra_metric_families() -> None:
    s = score(REFS, {k: v[0] for k, v in REFS.items()}, language="vi", metrics=["BLEU", "chrF"])
    assert list(s) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "chrF"]  # standard column order
    assert s["chrF"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric 'BLEURT'"):
        score(REFS, {k: v[0] for k, v in REFS.items()}, language="vi", metrics=["BLEURT"])


def test_protocol_names_tokenizers_and_metrics() -> None:
    p = protocol("vi", ("syllable", "word"), {"chrF": "vicap chrF", "SPICE": "not applicable: ..."})
    assert p["levels"]["word"]["segmentation"] == "word" and "underthesea" in p["levels"]["word"]["segmenter"]
    assert "data_prep.languages" in p["levels"]["syllable"]["tokenizer"]
    assert p["metrics"]["SPICE"].startswith("not applicable")
    assert "PTB-compatible" in protocol("en", ("word",))["levels"]["word"]["tokenizer"]


def test_held_out_records_name_the_manifest_and_its_splits(tmp_path) -> None:
    import pytest

    from data_prep.manifest import Record, read_manifest, write_manifest
    from vicap.evaluate import held_out_records

    records = [
        Record(str(i), f"{i}.jpg", "test" if i < 3 else "train", (f"caption {i}",), (str(i),))
        for i in range(5)
    ]
    write_manifest(tmp_path / "m.jsonl", records, {"dataset": "folder", "language": "vi"})
    manifest = read_manifest(tmp_path / "m.jsonl")
    assert [r.image_id for r in held_out_records(manifest, "test")] == ["0", "1", "2"]
    assert [r.image_id for r in held_out_records(manifest, "test", max_images=2)] == ["0", "1"]
    with pytest.raises(ValueError, match=r"m\.jsonl: split 'val' is empty; splits: \['test', 'train'\]"):
        held_out_records(manifest, "val")


# --------------------------------------------------------------------------- scoring, then reporting


def _captioned_split(tmp_path: Path, test_image: str) -> tuple[Manifest, list[Record], list[str]]:
    """A manifest (train captions for the floor) and the captions of its test split."""
    test = [
        Record("t1", test_image, "test", ("một con mèo đen", "con mèo đen nằm"), ("1", "2")),
        Record("t2", "b.jpg", "test", ("hai con chó chạy",), ("3",)),
    ]
    manifest = Manifest(
        tmp_path / "m.jsonl",
        {"language": "vi", "dataset": "t"},
        [_record(1, "train", "một con mèo", "một con mèo"), _record(2, "train", "hai con chó"), *test],
    )
    return manifest, test, ["Một con mèo đen.", "Hai con chó."]


def _report(tmp_path: Path, manifest: Manifest, records: list[Record], captions: list[str]) -> dict:
    return score_report(
        run_dir=tmp_path / "run",
        kind="vicap",
        system="vicap",
        step=7,
        split="test",
        manifest=manifest,
        records=records,
        captions=captions,
        skipped=1,
        eval_cfg=EvalConfig(levels=("syllable", "word"), metrics=("BLEU", "CIDEr-D", "chrF")),
        generate={"strategy": "greedy", "precision": "fp32"},
    )


def test_score_report_scores_and_writes_nothing(tmp_path: Path) -> None:
    manifest, records, captions = _captioned_split(tmp_path, "a.jpg")
    report = _report(tmp_path, manifest, records, captions)
    assert list(tmp_path.iterdir()) == []
    refs = {r.image_id: list(r.captions) for r in records}
    expected, notes = score_systems(
        refs,
        {"vicap": dict(zip(refs, captions, strict=True)), FLOOR: dict.fromkeys(refs, "một con mèo")},
        language="vi",
        levels=("syllable", "word"),
        metrics=("BLEU", "CIDEr-D", "chrF"),
    )
    assert report["scores"] == expected and report["protocol"]["metrics"] == notes
    assert set(report["scores"]["word"]) == {"vicap", FLOOR, HUMAN}
    assert (report["images"], report["references"], report["skipped"], report["human_rounds"]) == (2, 3, 1, 2)
    assert report["baseline_caption"] == "một con mèo" and report["run"] == str(tmp_path / "run")


@pytest.mark.parametrize("image", ["a.jpg", "ảnh mèo.jpg"], ids=["ascii", "non-ASCII kept readable"])
def test_write_report_writes_the_three_files_as_before(tmp_path: Path, image: str) -> None:
    manifest, records, captions = _captioned_split(tmp_path, image)
    report = _report(tmp_path, manifest, records, captions)
    write_report(tmp_path / "run", report, manifest, records, captions)
    folder = os.path.realpath(tmp_path)
    # What `vicap evaluate` wrote before scoring and reporting were split, byte for byte.
    before = {
        "captions_test.jsonl": (
            f'{{"image_id": "t1", "image": "{image}", "path": "{folder}/{image}", "caption": "Một con mèo đen.", '
            '"references": ["một con mèo đen", "con mèo đen nằm"]}\n'
            f'{{"image_id": "t2", "image": "b.jpg", "path": "{folder}/b.jpg", "caption": "Hai con chó.", '
            '"references": ["hai con chó chạy"]}\n'
        ),
        "report.json": json.dumps(report, indent=2, ensure_ascii=False),
        "report.md": report_markdown(report),
    }
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert files == {name: text.encode("utf-8") for name, text in before.items()}


def test_write_report_writes_a_name_that_is_not_utf8_as_its_escape(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # "caf\udce9.jpg"
    manifest, records, captions = _captioned_split(tmp_path, name)
    report = _report(tmp_path, manifest, records, captions)
    write_report(tmp_path / "run", report, manifest, records, captions)
    text = {p.name: p.read_bytes().decode("utf-8") for p in (tmp_path / "run").iterdir()}  # valid UTF-8
    assert sorted(text) == ["captions_test.jsonl", "report.json", "report.md"]
    row = json.loads(text["captions_test.jsonl"].splitlines()[0])
    assert (
        os.fsencode(row["image"]) == b"caf\xe9.jpg"
        and '"image": "caf\\udce9.jpg"' in text["captions_test.jsonl"]
    )
    assert json.loads(text["report.json"]) == report
    assert "caf\\udce9.jpg" in text["report.md"]  # the six characters, as on the terminal


def test_write_report_that_cannot_be_built_keeps_the_old_files(tmp_path: Path) -> None:
    manifest, records, captions = _captioned_split(tmp_path, "a.jpg")
    report = _report(tmp_path, manifest, records, captions)
    write_report(tmp_path / "run", report, manifest, records, captions)
    old = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_report(
            tmp_path / "run", {**report, "generate": {"seed": object()}}, manifest, records[:1], captions[:1]
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == old
