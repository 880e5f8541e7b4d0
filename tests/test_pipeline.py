"""End to end on tiny models: train, resume, checkpoints, evaluate, caption; through the CLI too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from vicap.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from vicap.cli import app
from vicap.evaluate import evaluate_run
from vicap.recipe import recipe_from_json
from vicap.train import read_log, train

# Per-step losses of the seeded 2-epoch frozen-LM run below (24 images x 5 captions, batch 16; the tests'
# own data and tiny GPT-2 + tiny CLIP, see tests/builders.py and conftest.py), recorded from this code on
# CPU. A change to data order, masking, the schedule or initialisation moves them.
EXPECTED_LOSSES = [
    5.768384,
    5.75768,
    5.727328,
    5.725213,
    5.703435,
    5.724837,
    5.680004,
    5.707691,
    5.68881,
    5.700756,
    5.671464,
    5.673657,
    5.655401,
    5.647118,
    5.684279,
    5.705175,
]


def test_seeded_run_matches_stored_losses(tiny_recipe) -> None:
    recipe = tiny_recipe(**{"decoder.tuning": "frozen"})
    run = train(recipe, progress=False)
    losses = [row["loss"] for row in read_log(run) if "loss" in row]
    assert losses == pytest.approx(EXPECTED_LOSSES, rel=1e-3)


def test_frozen_checkpoint_holds_only_the_mapper(tiny_recipe) -> None:
    recipe = tiny_recipe(**{"decoder.tuning": "frozen"})
    run = train(recipe, progress=False)
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000008", "step_00000016"]  # one per epoch, last two kept
    with safe_open(str(ckpts[-1] / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("mapper.") for k in keys)
    assert recipe_from_json(meta["recipe"]) == recipe
    assert (run / "recipe.toml").read_text() == recipe.to_toml()


def test_full_tuning_checkpoint_holds_the_lm(tiny_recipe) -> None:
    run = train(tiny_recipe(**{"decoder.tuning": "full", "train.epochs": "1"}), progress=False)
    with safe_open(str(list_checkpoints(run)[-1] / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lm.") for k in keys) and any(k.startswith("mapper.") for k in keys)


def test_resume_continues_exactly(tiny_recipe, tmp_path: Path) -> None:
    full = train(tiny_recipe(**{"train.output_dir": str(tmp_path / "full")}), progress=False)
    # The same run, interrupted after epoch 1: its last checkpoint and later log lines are gone.
    half = train(tiny_recipe(**{"train.output_dir": str(tmp_path / "half")}), progress=False)
    shutil.rmtree(list_checkpoints(half)[-1])
    log = (half / "train_log.jsonl").read_text().splitlines()
    (half / "train_log.jsonl").write_text(
        "\n".join(line for line in log if json.loads(line)["step"] <= 8) + "\n"
    )
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_recipe(**{"train.output_dir": str(half)}), progress=False)
    train(tiny_recipe(**{"train.output_dir": str(half)}), resume=True, progress=False)
    a = [r["loss"] for r in read_log(full) if "loss" in r]
    b = [r["loss"] for r in read_log(half) if "loss" in r]
    assert len(a) == 16 and b == pytest.approx(a, rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(list_checkpoints(full)[-1] / "model.safetensors"))
    wb = load_file(str(list_checkpoints(half)[-1] / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_different_model(tiny_recipe) -> None:
    run = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    with pytest.raises(CheckpointError, match="mapper.prefix_length: checkpoint 2 vs recipe 3"):
        train(
            tiny_recipe(**{"train.output_dir": str(run), "mapper.prefix_length": "3"}),
            resume=True,
            progress=False,
        )


def test_corrupt_checkpoint_is_a_clear_error(tiny_recipe) -> None:
    run = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    ckpt = list_checkpoints(run)[-1]
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(ckpt)


def test_evaluate_writes_reports(tiny_recipe) -> None:
    run = train(tiny_recipe(), progress=False)
    report = evaluate_run(run, progress=False)
    assert report["images"] == 6 and report["references"] == 30
    scores = report["scores"]["syllable"]
    assert set(scores) == {"vicap", "most frequent train caption", "human (leave-one-out)"}
    for row in scores.values():
        assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(row)
    saved = json.loads((run / "report.json").read_text())
    assert saved["scores"] == report["scores"]
    md = (run / "report.md").read_text()
    assert "## Protocol" in md and "lowercase yes" in md and "CIDEr-D" in md
    lines = (run / "captions_test.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_cli_train_caption_evaluate(tiny_recipe, tmp_path: Path, ktvic_dir: Path) -> None:
    recipe = tiny_recipe(**{"train.epochs": "1"})
    path = tmp_path / "tiny.toml"
    path.write_text(recipe.to_toml())
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(path), "--set", "train.log_every=2"])
    assert res.exit_code == 0, res.output
    run = recipe.train.output_dir
    image = next((ktvic_dir / "public-test-images").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image.read_bytes()[:100])
    res = runner.invoke(app, ["caption", run, str(image), str(broken), "--set", "generate.strategy=greedy"])
    assert res.exit_code == 0, res.output  # an unreadable file is reported and skipped
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(image)] and isinstance(rows[0]["caption"], str)
    assert f"skipped {broken}: unreadable image" in res.stderr
    res = runner.invoke(app, ["evaluate", run])
    assert res.exit_code == 0, res.output
    assert "CIDEr-D" in res.output and "most frequent train caption" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a vicap run directory" in res.output


def test_bare_overrides_still_work_with_a_deprecation_message(tiny_recipe, tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_recipe(**{"train.epochs": "1"}).to_toml())
    res = CliRunner().invoke(app, ["train", str(path), "train.log_every=4"])
    assert res.exit_code == 0, res.output
    assert "overrides as bare arguments are deprecated: write --set train.log_every=4" in res.stderr
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [4, 8]


def test_cli_list() -> None:
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0
    for word in ("open_clip", "mlp", "vi", "ktvic"):
        assert word in res.output
