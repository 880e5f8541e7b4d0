"""`prepare_command` through typer.testing.CliRunner on a tiny app, as vicap registers it."""

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from data_prep.cli import prepare_command, report_path
from data_prep.manifest import read_manifest
from tests.test_data_prep_ktvic import make_ktvic

runner = CliRunner()


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("prepare")(prepare_command)
    app.command("noop")(lambda: None)  # two commands, so "prepare" is a sub-command as in vicap
    return app


@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A word-level tokenizer saved in Hugging Face format: one id per whitespace token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["một người"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def test_prepare_clean(app, tmp_path, tiny_tokenizer):
    src = make_ktvic(tmp_path / "ktvic", broken=False)
    out = tmp_path / "out" / "ktvic.jsonl"
    res = runner.invoke(
        app, ["prepare", "ktvic", str(src), "--out", str(out), "--tokenizer", str(tiny_tokenizer)]
    )
    assert res.exit_code == 0, res.output
    assert "images:   5 written" in res.output and "captions per image: 1.80" in res.output
    assert "length in syllables:" in res.output and "length in words:" in res.output
    assert "problems: none" in res.output
    rep = json.loads(report_path(out).read_text(encoding="utf-8"))
    assert report_path(out).name == "ktvic.report.json"
    lengths = rep["stats"]["lengths"]
    # "Một người đàn ông đang chơi quần vợt, ảnh 1." : 10 syllables, 8 words after segmentation
    assert lengths["syllables"]["max"] == 10 and lengths["words"]["max"] == 8
    # the whitespace tokenizer sees one token per syllable, fewer once syllables are joined into words
    assert lengths["lm_tokens_segmented"]["mean"] < lengths["lm_tokens"]["mean"]
    assert rep["stats"]["vocab"]["syllables"] > 0 and rep["counts"]["images"] == 5
    assert len(read_manifest(out).records) == 5


def test_prepare_problems_listed_and_capped(app, tmp_path):
    src = make_ktvic(tmp_path / "ktvic")
    out = tmp_path / "m.jsonl"
    res = runner.invoke(
        app, ["prepare", "ktvic", str(src), "-o", str(out), "--max-problems", "1", "--val-fraction", "0.5"]
    )
    assert res.exit_code == 0, res.output
    assert "empty_caption: train_data.json [annotation 80]" in res.output
    assert "... and 3 more empty_caption" in res.output
    assert "split val:" in res.output
    assert len(json.loads(report_path(out).read_text())["problems"]) == 14  # all of them in the JSON


def test_prepare_strict_fails_with_report(app, tmp_path):
    src = make_ktvic(tmp_path / "ktvic")
    out = tmp_path / "m.jsonl"
    res = runner.invoke(app, ["prepare", "ktvic", str(src), "--out", str(out), "--strict"])
    assert res.exit_code == 1
    assert "missing_image: train_data.json [image 5]" in res.output
    assert not out.exists() and report_path(out).exists()


def test_prepare_adapter_options_and_errors(app, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")  # unreadable
    (tmp_path / "c.csv").write_text("file,text\na.jpg,hello\n", encoding="utf-8")
    args = ["prepare", "table", str(tmp_path / "c.csv"), "--out", str(tmp_path / "m.jsonl"), "--lang", "en"]
    res = runner.invoke(app, [*args, "--option", "image_column=file", "--option", "caption_column=text"])
    assert res.exit_code == 0, res.output
    assert "unreadable_image" in res.output and "no captions written" in res.output
    res = runner.invoke(app, [*args, "--option", "colour=red"])
    assert res.exit_code == 2 and "unknown option(s) colour" in res.output
    res = runner.invoke(app, ["prepare", "nope", str(tmp_path), "--out", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 2 and "known: " in res.output and "ktvic" in res.output
    res = runner.invoke(
        app,
        [*args, "--option", "image_column=file", "--no-check-images", "--tokenizer", str(tmp_path / "none")],
    )
    assert res.exit_code == 2 and "not found locally" in res.output


def _photos(tmp_path, *names):
    from tests.test_data_prep_adapters import _jpeg

    root = tmp_path / "photos"
    for name in names:
        _jpeg(Path(os.fsdecode(os.fsencode(root) + b"/" + name)))
    return root


def _non_utf8_name(tmp_path):
    root = _photos(tmp_path, b"a.jpg", b"caf\xe9.jpg")  # uncaptioned: reported by name
    (root / "captions.txt").write_text("a.jpg\tA red bus\n", encoding="utf-8")
    return ["folder", str(root)]


def _table(content: bytes, name="c.csv"):
    def make(tmp_path):
        root = _photos(tmp_path, b"a.jpg", b"b.jpg", b"c.jpg")
        (root / name).write_bytes(content)
        return ["table", str(root / name), "--lang", "en"]

    return make


def _huge(tmp_path):
    from tests.test_data_prep_adapters import _png_header_only

    root = _photos(tmp_path, b"a.jpg")
    (root / "huge.png").write_bytes(_png_header_only(11_000, 11_000))  # 121 MP
    (root / "c.csv").write_text("image,caption\na.jpg,A red bus\nhuge.png,A black square\n", encoding="utf-8")
    return ["table", str(root / "c.csv"), "--lang", "en"]


def _loop_source(tmp_path):
    (tmp_path / "loop.csv").symlink_to("loop.csv")
    return ["table", str(tmp_path / "loop.csv")]


def _loop_in_folder(tmp_path):
    root = _photos(tmp_path, b"a.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "back").symlink_to(".")
    (root / "captions.txt").write_text("a.jpg\tA red bus\n", encoding="utf-8")
    return ["folder", str(root)]


LONG = b"image,caption\na.jpg,A red bus\nb.jpg," + b"word " * 400 + b"\n"

# (case, make the input -> arguments, extra options, exit code, what the output says)
HOSTILE = [
    ("file name not UTF-8", _non_utf8_name, [], 0, ["no_captions: caf\\udce9.jpg", "problems: 1"]),
    (
        "quote left open",
        _table(b'image,caption\na.jpg,"A red bus\nb.jpg,A blue car\nc.jpg,A green tree\n'),
        [],
        0,
        ["bad_entry: c.csv [lines 2-4] a quote opened here is never closed"],
    ),
    (
        "no caption column",
        _table(b"image,text\na.jpg,A red bus\n"),
        [],
        2,
        ["error: ", "c.csv:1: no column 'caption' in header ['image', 'text']"],
    ),
    (
        "U+2028 in a JSONL caption",
        _table('{"image": "a.jpg", "caption": "A red\u2028bus"}\n'.encode(), "c.jsonl"),
        [],
        0,
        ["captions: 1 written", "problems: none"],
    ),
    (
        "Latin-1 CSV",
        _table("image,caption\na.jpg,café\n".encode("latin-1")),
        [],
        2,
        ["c.csv:2: not UTF-8 text"],
    ),
    (
        "121-megapixel image",
        _huge,
        [],
        0,
        ["oversized_image: c.csv [line 3]", "over the 100,000,000-pixel limit"],
    ),
    ("2,000-character caption", _table(LONG), [], 0, ["long_caption: c.csv [line 3]", "1999 characters"]),
    ("2,000-character caption, limit off", _table(LONG), ["--max-caption-chars", "0"], 0, ["problems: none"]),
    ("symlink loop as the source", _loop_source, [], 2, ["loop.csv (Too many levels of symbolic links)"]),
    (
        "symlink loops in a folder",
        _loop_in_folder,
        [],
        0,
        ["problems: 2 (symlink_loop 2)", "symlink_loop: loop.jpg", "symlink_loop: back"],
    ),
]


@pytest.mark.parametrize(
    ("make", "extra", "code", "says"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_input(app, tmp_path, make, extra, code, says):
    out = tmp_path / "out" / "m.jsonl"
    res = runner.invoke(app, ["prepare", *make(tmp_path), "--out", str(out), *extra])
    assert res.exit_code == code, res.output
    for text in says:
        assert text in res.output
    assert "Traceback" not in res.output
    if code == 0:  # every file written is UTF-8, and the report is all there
        out.read_bytes().decode("utf-8")
        report = json.loads(report_path(out).read_bytes().decode("utf-8"))
        assert len(report["problems"]) == sum(report["problem_counts"].values())
    else:
        assert not out.exists()
