"""KTVIC adapter and the shared prepare() checks, on fixture files in KTVIC's exact layout."""

import io
import json
import unicodedata

import pytest
from PIL import Image

from data_prep.datasets import ADAPTERS, DataError, get_adapter, prepare
from data_prep.datasets.jsonio import SourceError
from data_prep.errors import SettingError
from data_prep.manifest import read_manifest


def _jpeg(path, color=(200, 30, 30), size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 80).convert("RGB").save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def make_ktvic(root, broken=True):
    """A tiny KTVIC: 4 good train images, 1 good test image, and (if broken) one of each bad case."""
    train_images = [{"id": i, "filename": f"{i:05d}.jpg"} for i in range(1, 5)]
    train_anns = []
    for i in range(1, 5):
        _jpeg(root / "train-images" / f"{i:05d}.jpg", color=(i * 40, 0, 0))
        for k in range(2):
            train_anns.append(
                {
                    "id": i * 10 + k,
                    "image_id": i,
                    "caption": f"Một người  đàn ông đang chơi quần vợt , ảnh {i} .",
                    "segment_caption": "Một người đàn_ông đang chơi quần_vợt .",
                }
            )
    test_images = [{"id": 100, "filename": "t100.jpg"}]
    test_anns = [{"id": 1000, "image_id": 100, "caption": "Hai cầu thủ hòa nhau", "segment_caption": "x"}]
    _jpeg(root / "public-test-images" / "t100.jpg")
    if broken:
        train_images += [
            {"id": 5, "filename": "missing.jpg"},
            {"id": 6, "filename": "trunc.jpg"},
            {"id": 7, "filename": "notimage.jpg"},
            {"id": 8, "filename": "nocaption.jpg"},
            {"id": 1, "filename": "dup.jpg"},  # duplicate image id
        ]
        _truncated_jpeg(root / "train-images" / "trunc.jpg")
        (root / "train-images" / "notimage.jpg").write_text("hello", encoding="utf-8")
        _jpeg(root / "train-images" / "nocaption.jpg")
        train_anns += [
            {"id": 50, "image_id": 5, "caption": "ảnh không có"},
            {"id": 60, "image_id": 6, "caption": "ảnh bị cắt"},
            {"id": 70, "image_id": 7, "caption": "không phải ảnh"},
            {"id": 80, "image_id": 8, "caption": "   "},  # whitespace-only
            {"id": 81, "image_id": 8, "caption": ""},  # empty
            {"id": 82, "image_id": 8, "caption": None},  # null
            {"id": 83, "image_id": 8, "caption": " . ` ]"},  # punctuation only
            {"id": 10, "image_id": 1, "caption": "trùng id"},  # duplicate caption id
            {"id": 90, "image_id": 999, "caption": "ảnh lạ"},  # unknown image
            {"id": 91, "image_id": 2, "caption": unicodedata.normalize("NFD", "Cô gái khỏe mạnh")},  # NFD
            {"id": 92, "image_id": 3, "caption": "một con mèo 猫"},  # unexpected script
            {"image_id": 3, "caption": "no id"},  # malformed entry
        ]
    _write(root / "train_data.json", {"images": train_images, "annotations": train_anns})
    _write(root / "test_data.json", {"images": test_images, "annotations": test_anns})
    return root


def test_registered():
    assert "ktvic" in ADAPTERS and get_adapter("ktvic").language == "vi"
    with pytest.raises(KeyError, match="known: .*ktvic"):
        get_adapter("nope")


def test_clean_dataset(tmp_path):
    src = make_ktvic(tmp_path / "ktvic", broken=False)
    out = tmp_path / "out" / "ktvic.jsonl"
    report = prepare("ktvic", src, out)
    assert report.ok, report.format()
    assert report.counts["images"] == 5 and report.counts["captions"] == 9
    assert report.splits == {"train": {"images": 4, "captions": 8}, "test": {"images": 1, "captions": 1}}
    m = read_manifest(out)
    assert m.language == "vi" and m.meta["dataset"] == "ktvic"
    r = m.split("train")[0]
    assert r.image_id == "1" and r.caption_ids == ("10", "11")
    assert r.captions[0] == "Một người đàn ông đang chơi quần vợt, ảnh 1."  # normalized
    assert m.split("test")[0].captions == ("Hai cầu thủ hoà nhau",)  # one tone style
    assert r.image == "../ktvic/train-images/00001.jpg"
    assert m.resolve_image(r) == (src / "train-images" / "00001.jpg").resolve()


