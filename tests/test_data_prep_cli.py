"""`prepare_command` through typer.testing.CliRunner on a tiny app, as vicap registers it."""

import json

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
