"""Every dataset adapter, on small fixture files in that dataset's exact published layout."""

import json

import pytest
from PIL import Image

from data_prep.datasets import ADAPTERS, prepare
from data_prep.manifest import read_manifest


def _jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 120, 200)).save(path, format="JPEG")


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def make_uitviic(tmp):
    """uitviic_captions_{train,val,test}2017.json; images in a COCO folder with train2017/."""
    src, coco = tmp / "uit-viic", tmp / "coco"
    for split, ids in {"train": [1, 2], "val": [3], "test": [4]}.items():
        imgs = [
            {
                "license": 1,
                "file_name": f"{i:012d}.jpg",
                "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
                "height": 16,
                "width": 16,
                "id": i,
            }
            for i in ids
        ]
        anns = [
            {"image_id": i, "caption": f"Cầu thủ số {i} đang đá bóng", "id": i * 100 + k}
            for i in ids
            for k in range(2)
        ]
        _json(src / f"uitviic_captions_{split}2017.json", {"images": imgs, "annotations": anns})
        for i in ids:
            if i != 2:  # image 2 is missing
                _jpeg(coco / "train2017" / f"{i:012d}.jpg")
    return src, {"images": coco}


def make_coco(tmp):
    src = tmp / "annotations"
    imgs = [
        {
            "id": 9,
            "file_name": "000000000009.jpg",
            "coco_url": "http://images.cocodataset.org/val2017/000000000009.jpg",
        }
    ]
    anns = [
        {"id": 1, "image_id": 9, "caption": "A plate of food ."},
        {"id": 2, "image_id": 9, "caption": "Food !"},
    ]
    _json(src / "captions_val2017.json", {"images": imgs, "annotations": anns})
    _jpeg(tmp / "coco" / "val2017" / "000000000009.jpg")
    return src / "captions_val2017.json", {"images": tmp / "coco"}


def make_karpathy(tmp):
    """dataset_coco.json with train / restval / val / test; COCO images under train2014/ and val2014/."""
    images = []
    for n, (split, fp) in enumerate(
        [("train", "train2014"), ("restval", "val2014"), ("val", "val2014"), ("test", "val2014")]
    ):
        name = f"COCO_{fp}_{n:012d}.jpg"
        _jpeg(tmp / "coco" / fp / name)
        images.append(
            {
                "filepath": fp,
                "filename": name,
                "split": split,
                "imgid": n,
                "cocoid": 1000 + n,
                "sentids": [2 * n, 2 * n + 1],
                "sentences": [
                    {"tokens": ["a", "cat"], "raw": "A cat.", "imgid": n, "sentid": 2 * n},
                    {"tokens": ["a", "dog"], "raw": "A dog .", "imgid": n, "sentid": 2 * n + 1},
                ],
            }
        )
    _json(tmp / "karpathy" / "dataset_coco.json", {"dataset": "coco", "images": images})
    return tmp / "karpathy" / "dataset_coco.json", {"images": tmp / "coco"}


def make_flickr8k(tmp):
    """Flickr8k_text/: Flickr8k.token.txt + split files; images in Flicker8k_Dataset/ (sic)."""
    text, imgs = tmp / "Flickr8k_text", tmp / "Flicker8k_Dataset"
    text.mkdir()
    names = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]
    for n in names:
        _jpeg(imgs / n)
    lines = [f"{n}#{k}\tA child in a pink dress number {k} ." for n in names for k in range(2)]
    lines.append("2258277193_586949ec62.jpg.1#0\tA stray caption from the release .")  # in no split file
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, n in zip(["train", "dev", "test"], names, strict=True):
        (text / f"Flickr_8k.{split}Images.txt").write_text(n + "\n", encoding="utf-8")
    return text, {}