def test_broken_dataset_is_reported(tmp_path):
    src = make_ktvic(tmp_path / "ktvic")
    out = tmp_path / "m.jsonl"
    report = prepare("ktvic", src, out)
    kinds = report.problem_counts()
    assert kinds == {
        "duplicate_image_id": 1,
        "duplicate_caption_id": 1,
        "unknown_image": 1,
        "empty_caption": 4,
        "nfd_text": 1,
        "unexpected_script": 1,
        "no_captions": 1,
        "missing_image": 1,
        "truncated_image": 1,
        "unreadable_image": 1,
        "bad_entry": 1,
    }
    where = {(p.kind, p.file, p.line_or_id) for p in report.problems}
    assert ("missing_image", "train_data.json", "image 5") in where
    assert ("unknown_image", "train_data.json", "annotation 90") in where
    assert ("duplicate_image_id", "train_data.json", "image 1") in where
    assert ("empty_caption", "train_data.json", "annotation 82") in where
    assert ("bad_entry", "train_data.json", "annotations[19]") in where
    # nothing dropped without being counted
    c = report.counts
    assert c["captions_read"] == c["captions"] + c["captions_skipped"]
    assert c["images_read"] == c["images"] + c["images_skipped"]
    assert c["images"] == 5 and c["captions"] == 10  # the NFD caption is fixed and kept
    m = read_manifest(out)
    two = next(r for r in m.records if r.image_id == "2")
    assert two.captions[-1] == "Cô gái khoẻ mạnh" and unicodedata.is_normalized("NFC", two.captions[-1])
    text = report.format(max_problems=1)
    assert "missing_image: train_data.json [image 5]" in text and "... and 3 more empty_caption" in text
    d = report.to_dict()
    assert d["problem_counts"]["empty_caption"] == 4 and len(d["problems"]) == len(report.problems)
    json.dumps(d)  # serializable


def test_strict_raises_with_report(tmp_path):
    src = make_ktvic(tmp_path / "ktvic")
    out = tmp_path / "m.jsonl"
    with pytest.raises(DataError, match="missing_image") as info:
        prepare("ktvic", src, out, strict=True)
    assert info.value.report.problem_counts()["missing_image"] == 1
    assert not out.exists()


def test_no_image_check(tmp_path):
    src = make_ktvic(tmp_path / "ktvic")
    report = prepare("ktvic", src, tmp_path / "m.jsonl", check_images=False)
    assert "truncated_image" not in report.problem_counts() and "missing_image" not in report.problem_counts()


def test_val_split_by_image_deterministic(tmp_path):
    src = make_ktvic(tmp_path / "ktvic", broken=False)
    a = prepare("ktvic", src, tmp_path / "a.jsonl", val_fraction=0.5, seed=3)
    prepare("ktvic", src, tmp_path / "b.jsonl", val_fraction=0.5, seed=3)
    assert a.splits["val"] == {"images": 2, "captions": 4} and a.splits["train"]["images"] == 2
    ids = lambda p: [(r.image_id, r.split) for r in read_manifest(p).records]  # noqa: E731
    assert ids(tmp_path / "a.jsonl") == ids(tmp_path / "b.jsonl")
    assert read_manifest(tmp_path / "a.jsonl").split("test")[0].image_id == "100"  # test untouched
    with pytest.raises(ValueError, match="val_fraction"):
        prepare("ktvic", src, tmp_path / "c.jsonl", val_fraction=1.5)


def test_ids_shared_between_files_are_scoped(tmp_path):
    root = tmp_path / "k"
    _jpeg(root / "train-images" / "a.jpg")
    _jpeg(root / "public-test-images" / "a.jpg")
    for name in ("train_data.json", "test_data.json"):
        _write(
            root / name,
            {
                "images": [{"id": 1, "filename": "a.jpg"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "x"}],
            },
        )
    report = prepare("ktvic", root, tmp_path / "m.jsonl")
    assert report.ok and report.counts["images"] == 2
    m = read_manifest(tmp_path / "m.jsonl")
    assert [r.image_id for r in m.records] == ["train/1", "test/1"] and m.meta["id_scope"] == "split"


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare("ktvic", tmp_path / "nope", tmp_path / "m.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_data.json"):
        prepare("ktvic", tmp_path / "empty", tmp_path / "m.jsonl")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_data.json").write_text('{"images": [\n  {"id": 1,}\n]}', encoding="utf-8")
    with pytest.raises(SourceError, match=r"train_data.json:2:\d+: invalid JSON"):
        prepare("ktvic", bad, tmp_path / "m.jsonl")
    with pytest.raises(SettingError, match="unknown option"):
        prepare("ktvic", bad, tmp_path / "m.jsonl", colour="red")


def test_missing_test_file_is_a_problem(tmp_path):
    src = make_ktvic(tmp_path / "k", broken=False)
    (src / "test_data.json").unlink()
    report = prepare("ktvic", src, tmp_path / "m.jsonl")
    assert report.problem_counts() == {"missing_file": 1} and "test" not in report.splits
