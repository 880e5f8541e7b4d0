"""The manifest format: round trip, relative image paths, errors that name file and line."""

import json
import os

import pytest

from data_prep.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest

META = {"dataset": "toy", "language": "vi", "source_files": ["a.json"]}


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "manifest.jsonl"
    recs = [
        Record("1", "../img/a.jpg", "train", ("Một con mèo.", "Con mèo nằm."), ("10", "11")),
        Record("2", "../img/b.jpg", "test", ("Hai người.",), ("12",)),
    ]
    write_manifest(path, recs, META)
    m = read_manifest(path)
    assert isinstance(m, Manifest)
    assert m.records == recs
    assert m.meta["vicap_manifest"] == 1 and m.meta["source_files"] == ["a.json"]
    assert m.language == "vi"
    assert [r.image_id for r in m.split("train")] == ["1"]
    assert m.resolve_image(recs[0]) == (tmp_path / "img" / "a.jpg").resolve()
    # UTF-8 kept readable, not \u escapes
    assert "Một con mèo" in path.read_text(encoding="utf-8")


def test_relative_image_path(tmp_path):
    from data_prep.manifest import relative_image_path

    out = tmp_path / "m" / "manifest.jsonl"
    assert relative_image_path(tmp_path / "img" / "a.jpg", out) == "../img/a.jpg"


def test_write_requires_dataset_and_language(tmp_path):
    with pytest.raises(ValueError, match="language"):
        write_manifest(tmp_path / "m.jsonl", [], {"dataset": "x"})


def test_record_length_mismatch():
    with pytest.raises(ValueError, match="caption_ids"):
        Record("1", "a.jpg", "train", ("a", "b"), ("1",))


HEADER = json.dumps({"vicap_manifest": 1, "dataset": "toy", "language": "vi"})
GOOD = json.dumps(
    {"image_id": "1", "image": "a.jpg", "split": "train", "captions": ["x"], "caption_ids": ["1"]}
)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([GOOD], r":1: header missing"),
        ([HEADER, "{not json"], r":2: invalid JSON"),
        (
            [HEADER, GOOD, json.dumps({"image_id": "2", "image": "b.jpg", "split": "train"})],
            r":3: missing key\(s\) captions, caption_ids",
        ),
        (
            [
                HEADER,
                json.dumps(
                    {
                        "image_id": "1",
                        "image": "a.jpg",
                        "split": "train",
                        "captions": ["x", "y"],
                        "caption_ids": ["1"],
                    }
                ),
            ],
            r":2: 2 captions but 1 caption_ids",
        ),
        (
            [
                HEADER,
                json.dumps(
                    {"image_id": 1, "image": "a.jpg", "split": "t", "captions": [], "caption_ids": []}
                ),
            ],
            r":2: 'image_id' must be a string",
        ),
        (
            [json.dumps({"vicap_manifest": 99, "dataset": "toy", "language": "vi"})],
            r":1: unsupported manifest version",
        ),
        ([], r"empty file"),
        (
            [HEADER, GOOD, GOOD.replace('"x"', '"café"').encode("latin-1")],  # a Latin-1 line
            r":3: not UTF-8 text \(byte 0xe9 at byte 72 of the line",
        ),
        ([HEADER.encode("utf-8")[:-2] + b"\xff}"], r":1: not UTF-8 text \(byte 0xff"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n")
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vicap prepare"):
        read_manifest(tmp_path / "nope.jsonl")


def test_image_path_outside_any_shared_folder_is_absolute(tmp_path):
    from data_prep.manifest import relative_image_path

    assert relative_image_path("/a/b.jpg", "/c/manifest.jsonl") == "/a/b.jpg"
    assert relative_image_path("/c/img/b.jpg", "/c/out/manifest.jsonl") == "../img/b.jpg"


# (case, image path, captions): text that must come back exactly as written, one record per line
ROUND_TRIPS = [
    ("file name not UTF-8", os.fsdecode(b"img/caf\xe9.jpg"), ("Một con mèo.",)),
    ("line separators in a caption", "img/a.jpg", ("Một\u2028con\u2029mèo\x85.", "Hai\x0bngười\x0c.")),
    ("backslashes and quotes", 'img/a\\b "c".jpg', ('"Xin chào" \\ tạm biệt',)),
]


@pytest.mark.parametrize(("image", "captions"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_any_text_round_trips_and_the_file_stays_utf8(tmp_path, image, captions):
    path = tmp_path / "m.jsonl"
    recs = [Record("1", image, "train", captions, tuple(str(i) for i in range(len(captions))))]
    write_manifest(path, recs + [Record("2", "img/b.jpg", "train", ("x",), ("9",))], META)
    path.read_bytes().decode("utf-8")
    assert len(path.read_bytes().split(b"\n")) == 4  # header, two records, final newline
    assert read_manifest(path).records[0] == recs[0]


def test_resolve_image_leaves_a_link_loop_to_the_image_loader(tmp_path):
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    m = Manifest(tmp_path / "m.jsonl", META)
    assert m.resolve_image(Record("1", "loop.jpg", "test", (), ())) == tmp_path / "loop.jpg"


def test_a_failed_write_leaves_the_old_manifest_and_no_temp_file(tmp_path):
    path = tmp_path / "m.jsonl"
    old = [Record("1", "a.jpg", "train", ("x",), ("1",))]
    write_manifest(path, old, META)

    def records():
        yield Record("2", "b.jpg", "train", ("y",), ("2",))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_manifest(path, records(), META)
    assert read_manifest(path).records == old and list(tmp_path.iterdir()) == [path]


def _copy_tree(src, dst) -> None:
    import shutil

    shutil.copytree(src, dst)


# (case, what is copied where, the folder the image is expected in, warned)
MOVES = [
    ("not moved", None, "project", False),
    ("moved with its images", lambda t: _copy_tree(t / "project", t / "copy"), "copy", False),
    # a run folder copied elsewhere: its manifest's "../data/a.jpg" no longer leads to the images
    ("moved without its images", lambda t: _copy_tree(t / "project" / "run", t / "else" / "deep" / "run"), "project", True),
    ("moved, images gone everywhere", lambda t: _copy_tree(t / "project" / "run", t / "else" / "deep" / "run") or (t / "project" / "data" / "a.jpg").unlink(), "else/deep", False),
]  # fmt: skip


@pytest.mark.parametrize(("case", "move", "expected", "warned"), MOVES, ids=[m[0] for m in MOVES])
def test_a_moved_manifest_still_finds_its_images(tmp_path, caplog, case, move, expected, warned):
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "a.jpg").write_bytes(b"x")
    path = tmp_path / "project" / "run" / "manifest.jsonl"
    write_manifest(path, [Record("1", "../data/a.jpg", "train", ("một",), ("1",))], META)
    if move is not None:
        move(tmp_path)
        path = {"copy": tmp_path / "copy" / "run", "project": tmp_path / "else" / "deep" / "run"}.get(
            expected, tmp_path / "else" / "deep" / "run"
        ) / "manifest.jsonl"
    m = read_manifest(path)
    assert m.resolve_image(m.records[0]) == (tmp_path / expected / "data" / "a.jpg").resolve()
    assert ("moved away from its images" in caplog.text) == warned
    # written again where it now is, it records the new folder and still leads to the same image
    write_manifest(path, m.records, m.meta)
    again = read_manifest(path)
    assert again.meta["written_in"] == str(path.parent)
    assert again.resolve_image(again.records[0]) == m.resolve_image(m.records[0])
