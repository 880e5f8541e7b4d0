"""`vicap caption` on folders with broken files in them, manifests, JSONL/CSV output, n-best, --strict."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from data_prep.images import MAX_PIXELS
from data_prep.manifest import Record, write_manifest
from tests.conftest import tiny_recipe_overrides
from vicap.captioner import caption_images, collect_images
from vicap.cli import app
from vicap.images import ImageError
from vicap.recipe import load_recipe
from vicap.train import train

GREEDY = ["--set", "generate.strategy=greedy", "--workers", "0"]
# PIL warns about the over-the-limit PNG before load_image refuses it by name
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ktvic_dir: Path, tiny_lm_dir: Path, tiny_clip_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("caption-run")
    overrides = tiny_recipe_overrides(tmp, ktvic_dir, tiny_lm_dir, tiny_clip_dir, **{"train.epochs": "1"})
    return train(load_recipe("demo_vi_synthetic", overrides), progress=False)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: 'huge' without the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ktvic_dir: Path) -> tuple[Path, list[str], list[str]]:
    """A folder of good images in every awkward mode, plus broken files: (root, good, bad) relative names."""
    root = tmp_path_factory.mktemp("photos")
    photos = sorted((ktvic_dir / "public-test-images").glob("*.jpg"))
    base = Image.open(photos[0]).convert("RGB")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes(photos[0].read_bytes())
    (root / "nested" / "b.JPG").write_bytes(photos[1].read_bytes())
    base.convert("L").save(root / "nested" / "gray.png")
    base.convert("CMYK").save(root / "nested" / "cmyk.jpg")
    base.convert("P").save(root / "nested" / "deeper" / "palette.gif")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    base.save(root / "rotated.jpg", exif=exif)
    good = ["a.jpg", "alpha.png", "nested/b.JPG", "nested/cmyk.jpg", "nested/deeper/palette.gif"]
    good += ["nested/gray.png", "rotated.jpg"]
    # broken ones
    (root / "truncated.jpg").write_bytes(photos[2].read_bytes()[:300])
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "empty.jpg").write_bytes(b"")
    side = int(MAX_PIXELS**0.5) + 100
    (root / "nested" / "huge.png").write_bytes(_png_header_only(side, side))
    bad = ["empty.jpg", "nested/huge.png", "notes.jpg", "truncated.jpg"]
    # not collected: other suffixes and hidden AppleDouble files
    (root / "readme.txt").write_text("not an image")
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    return root, good, bad


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_collect_images_walks_folders_and_skips_hidden_and_other_files(folder) -> None:
    root, good, bad = folder
    found, unwalkable = collect_images([root, root / "a.jpg"])  # a repeated file is captioned once
    assert sorted(str(p.relative_to(root)) for p in found) == sorted(good + bad) and unwalkable == []


def test_folder_with_broken_files(run_dir: Path, folder) -> None:
    root, good, bad = folder
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(root), *GREEDY])
    assert res.exit_code == 0, res.output
    rows = _rows(res.stdout)
    assert sorted(str(Path(r["image"]).relative_to(root)) for r in rows) == sorted(good)
    for r in rows:
        assert set(r) == {"image", "caption", "score"}
        assert isinstance(r["caption"], str) and r["score"] <= 0
    for name in bad:
        assert f"skipped {root / name}:" in res.stderr
    assert "unreadable image" in res.stderr and "pixel limit" in res.stderr
    assert f"captioned {len(good)} image(s); skipped {len(bad)} unusable file(s)" in res.stderr


def test_strict_fails_on_the_first_bad_file(run_dir: Path, folder) -> None:
    root, _, _ = folder
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(root), "--strict", *GREEDY])
    assert res.exit_code == 1
    assert "(--strict)" in res.stderr and str(root / "empty.jpg") in res.stderr


def test_missing_path_is_reported_like_a_bad_file(run_dir: Path, folder, tmp_path: Path) -> None:
    root, _, _ = folder
    res = CliRunner().invoke(
        app, ["caption", str(run_dir), str(root / "a.jpg"), str(tmp_path / "nope.jpg"), *GREEDY]
    )
    assert res.exit_code == 0, res.output
    assert len(_rows(res.stdout)) == 1 and "nope.jpg: image file not found" in res.stderr


def test_csv_output_with_n_best(run_dir: Path, folder, tmp_path: Path) -> None:
    root, good, _ = folder
    out = tmp_path / "caps.csv"
    args = ["caption", str(run_dir), str(root), "--out", str(out), "--n-best", "2"]
    res = CliRunner().invoke(app, [*args, "--set", "generate.beam_size=3", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and f"wrote {out}" in res.stderr
    with open(out, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(good)
    assert list(table[0]) == ["image", "caption", "score", "caption_2", "score_2"]
    for r in table:
        assert float(r["score"]) >= float(r["score_2"])


def test_jsonl_output_from_a_manifest(run_dir: Path, folder, tmp_path: Path) -> None:
    root, good, _ = folder
    manifest = tmp_path / "m.jsonl"
    records = [Record(str(i), str(root / name), "test", ("x",), ("0",)) for i, name in enumerate(good[:3])]
    write_manifest(manifest, records, {"dataset": "folder", "language": "vi"})
    out = tmp_path / "caps.jsonl"
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(manifest), "-o", str(out), "--n-best", "3"])
    assert res.exit_code == 0, res.output
    rows = _rows(out.read_text(encoding="utf-8"))
    assert [Path(r["image"]) for r in rows] == [(root / n).resolve() for n in good[:3]]
    for r in rows:
        assert len(r["n_best"]) == 3 and r["n_best"][0] == {"caption": r["caption"], "score": r["score"]}
        scores = [c["score"] for c in r["n_best"]]
        assert scores == sorted(scores, reverse=True)


def test_settings_come_from_the_recipe_and_can_be_overridden(run_dir: Path, folder) -> None:
    root, _, _ = folder
    runner = CliRunner()
    image = str(root / "a.jpg")
    beam = _rows(runner.invoke(app, ["caption", str(run_dir), image, "--workers", "0"]).stdout)
    beam1 = _rows(
        runner.invoke(app, ["caption", str(run_dir), image, "--set", "generate.beam_size=1"]).stdout
    )
    greedy = _rows(runner.invoke(app, ["caption", str(run_dir), image, *GREEDY]).stdout)
    assert beam1[0]["caption"] == greedy[0]["caption"]
    assert len(beam) == 1
    # a setting the recipe rejects, a bad output name: clear errors, exit code 2
    res = runner.invoke(app, ["caption", str(run_dir), image, "--n-best", "2", *GREEDY])
    assert res.exit_code == 2 and "generate.n_best" in res.stderr
    res = runner.invoke(app, ["caption", str(run_dir), image, "--out", "caps.txt"])
    assert res.exit_code == 2 and "must end in .jsonl or .csv" in res.stderr
    # captions longer than the LM has positions for (the tiny GPT-2 has 64, the prefix takes 2)
    too_long = ["--set", "generate.max_new_tokens=200", "--set", "generate.min_new_tokens=200"]
    res = runner.invoke(app, ["caption", str(run_dir), image, *too_long])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "generate.max_new_tokens = 200: the prefix (2) + start tokens (0)" in res.stderr
    assert "has 64 positions; set generate.max_new_tokens to at most 62" in res.stderr


def test_caption_images_yields_rows_in_input_order(run_dir: Path, folder) -> None:
    root, _, _ = folder
    paths = [root / "notes.jpg", root / "a.jpg", root / "empty.jpg", root / "alpha.png"]
    rows = list(
        caption_images(run_dir, paths, ["generate.strategy=greedy", "generate.batch_size=3"], num_workers=0)
    )
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert ["error" in r for r in rows] == [True, False, True, False]
    with pytest.raises(ImageError, match="notes.jpg"):
        list(caption_images(run_dir, paths, ["generate.strategy=greedy"], strict=True, num_workers=0))


def test_stdout_is_only_json(run_dir: Path, folder) -> None:
    root, good, _ = folder
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(root), *GREEDY])
    assert len(_rows(res.stdout)) == len(good)  # every stdout line parses; reports go to stderr
    assert io.StringIO(res.stdout).read().count("\n") == len(good)


# ---------------------------------------------------------------------------------------- hostile paths


def _loop_named(root: Path, tmp: Path) -> list[str]:
    (root / "loop.jpg").symlink_to("loop.jpg")
    return [str(root / "a.jpg"), str(root / "loop.jpg")]


def _loop_in_manifest(root: Path, tmp: Path) -> list[str]:
    (root / "loop.jpg").symlink_to("loop.jpg")
    records = [
        Record(str(i), str(root / n), "test", ("x",), ("0",)) for i, n in enumerate(["a.jpg", "loop.jpg"])
    ]
    write_manifest(tmp / "m.jsonl", records, {"dataset": "folder", "language": "vi"})
    return [str(tmp / "m.jsonl")]


def _loops_in_folder(root: Path, tmp: Path) -> list[str]:
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "sub").mkdir()
    (root / "sub" / "back").symlink_to("..")
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(root / "pipe.jpg")
    return [str(root)]


# (case, what is added to a folder holding a.jpg and caf\xe9.jpg -> paths to caption, rows, skipped files
# and what stderr says about them)
HOSTILE_PATHS = [
    ("symlink loop named", _loop_named, 1, ["loop.jpg: symbolic link loop"]),
    ("symlink loop in a manifest", _loop_in_manifest, 1, ["loop.jpg: symbolic link loop"]),
    (
        "loops, a broken link and a pipe in a folder",
        _loops_in_folder,
        2,
        [
            "loop.jpg: symbolic link loop",
            "back: symbolic link loop (leads back to",
            "gone.jpg: broken symbolic link (to nowhere.jpg)",
            "pipe.jpg: not a regular file",
        ],
    ),
]


@pytest.fixture
def odd_folder(ktvic_dir: Path, tmp_path: Path) -> Path:
    """a.jpg and a JPEG whose file name is the Latin-1 bytes b"caf\\xe9.jpg" (not UTF-8)."""
    photos = sorted((ktvic_dir / "public-test-images").glob("*.jpg"))
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(photos[0].read_bytes())
    with open(os.fsencode(root) + b"/caf\xe9.jpg", "wb") as f:
        f.write(photos[1].read_bytes())
    return root


@pytest.mark.parametrize(
    ("add", "rows", "says"), [c[1:] for c in HOSTILE_PATHS], ids=[c[0] for c in HOSTILE_PATHS]
)
def test_hostile_paths_are_named_and_counted(
    run_dir: Path, odd_folder: Path, tmp_path, add, rows, says
) -> None:
    paths = add(odd_folder, tmp_path)
    res = CliRunner().invoke(app, ["caption", str(run_dir), *paths, *GREEDY])
    assert res.exit_code == 0, res.output
    assert len(_rows(res.stdout_bytes.decode("utf-8"))) == rows
    for text in says:
        assert text in res.stderr
    assert f"captioned {rows} image(s); skipped {len(says)} unusable file(s)" in res.stderr
    strict = CliRunner().invoke(app, ["caption", str(run_dir), *paths, "--strict", *GREEDY])
    assert strict.exit_code == 1 and "(--strict)" in strict.stderr


def test_unreadable_sub_folder_is_named_and_counted(run_dir: Path, odd_folder: Path, monkeypatch) -> None:
    # chmod 000 does not stop root (tests may run as root), so the walker's listing is made to fail
    (odd_folder / "locked").mkdir()
    scandir = os.scandir

    def refuse(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("data_prep.images.os.scandir", refuse)
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(odd_folder), *GREEDY])
    assert res.exit_code == 0, res.output
    assert f"skipped {odd_folder / 'locked'}: cannot list this folder (Permission denied)" in res.stderr
    assert "captioned 2 image(s); skipped 1 unusable file(s)" in res.stderr


# (case, --out file or None for stdout): every row written, the output valid UTF-8, the name recoverable
OUTPUTS = [("jsonl", "caps.jsonl"), ("csv", "caps.csv"), ("stdout", None)]


@pytest.mark.parametrize("out", [c[1] for c in OUTPUTS], ids=[c[0] for c in OUTPUTS])
def test_any_file_name_is_written(run_dir: Path, odd_folder: Path, tmp_path: Path, out) -> None:
    args = ["caption", str(run_dir), str(odd_folder), *GREEDY]
    res = CliRunner().invoke(app, args + (["--out", str(tmp_path / out)] if out else []))
    assert res.exit_code == 0, res.output
    assert "captioned 2 image(s)" in res.stderr
    text = (tmp_path / out).read_bytes().decode("utf-8") if out else res.stdout_bytes.decode("utf-8")
    if out and out.endswith(".csv"):
        images = [r["image"] for r in csv.DictReader(io.StringIO(text))]
        assert images == [str(odd_folder / "a.jpg"), str(odd_folder) + "/caf\\udce9.jpg"]  # shown as \udcXX
    else:
        images = [r["image"] for r in _rows(text)]
        assert [os.fsencode(i) for i in images] == [
            os.fsencode(odd_folder) + b"/" + n for n in (b"a.jpg", b"caf\xe9.jpg")
        ]


# (case, --out or other option, expected message): the user's path or value, named; exit 2, no traceback
BAD_OUTPUTS = [
    ("folder is a file", ["--out", "{tmp}/afile.txt/caps.jsonl"], "cannot write the output file"),
    ("a directory", ["--out", "{tmp}/adir.jsonl"], "cannot write the output file"),
    ("negative workers", ["--workers", "-1"], "--workers"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
def test_bad_output_options_are_clear_errors(
    run_dir: Path, odd_folder: Path, tmp_path: Path, case, args, message
) -> None:
    (tmp_path / "adir.jsonl").mkdir()
    (tmp_path / "afile.txt").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(odd_folder), *GREEDY, *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_stopped_run_never_empties_the_output_file(
    run_dir: Path, folder, tmp_path: Path, suffix: str
) -> None:
    root, _, _ = folder
    out = tmp_path / "new" / f"caps{suffix}"  # a missing folder is created
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(root / "a.jpg"), "--out", str(out), *GREEDY])
    assert res.exit_code == 0, res.output
    before = out.read_bytes()
    assert before
    # --strict stops at a missing file before anything is captioned, or after a.jpg was: out is left
    # as it was either time, and the caption already made is kept beside it
    partial = out.with_name(f"caps.partial{suffix}")
    for names, kept in ((["missing.jpg", "a.jpg"], False), (["a.jpg", "missing.jpg"], True)):
        args = [*(str(root / n) for n in names), "--strict", "--out", str(out), *GREEDY]
        res = CliRunner().invoke(app, ["caption", str(run_dir), *args, "--set", "generate.batch_size=1"])
        assert res.exit_code == 1
        assert out.read_bytes() == before
        assert partial.exists() == kept and (str(partial) in res.stderr) == kept
    assert "a.jpg" in partial.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, partial.name])
    # a later complete run replaces out and removes the stopped run's file
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(root / "a.jpg"), "--out", str(out), *GREEDY])
    assert res.exit_code == 0 and out.read_bytes() == before and not partial.exists()
