"""Every dataset adapter, on small fixture files in that dataset's exact published layout."""

import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data_prep.datasets import ADAPTERS, prepare
from data_prep.datasets.jsonio import SourceError
from data_prep.images import file_problem, walk_images
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


def make_webdataset(tmp):
    """img2dataset's shards: <key>.jpg, <key>.txt and <key>.json members, named by a brace pattern."""
    from io import BytesIO

    from tests.builders import write_shards

    def jpeg():
        out = BytesIO()
        Image.new("RGB", (16, 16), (10, 120, 200)).save(out, format="JPEG")
        return out.getvalue()

    samples = [
        {"__key__": f"{k:09d}", "jpg": jpeg(), "txt": f"A bus number {k} .", "json": {"status": "success"}}
        for k in range(3)
    ]
    write_shards(tmp / "shards", samples, per_shard=2)
    return tmp / "shards" / "{00000..00001}.tar", {}


FIXTURES = {
    "ktvic": None,  # tested in test_data_prep_ktvic.py
    "uitviic": make_uitviic,
    "coco": make_coco,
    "karpathy": make_karpathy,
    "flickr8k": make_flickr8k,
    "table": make_table,
    "folder": make_folder,
    "webdataset": make_webdataset,
    "text": None,  # no images: tested in test_text_only.py
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
        assert file_problem(m.resolve_image(r)) is None
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


def test_webdataset(tmp_path):
    report, m = _run(tmp_path, "webdataset")
    assert report.ok, report.format()
    assert [(r.image, r.member, r.captions) for r in m.records] == [
        ("../shards/00000.tar", "000000000.jpg", ("A bus number 0 .",)),
        ("../shards/00000.tar", "000000001.jpg", ("A bus number 1 .",)),
        ("../shards/00001.tar", "000000002.jpg", ("A bus number 2 .",)),
    ]
    first, second = (m.resolve_image(r) for r in m.records[:2])
    assert first.shard is second.shard  # one resolved path per shard, not one per image


def test_folder_without_captions_file(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        prepare("folder", tmp_path / "f", tmp_path / "m.jsonl")


# ---------------------------------------------------------------------------------------- hostile input

CSV_HEAD = "image,caption\n"
A, B, C = "a.jpg,A red bus\n", "b.jpg,A blue car\n", "c.jpg,A green tree\n"

# (case, file name, content, options, expected problems {kind: where}, captions kept)
BAD_TABLES = [
    (
        "quote left open swallows the rows after it",
        "c.csv",
        CSV_HEAD + 'a.jpg,"A red bus\n' + B + C,
        {},
        {"bad_entry": "lines 2-4"},
        0,
    ),
    (
        "quote left open on the last line",
        "c.csv",
        CSV_HEAD + A + B + 'c.jpg,"A green tree',
        {},
        {"bad_entry": "line 4"},
        2,
    ),
    (
        "quote closed rows later merges them",
        "c.csv",
        CSV_HEAD + 'a.jpg,"A red bus\nb.jpg,A blue car"\n' + C,
        {},
        {"bad_entry": "lines 2-3"},
        1,
    ),
    (
        "text after a closing quote",
        "c.csv",
        CSV_HEAD + 'a.jpg,"A red" bus\n' + B,
        {},
        {"bad_entry": "line 2"},
        1,
    ),
    (
        "a quote left open runs past the field size limit",
        "c.csv",
        CSV_HEAD + 'a.jpg,"A red bus\n' + "b.jpg,A blue car\n" * 8000 + C,
        {},
        {
            "bad_entry": "lines 2-7712"
        },  # csv's 131,072-character field limit; the lines after it are rows again
        291,
    ),
    ("quotes inside a field are text", "c.csv", CSV_HEAD + 'a.jpg,A "red" bus\n' + B, {}, {}, 2),
    (
        "U+2028 in a JSONL caption",
        "c.jsonl",
        '{"image": "a.jpg", "caption": "A red\u2028bus"}\n{"image": "b.jpg", "caption": "A\u0085blue\u2029car"}\n',
        {},
        {},
        2,
    ),
    ("U+2028 in a CSV caption", "c.csv", CSV_HEAD + "a.jpg,A red\u2028bus\n" + B, {}, {}, 2),
    (
        "a JSONL row without the caption key",
        "c.jsonl",
        '{"image": "a.jpg", "text": "x"}\n{"image": "b.jpg", "caption": "A blue car"}\n',
        {},
        {"bad_entry": "line 1"},
        1,
    ),
    ("old Mac line ends", "c.csv", (CSV_HEAD + A + B).replace("\n", "\r"), {}, {}, 2),
    ("Windows line ends and a BOM", "c.csv", "\ufeff" + (CSV_HEAD + A + B).replace("\n", "\r\n"), {}, {}, 2),
    (
        "2,000-character caption",
        "c.csv",
        CSV_HEAD + A + "b.jpg," + "word " * 400 + "\n",
        {},
        {"long_caption": "line 3", "no_captions": "line 3"},
        1,
    ),
    (
        "2,000-character caption, no limit",
        "c.csv",
        CSV_HEAD + A + "b.jpg," + "word " * 400 + "\n",
        {"max_caption_chars": None},
        {},
        2,
    ),
    (
        "lone surrogate in a JSON caption",
        "c.jsonl",
        '{"image": "a.jpg", "caption": "A red \\ud800 bus"}\n'
        + '{"image": "b.jpg", "caption": "A blue car"}\n',
        {},
        {"invalid_text": "line 1", "no_captions": "line 1"},
        1,
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "options", "problems", "kept"),
    [c[1:] for c in BAD_TABLES],
    ids=[c[0] for c in BAD_TABLES],
)
def test_bad_tables_are_reported_by_line(tmp_path, name, content, options, problems, kept):
    for image in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(tmp_path / image)
    (tmp_path / name).write_text(content, encoding="utf-8", newline="")
    report = prepare("table", tmp_path / name, tmp_path / "m.jsonl", language="en", **options)
    assert {p.kind: p.line_or_id for p in report.problems} == problems, report.format()
    assert report.counts["captions"] == kept
    for r in read_manifest(tmp_path / "m.jsonl").records:
        assert all("\n" not in c and "," not in c for c in r.captions)  # no rows run together


# (case, file name, content, options, error naming the file, line and what is wrong)
UNREADABLE_TABLES = [
    (
        "CSV without the caption column",
        "c.csv",
        "image,text\na.jpg,A red bus\n",
        {},
        r"c\.csv:1: no column 'caption' in header \['image', 'text'\]",
    ),
    (
        "JSONL without the caption key",
        "c.jsonl",
        '{"image": "a.jpg", "text": "x"}\n',
        {},
        r"c\.jsonl: no row has column\(s\) 'caption'; its columns are \['image', 'text'\]",
    ),
    (
        "a split column that is not there",
        "c.csv",
        CSV_HEAD + A,
        {"split_column": "part"},
        r"c\.csv: no row has column\(s\) 'part'",
    ),
    (
        "an id column that is not there",
        "c.csv",
        CSV_HEAD + A,
        {"id_column": "id"},
        r"c\.csv: no row has column\(s\) 'id'",
    ),
    (
        "Latin-1 CSV",
        "c.csv",
        (CSV_HEAD + "a.jpg,un café noir\n").encode("latin-1"),
        {},
        r"c\.csv:2: not UTF-8 text \(byte 0xe9 at byte 13 of the line",
    ),
    (
        "Latin-1 JSONL",
        "c.jsonl",
        '{"image": "a.jpg", "caption": "café"}\n'.encode("latin-1"),
        {},
        r"c\.jsonl:1: not UTF-8 text \(byte 0xe9",
    ),
    ("Latin-1 headerless TSV", "c.tsv", "a.jpg\tcafé\n".encode("latin-1"), {}, r"c\.tsv:1: not UTF-8 text"),
]


@pytest.mark.parametrize(
    ("name", "content", "options", "error"),
    [c[1:] for c in UNREADABLE_TABLES],
    ids=[c[0] for c in UNREADABLE_TABLES],
)
def test_unreadable_tables_are_errors_naming_the_file(tmp_path, name, content, options, error):
    _jpeg(tmp_path / "a.jpg")
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(SourceError, match=error) as info:
        prepare("table", path, tmp_path / "m.jsonl", language="en", **options)
    assert str(path) in str(info.value)
    assert not (tmp_path / "m.jsonl").exists()


# Every reader of a dataset's own text files: (adapter, the file made Latin-1)
TEXT_FILES = [
    ("uitviic", "uit-viic/uitviic_captions_train2017.json"),
    ("coco", "annotations/captions_val2017.json"),
    ("karpathy", "karpathy/dataset_coco.json"),
    ("flickr8k", "Flickr8k_text/Flickr8k.token.txt"),
    ("flickr8k", "Flickr8k_text/Flickr_8k.devImages.txt"),
    ("table", "data/caps.csv"),
    ("folder", "photos/captions.txt"),
]


@pytest.mark.parametrize(
    ("adapter", "name"), TEXT_FILES, ids=[f"{a}:{n.split('/')[-1]}" for a, n in TEXT_FILES]
)
def test_every_reader_names_a_file_that_is_not_utf8(tmp_path, adapter, name):
    src, opts = FIXTURES[adapter](tmp_path)
    path = tmp_path / name
    data = path.read_bytes()
    at = data.rindex(b"a")  # a Latin-1 "é" in place of the last "a"
    path.write_bytes(data[:at] + b"\xe9" + data[at + 1 :])
    line = data[:at].count(b"\n") + 1
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    with pytest.raises(
        SourceError, match=rf"{re.escape(str(path))}:{line}: not UTF-8 text \(byte 0xe9 at byte {column} "
    ):
        prepare(adapter, src, tmp_path / "m.jsonl", **opts)


def test_flickr8k_token_file_keeps_unicode_line_separators(tmp_path):
    text, _ = make_flickr8k(tmp_path)
    token = text / "Flickr8k.token.txt"
    lines = token.read_text(encoding="utf-8").split("\n")
    lines[0] = lines[0].replace("pink dress", "pink\u2028dress")
    token.write_text("\n".join(lines), encoding="utf-8")
    report = prepare("flickr8k", text, tmp_path / "m.jsonl")
    assert report.problem_counts() == {"no_split": 1} and report.counts["captions"] == 6


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: 'huge' without the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_prepare_refuses_images_over_the_pixel_limit_of_loading(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "huge.png").write_bytes(_png_header_only(11_000, 11_000))  # 121 MP
    (tmp_path / "c.csv").write_text(CSV_HEAD + A + "huge.png,A black square\n", encoding="utf-8")
    report = prepare("table", tmp_path / "c.csv", tmp_path / "m.jsonl", language="en")
    assert report.problem_counts() == {"oversized_image": 1}
    assert "11000x11000 is over the 100,000,000-pixel limit" in report.problems[0].message
    assert [r.image_id for r in read_manifest(tmp_path / "m.jsonl").records] == ["a.jpg"]


# ---------------------------------------------------------------------------------------- folder walks


def _link_loop(root):
    (root / "loop.jpg").symlink_to("loop.jpg")


def _folder_loop(root):
    (root / "sub" / "back").symlink_to("..")


def _self_loop(root):
    (root / "sub" / "self").symlink_to(".")


def _two_step_loop(root):
    (root / "x.jpg").symlink_to("y.jpg")
    (root / "y.jpg").symlink_to("x.jpg")


def _broken_image_link(root):
    (root / "gone.jpg").symlink_to("nowhere.jpg")


def _broken_other_link(root):
    (root / "notes.txt").symlink_to("nowhere.txt")  # not an image: nothing to report


def _pipe(root):
    os.mkfifo(root / "pipe.jpg")


def _linked_folder(root):
    _jpeg(root.parent / "elsewhere" / "c.jpg")
    (root / "more").symlink_to(root.parent / "elsewhere")
    (root / "again").symlink_to(root.parent / "elsewhere")  # one folder, two links: walked once


def _hidden(root):
    _jpeg(root / ".thumbs" / "t.jpg")
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")


def _non_utf8_name(root):
    _jpeg(Path(os.fsdecode(bytes(root) + b"/caf\xe9.jpg")))


# (case, what is added to a folder holding a.jpg and sub/b.jpg, images found beyond those, what is reported)
WALKS = [
    ("symlink loop", _link_loop, [], [("symlink_loop", "loop.jpg")]),
    ("two-link loop", _two_step_loop, [], [("symlink_loop", "x.jpg"), ("symlink_loop", "y.jpg")]),
    ("folder link back up", _folder_loop, [], [("symlink_loop", "sub/back")]),
    ("folder link to itself", _self_loop, [], [("symlink_loop", "sub/self")]),
    ("broken image link", _broken_image_link, [], [("missing_image", "gone.jpg")]),
    ("broken link to a non-image", _broken_other_link, [], []),
    ("pipe named .jpg", _pipe, [], [("unreadable_image", "pipe.jpg")]),
    ("linked folder", _linked_folder, ["again/c.jpg"], []),
    ("hidden entries", _hidden, [], []),
    ("name not UTF-8", _non_utf8_name, ["caf\udce9.jpg"], []),
]


def _walk_fixture(tmp_path, add):
    root = tmp_path / "photos"
    _jpeg(root / "a.jpg")
    _jpeg(root / "sub" / "b.jpg")
    add(root)
    return root


@pytest.mark.parametrize(("add", "extra", "skipped"), [c[1:] for c in WALKS], ids=[c[0] for c in WALKS])
def test_walk_images(tmp_path, add, extra, skipped):
    root = _walk_fixture(tmp_path, add)
    scan = walk_images(root)
    assert [p.relative_to(root).as_posix() for p in scan.images] == sorted(["a.jpg", "sub/b.jpg", *extra])
    assert [(k, p.relative_to(root).as_posix()) for k, p, _ in scan.skipped] == skipped


@pytest.mark.parametrize(("add", "extra", "skipped"), [c[1:] for c in WALKS], ids=[c[0] for c in WALKS])
def test_folder_adapter_reports_what_it_could_not_walk(tmp_path, add, extra, skipped):
    root = _walk_fixture(tmp_path, add)
    (root / "captions.txt").write_text("a.jpg\tA red bus\nsub/b.jpg\tA blue car\n", encoding="utf-8")
    report = prepare("folder", root, tmp_path / "m.jsonl")
    assert [(p.kind, p.file) for p in report.problems if p.kind != "no_captions"] == skipped
    assert sorted(p.file for p in report.problems if p.kind == "no_captions") == sorted(extra)
    assert report.counts["images"] == 2
    report.write(tmp_path / "m.report.json")
    for f in (tmp_path / "m.jsonl", tmp_path / "m.report.json"):
        f.read_bytes().decode("utf-8")  # every output stays UTF-8


def test_unreadable_sub_folder_is_reported(tmp_path, monkeypatch):
    # chmod 000 does not stop root (tests may run as root), so the walker's listing is made to fail
    root = _walk_fixture(tmp_path, lambda root: _jpeg(root / "locked" / "c.jpg"))
    (root / "captions.txt").write_text("a.jpg\tA red bus\n", encoding="utf-8")
    scandir = os.scandir

    def refuse(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("data_prep.images.os.scandir", refuse)
    report = prepare("folder", root, tmp_path / "m.jsonl")
    assert [(p.kind, p.file) for p in report.problems] == [
        ("unreadable_folder", "locked"),
        ("no_captions", "sub/b.jpg"),
    ]
    assert "cannot list this folder (Permission denied)" in report.problems[0].message


def test_non_utf8_file_name_round_trips_through_the_manifest(tmp_path):
    root = tmp_path / "photos"
    _jpeg(root / "a.jpg")
    name = os.fsdecode(b"caf\xe9.jpg")  # "caf\udce9.jpg"
    _jpeg(root / name)
    # a JSONL captions file can name it with the same escape the manifest uses
    rows = [{"image": "a.jpg", "caption": "A red bus"}, {"image": name, "caption": "A blue car"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = prepare("folder", root, tmp_path / "m.jsonl")
    assert report.ok, report.format()
    text = (tmp_path / "m.jsonl").read_bytes().decode("utf-8")
    assert "caf\\udce9.jpg" in text
    m = read_manifest(tmp_path / "m.jsonl")
    assert os.fsencode(m.resolve_image(m.records[1])).endswith(b"/caf\xe9.jpg")
    assert m.resolve_image(m.records[1]).is_file()