def make_table(tmp):
    rows = 'image,caption,split\nimgs/a.jpg,"Một con mèo, đang ngủ",train\nimgs/a.jpg,Con mèo nằm,train\nimgs/b.jpg,Hai con chó,dev\n'
    (tmp / "data").mkdir()
    (tmp / "data" / "caps.csv").write_text(rows, encoding="utf-8")
    _jpeg(tmp / "data" / "imgs" / "a.jpg")
    _jpeg(tmp / "data" / "imgs" / "b.jpg")
    return tmp / "data" / "caps.csv", {"language": "vi"}


def make_folder(tmp):
    folder = tmp / "photos"
    for n in ("a.jpg", "b.jpg", "uncaptioned.jpg"):
        _jpeg(folder / n)
    (folder / "captions.txt").write_text("a.jpg\tA red bus .\nb.jpg\tA blue car\n", encoding="utf-8")
    return folder, {}


FIXTURES = {
    "ktvic": None,  # tested in test_data_prep_ktvic.py
    "uitviic": make_uitviic,
    "coco": make_coco,
    "karpathy": make_karpathy,
    "flickr8k": make_flickr8k,
    "table": make_table,
    "folder": make_folder,
}


def test_every_adapter_has_a_fixture():
    assert set(ADAPTERS) == set(FIXTURES)


def _run(tmp_path, name, **kw):
    src, opts = FIXTURES[name](tmp_path)
    out = tmp_path / "out" / f"{name}.jsonl"
    report = prepare(name, src, out, **opts, **kw)
    c = report.counts
    assert c["captions_read"] == c["captions"] + c["captions_skipped"], report.format()
    assert c["images_read"] == c["images"] + c["images_skipped"], report.format()
    m = read_manifest(out)
    for r in m.records:
        assert m.resolve_image(r).is_file()
    return report, m


def test_uitviic(tmp_path):
    report, m = _run(tmp_path, "uitviic")
    assert m.language == "vi" and m.meta["source_files"][0] == "uitviic_captions_train2017.json"
    assert report.splits == {
        "train": {"images": 1, "captions": 2},
        "val": {"images": 1, "captions": 2},
        "test": {"images": 1, "captions": 2},
    }
    assert report.problem_counts() == {"missing_image": 1}
    p = report.problems[0]
    assert (p.file, p.line_or_id) == ("uitviic_captions_train2017.json", "image 2")
    assert m.records[0].image.endswith("coco/train2017/000000000001.jpg")
    assert m.records[0].caption_ids == ("100", "101")


def test_uitviic_images_directly_in_folder(tmp_path):
    src, _ = make_uitviic(tmp_path)
    report = prepare("uitviic", src, tmp_path / "m.jsonl", images=tmp_path / "coco" / "train2017")
    assert report.counts["images"] == 3


def test_uitviic_missing_split_file(tmp_path):
    src, opts = make_uitviic(tmp_path)
    (src / "uitviic_captions_val2017.json").unlink()
    report = prepare("uitviic", src, tmp_path / "m.jsonl", **opts)
    assert report.problem_counts() == {"missing_image": 1, "missing_file": 1}


def test_coco(tmp_path):
    report, m = _run(tmp_path, "coco")
    assert report.ok and m.language == "en"
    assert m.records[0].split == "val" and m.records[0].captions == ("A plate of food.", "Food!")


def test_karpathy(tmp_path):
    report, m = _run(tmp_path, "karpathy")
    assert report.ok
    assert [(r.image_id, r.split) for r in m.records] == [
        ("1000", "train"),
        ("1001", "train"),
        ("1002", "val"),
        ("1003", "test"),
    ]
    assert m.records[0].captions == ("A cat.", "A dog.") and m.records[0].caption_ids == ("0", "1")
    assert m.meta["karpathy_dataset"] == "coco"


