"""The run's result is its best checkpoint by a validation score (train.select), not merely its last.

- Validation scores (CIDEr-D+BLEU-4 by default when there is a validation split) are logged and
  recorded with every checkpoint; the best checkpoint survives pruning.
- evaluate, caption and serve load the best one unless told --checkpoint last or a step; the report
  says which one it scored.
- train.patience stops training after that many validations without a better score.
- A resumed run keeps its best and its patience count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicap.checkpoint import CheckpointError, list_checkpoints, pick_checkpoint, read_selection
from vicap.cli import app
from vicap.recipe import RecipeError
from vicap.runs import load_run
from vicap.train import read_log, train

VAL = {"data.val_fraction": "0.2", "train.epochs": "3", "train.keep_checkpoints": "1"}


def _steps(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run)]


def _scripted_scores(monkeypatch, values: list[float]) -> list[dict]:
    """Make the validation scorer return `values` in turn (as BLEU-4); returns the calls it saw."""
    import vicap.metrics

    calls: list[dict] = []

    def fake_score(refs, hyps, *, language, level, metrics):
        calls.append({"refs": refs, "hyps": hyps, "metrics": metrics})
        return {"BLEU-4": values[len(calls) - 1]}

    monkeypatch.setattr(vicap.metrics, "score", fake_score)
    return calls


def test_best_checkpoint_is_kept_loaded_and_reported(tiny_recipe, monkeypatch) -> None:
    calls = _scripted_scores(monkeypatch, [0.1, 0.5, 0.2])  # best after epoch 1
    run = train(tiny_recipe(**{**VAL, "train.select": "BLEU-4"}), progress=False)
    # Validation captions of every validation image are what was scored.
    assert len(calls) == 3 and calls[0]["metrics"] == ["BLEU"]
    assert calls[0]["refs"].keys() == calls[0]["hyps"].keys() and len(calls[0]["hyps"]) > 0
    assert all(isinstance(c, str) for c in calls[0]["hyps"].values())
    steps = _steps(run)
    best = [r for r in read_log(run) if "select" in r][1]["step"]
    # keep_checkpoints=1 keeps the last one, and the best one besides.
    assert len(steps) == 2 and steps[0] == best
    sel = read_selection(list_checkpoints(run)[-1])
    assert sel == {"metric": "BLEU-4", "best_value": 0.5, "best_step": best, "since_best": 1}
    assert load_run(run).checkpoint.step == best
    assert load_run(run, checkpoint="last").checkpoint.step == steps[-1]
    assert load_run(run, checkpoint=str(best)).checkpoint.step == best
    path, which = pick_checkpoint(run)
    assert path.name == f"step_{best:08d}" and "best by validation BLEU-4 = 0.5000" in which

    monkeypatch.undo()  # real scoring for the report
    res = CliRunner().invoke(app, ["evaluate", str(run)])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    assert report["step"] == best and report["checkpoint"].startswith("best by validation BLEU-4")
    assert f"(step {best}; last is step {steps[-1]})" in (run / "report.md").read_text()
    res = CliRunner().invoke(app, ["evaluate", str(run), "--checkpoint", "last"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "report.json").read_text())["step"] == steps[-1]


def test_patience_stops_training_early(tiny_recipe, monkeypatch) -> None:
    _scripted_scores(monkeypatch, [0.3, 0.2, 0.1, 0.0])
    recipe = tiny_recipe(**{**VAL, "train.select": "BLEU-4", "train.patience": "1", "train.epochs": "4"})
    run = train(recipe, progress=False)
    log = read_log(run)
    stop = [r for r in log if r.get("event") == "early stop"]
    first = [r for r in log if "select" in r][0]["step"]
    assert len(stop) == 1 and stop[0]["epoch"] == 1 and stop[0]["best_step"] == first
    assert max(r["step"] for r in log if "loss" in r) == stop[0]["step"]  # no step after the stop
    assert load_run(run).checkpoint.step == first


def test_default_selection_scores_real_captions_and_val_every(tiny_recipe) -> None:
    """No scripting: the default (CIDEr-D+BLEU-4) on the tiny model's real validation captions, every
    4 steps and at the last."""
    recipe = tiny_recipe(**{**VAL, "train.val_every": "4", "train.epochs": "2", "train.batch_size": "20"})
    run = train(recipe, progress=False)
    rows = [r for r in read_log(run) if "select" in r]
    total = max(r["step"] for r in read_log(run) if "loss" in r)
    assert total % 4 != 0  # so the last step is validated although it is not a multiple of val_every
    assert [r["step"] for r in rows] == [*range(4, total, 4), total]
    for r in rows:
        assert set(r["val"]) == {"CIDEr-D", "BLEU-4"} and "val_loss" in r
        assert r["select"] == pytest.approx(r["val"]["CIDEr-D"] + r["val"]["BLEU-4"], abs=1e-5)
    best = max(rows, key=lambda r: (r["select"], -r["step"]))  # the first of equal scores
    assert read_selection(list_checkpoints(run)[-1])["best_step"] == best["step"]
    assert load_run(run).checkpoint.step == best["step"]


def test_resumed_run_keeps_its_selection(tiny_recipe, tmp_path: Path) -> None:
    overrides = {**VAL, "train.select": "loss", "train.keep_checkpoints": "5"}
    run = train(tiny_recipe(**overrides), progress=False)
    final = read_selection(list_checkpoints(run)[-1])
    assert final["metric"] == "loss" and final["best_step"] in _steps(run)
    # Kill after epoch 1's save (drop the last checkpoint), resume: the same selection at the end.
    other = tmp_path / "other"
    shutil.copytree(run, other)
    shutil.rmtree(list_checkpoints(other)[-1])
    train(tiny_recipe(**{**overrides, "train.output_dir": str(other)}), resume=True, progress=False)
    assert read_selection(list_checkpoints(other)[-1]) == final


def test_no_validation_split_means_the_last_checkpoint(tiny_recipe) -> None:
    run = train(tiny_recipe(), progress=False)
    assert read_selection(list_checkpoints(run)[-1]) == {
        "metric": "last",
        "best_value": None,
        "best_step": None,
        "since_best": 0,
    }
    path, which = pick_checkpoint(run)
    assert path == list_checkpoints(run)[-1] and "selected no best" in which
    with pytest.raises(RecipeError, match="need a validation split"):
        train(tiny_recipe(**{"train.select": "CIDEr-D", "train.output_dir": str(run) + "2"}), progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.select": "CIDEr"}, "train.select"),
        ({"train.select": "CIDEr-D+SPICE"}, "train.select"),
        ({"train.select": "last", "train.patience": "2"}, "early stopping needs a selection score"),
        ({"train.patience": "-1"}, "train.patience"),
        ({"train.val_every": "-1"}, "train.val_every"),
    ],
)
def test_bad_selection_settings_are_refused(tiny_recipe, override, message) -> None:
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(**override)


def test_pick_checkpoint_errors(tiny_recipe, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoints yet"):
        pick_checkpoint(tmp_path)
    run = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint at step 3; steps: 8"):
        pick_checkpoint(run, "3")
    with pytest.raises(CheckpointError, match="use best, last or a step number"):
        pick_checkpoint(run, "first")
    res = CliRunner().invoke(app, ["caption", str(run), str(tmp_path), "--checkpoint", "7"])
    assert res.exit_code != 0 and "no checkpoint at step 7" in res.output