def test_karpathy_flickr(tmp_path):
    images = [
        {
            "filename": "1000268201_693b08cb0e.jpg",
            "split": "train",
            "imgid": 0,
            "sentences": [{"raw": "A girl .", "sentid": 0}],
        },
        {
            "filename": "1001773457_577c3a7d70.jpg",
            "split": "bogus",
            "imgid": 1,
            "sentences": [{"raw": "Dogs", "sentid": 1}],
        },
    ]
    _json(tmp_path / "dataset_flickr8k.json", {"dataset": "flickr8k", "images": images})
    _jpeg(tmp_path / "img" / "1000268201_693b08cb0e.jpg")
    report = prepare("karpathy", tmp_path, tmp_path / "m.jsonl", images=tmp_path / "img")
    assert report.problem_counts() == {"no_split": 1}
    assert [r.image_id for r in read_manifest(tmp_path / "m.jsonl").records] == ["1000268201_693b08cb0e"]


def test_flickr8k(tmp_path):
    report, m = _run(tmp_path, "flickr8k")
    assert [(r.image_id, r.split) for r in m.records] == [
        ("1000268201_693b08cb0e", "train"),
        ("1001773457_577c3a7d70", "val"),
        ("1002674143_1b742ab4b8", "test"),
    ]
    assert m.records[0].caption_ids == ("1000268201_693b08cb0e.jpg#0", "1000268201_693b08cb0e.jpg#1")
    assert m.records[0].captions[0] == "A child in a pink dress number 0."
    assert report.problem_counts() == {"no_split": 1}
    assert report.problems[0].line_or_id == "line 7"


def test_flickr8k_bad_line(tmp_path):
    text, _ = make_flickr8k(tmp_path)
    with (text / "Flickr8k.token.txt").open("a", encoding="utf-8") as f:
        f.write("garbage line without tab\n")
    report = prepare("flickr8k", text, tmp_path / "m.jsonl")
    assert ("bad_entry", "Flickr8k.token.txt", "line 8") in {
        (p.kind, p.file, p.line_or_id) for p in report.problems
    }


def test_table_csv(tmp_path):
    report, m = _run(tmp_path, "table")
    assert report.ok and m.language == "vi"
    a, b = m.records
    assert a.image_id == "imgs/a.jpg" and a.captions == ("Một con mèo, đang ngủ", "Con mèo nằm")
    assert a.caption_ids == ("caps.csv:2", "caps.csv:3") and b.split == "val"


def test_table_jsonl_and_tsv(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    rows = [
        {"file": "a.jpg", "text": ["one", "two"], "id": "x"},
        {"file": "missing.jpg", "text": "three"},
        {"text": "no image"},
    ]
    (tmp_path / "caps.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n{broken\n", encoding="utf-8"
    )
    report = prepare(
        "table",
        tmp_path / "caps.jsonl",
        tmp_path / "m.jsonl",
        image_column="file",
        caption_column="text",
        id_column="id",
    )
    assert report.problem_counts() == {"bad_entry": 2, "missing_image": 1}
    assert read_manifest(tmp_path / "m.jsonl").records[0].caption_ids == ("x#0", "x#1")
    (tmp_path / "caps.tsv").write_text("image\tcaption\na.jpg\tone\na.jpg\n", encoding="utf-8")
    report = prepare("table", tmp_path / "caps.tsv", tmp_path / "m2.jsonl")
    assert report.counts["captions"] == 1 and report.problem_counts() == {"bad_entry": 1}


def test_table_missing_column(tmp_path):
    (tmp_path / "c.csv").write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.csv:1: no column 'image'"):
        prepare("table", tmp_path / "c.csv", tmp_path / "m.jsonl")


def test_folder(tmp_path):
    report, m = _run(tmp_path, "folder")
    assert [r.image_id for r in m.records] == ["a.jpg", "b.jpg"]
    assert (
        m.records[0].captions == ("A red bus .",) and m.language == "generic"
    )  # generic: no punctuation rules
    assert report.problem_counts() == {"no_captions": 1}
    assert report.problems[0].file == "uncaptioned.jpg"


def test_folder_without_captions_file(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        prepare("folder", tmp_path / "f", tmp_path / "m.jsonl")
