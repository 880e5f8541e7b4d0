"""Checkpoints that survive a killed process, and resumes that are exact.

- A save or prune interrupted at any point leaves only complete `step_N/` checkpoints: leftovers
  (`step_N.tmp`, `step_N.old`) are never listed, loaded, resumed from or pruned as checkpoints.
- A run resumed from a mid-epoch checkpoint ends with bit-identical weights and identical losses to
  one that never stopped, with dropout on (a tuned LM) and a validation split, for vicap and for the
  CNN+LSTM baseline (same loop, same checkpoint code).
- `vicap train` killed with SIGKILL at random moments, then resumed, several times over, ends with
  the weights of an uninterrupted run.
- Bad checkpoints and changed settings on --resume are errors naming the file or the key.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import REPO
from vicap.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from vicap.cli import app
from vicap.runs import load_run
from vicap.train import TrainingError, read_log, train


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r]


# --------------------------------------------------------------------------- leftovers of a killed save


def test_leftover_tmp_and_old_folders_are_never_checkpoints(tiny_recipe) -> None:
    recipe = tiny_recipe(**{"decoder.tuning": "frozen"})
    run = train(recipe, progress=False)
    first, last = list_checkpoints(run)
    assert (first.name, last.name) == ("step_00000008", "step_00000016")
    # Killed after epoch 1's save: a save killed after writing its weights, and a prune killed half-way.
    shutil.rmtree(last)
    for name in ("step_00000099.tmp", "step_00000100.old"):
        shutil.copytree(first, run / "checkpoints" / name)
    (run / "checkpoints" / "step_00000100.old" / "trainer.json").unlink()
    assert list_checkpoints(run) == [first]
    assert load_run(run).checkpoint.path == first  # what evaluate, caption and serve load
    train(recipe, resume=True, progress=False)  # resumes from step 8, not 99 or 100
    assert [p.name for p in list_checkpoints(run)] == ["step_00000008", "step_00000016"]
    assert load_run(run).checkpoint.step == 16


def test_a_save_interrupted_anywhere_leaves_complete_checkpoints(tmp_path: Path) -> None:
    """Stop a save at each of its file-system steps in turn (as a kill there would): every checkpoint
    listed afterwards is complete and loadable, and the next save succeeds."""
    from vicap import checkpoint as ck

    meta = {"format": ck.VICAP_RUN.format, "recipe": _recipe_json(), "encoder_dim": "4"}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])

    def save(run: Path, step: int) -> None:
        state = {"w": torch.full((3,), float(step))}
        ck.save_checkpoint(run, model_state=state, meta=meta, step=step, epoch=0, optimizer=opt, keep=2)

    crash_at, completed = 0, False
    while not completed:
        run = tmp_path / f"crash{crash_at}"
        for step in (1, 2):
            save(run, step)
        calls = {"n": 0, "stop": crash_at + 1}

        def stop_at(fn, calls=calls):
            def f(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["stop"]:
                    raise KeyboardInterrupt
                return fn(*args, **kwargs)

            return f

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ck, "save_file", stop_at(ck.save_file))
            mp.setattr(ck, "_fsync", stop_at(ck._fsync))
            mp.setattr(ck.shutil, "rmtree", stop_at(shutil.rmtree))
            mp.setattr(Path, "rename", stop_at(Path.rename))
            try:
                save(run, 3)
                completed = True
            except KeyboardInterrupt:
                pass
        listed = list_checkpoints(run)
        assert {p.name for p in listed} >= {"step_00000002"} or {p.name for p in listed} >= {"step_00000003"}
        for p in listed:
            ckpt = read_checkpoint(p)
            assert ck.load_model_state(ckpt)["w"][0].item() == ckpt.step
            ck.load_trainer_state(ckpt, opt, None)
        save(run, 4)
        assert [p.name for p in list_checkpoints(run)][-1] == "step_00000004"
        crash_at += 1
    assert crash_at > 8  # every file-system step of a save was interrupted once


def _recipe_json() -> str:
    from vicap.recipe import load_recipe

    return load_recipe("demo_vi_synthetic").to_json()


# --------------------------------------------------------------------------- exact resume


def test_resume_mid_epoch_with_dropout_is_exact(tiny_recipe, tmp_path: Path) -> None:
    # A tuned GPT-2 trains with dropout; a validation split adds a pass per epoch.
    common = {
        "decoder.tuning": "full",
        "data.val_fraction": "0.25",
        "train.save_every": "2",
        "train.keep_checkpoints": "10",
    }
    full = train(tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "full")}), progress=False)
    half_recipe = tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "half")})
    half = train(half_recipe, progress=False)
    # Interrupted after step 5 (mid-epoch 0; 6 steps an epoch): only the checkpoints up to it are left.
    for p in list_checkpoints(half):
        if int(p.name[5:]) > 4:
            shutil.rmtree(p)
    assert [p.name for p in list_checkpoints(half)] == ["step_00000002", "step_00000004"]
    # ... and the run folder was copied elsewhere before it was resumed: its manifest's relative image
    # paths lead nowhere from there, and are followed back to where they were written
    moved = tmp_path / "elsewhere" / "deeper" / "half"
    shutil.copytree(half, moved)
    half = train(tiny_recipe(**common, **{"train.output_dir": str(moved)}), resume=True, progress=False)
    _assert_same_weights(full, half)
    assert _losses(half) == _losses(full)
    vals = [r["val_loss"] for r in read_log(full) if "val_loss" in r]
    assert len(vals) == 2 and [r["val_loss"] for r in read_log(half) if "val_loss" in r] == vals


def test_baseline_resumes_exactly(tmp_path: Path, ktvic_dir: Path) -> None:
    from tests.test_baseline import DEMO, _tiny_overrides
    from vicap.baseline.recipe import load_baseline_recipe
    from vicap.baseline.train import train_baseline

    def recipe(out: str):
        # decoder.dropout 0.3 and a trained CNN with BatchNorm: random and stateful
        return load_baseline_recipe(
            DEMO,
            _tiny_overrides(
                tmp_path,
                ktvic_dir,
                **{"train.output_dir": str(tmp_path / out), "train.keep_checkpoints": "2"},
            ),
        )

    full = train_baseline(recipe("full"), progress=False)
    half = train_baseline(recipe("half"), progress=False)
    shutil.rmtree(list_checkpoints(half)[-1])
    with pytest.raises(FileExistsError, match="--resume"):
        train_baseline(recipe("half"), progress=False)
    train_baseline(recipe("half"), resume=True, progress=False)
    _assert_same_weights(full, half)
    assert _losses(half) == _losses(full)


# --------------------------------------------------------------------------- kill -9


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vicap.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_to_the_same_weights(tiny_recipe, tmp_path: Path) -> None:
    # One thread in every process: the same float summation order in the killed and the clean runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    settings = {"decoder.tuning": "full", "train.epochs": "4", "train.save_every": "1"}
    for name in ("clean", "killed"):
        path = tmp_path / f"{name}.toml"
        path.write_text(tiny_recipe(**settings, **{"train.output_dir": str(tmp_path / name)}).to_toml())
    clean = _cli(["train", str(tmp_path / "clean.toml")], env)
    assert clean.wait(timeout=300) == 0, clean.stderr.read()

    duration = read_log(tmp_path / "clean")[-1]["elapsed"]  # seconds of training, setup excluded
    rng = random.Random(0)
    run = tmp_path / "killed"
    kills = 0
    while kills < 5:
        args = ["train", str(tmp_path / "killed.toml")] + (["--resume"] if list_checkpoints(run) else [])
        proc = _cli(args, env)
        # Wait until this start is training (its start/resume row is logged), then kill at a random
        # moment of its training: inside a step, a save or a prune.
        deadline = time.time() + 120
        starts = sum(1 for r in read_log(run) if "event" in r) if run.exists() else 0
        while time.time() < deadline and proc.poll() is None:
            if run.exists() and sum(1 for r in read_log(run) if "event" in r) > starts:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5 * duration))
        if proc.poll() is not None:  # finished before the kill: this round ended the run
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = _cli(["train", str(tmp_path / "killed.toml"), "--resume"], env)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills >= 3
    _assert_same_weights(tmp_path / "clean", run)
    assert _losses(run) == _losses(tmp_path / "clean")


# --------------------------------------------------------------------------- bad checkpoints, bad resumes


def _rewrite_meta(file: Path, **changes) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v(meta[k]) if callable(v) else v
    save_file(load_file(str(file)), file, metadata=meta)


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


BAD_CHECKPOINTS = [
    # (case, damage, command, expected message)
    ("recipe cut short", lambda c: _rewrite_meta(c / "model.safetensors", recipe=lambda r: r[:40]), "evaluate", "unreadable metadata"),
    ("no step", lambda c: _rewrite_meta(c / "model.safetensors", step=None), "evaluate", "metadata has no 'step'"),
    ("step not a number", lambda c: _rewrite_meta(c / "model.safetensors", step="x"), "evaluate", "unreadable metadata"),
    ("foreign format", lambda c: _rewrite_meta(c / "model.safetensors", format="other"), "evaluate", "format 'other'"),
    ("weights cut short", lambda c: _cut(c / "model.safetensors"), "evaluate", "not a readable safetensors file"),
    ("NaN weights", lambda c: save_file({k: v * float("nan") for k, v in load_file(str(c / "model.safetensors")).items()}, c / "model.safetensors", metadata=_meta(c)), "evaluate", "NaN or infinite"),
    ("trainer state cut short", lambda c: _cut(c / "trainer.safetensors"), "resume", "trainer.safetensors: not a readable safetensors file"),
    ("trainer.json cut short", lambda c: _cut(c / "trainer.json"), "resume", "trainer.json: unreadable"),
    ("trainer.json missing", lambda c: (c / "trainer.json").unlink(), "resume", "trainer.json: missing"),
]  # fmt: skip


def _meta(ckpt: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return dict(f.metadata())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ktvic_dir, tiny_lm_dir, tiny_clip_dir) -> Path:
    from tests.conftest import tiny_recipe_overrides
    from vicap.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("trained")
    recipe = load_recipe(
        "demo_vi_synthetic",
        tiny_recipe_overrides(tmp, ktvic_dir, tiny_lm_dir, tiny_clip_dir, **{"train.epochs": "1"}),
    )
    (tmp / "recipe.toml").write_text(recipe.to_toml())
    return train(recipe, progress=False)


@pytest.mark.parametrize(
    ("case", "damage", "command", "message"), BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS]
)
def test_bad_checkpoint_is_a_clear_error(trained_run: Path, tmp_path: Path, case, damage, command, message) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = (run / "recipe.toml").read_text().replace(str(trained_run), str(run))
    (run / "recipe.toml").write_text(recipe)
    (tmp_path / "r.toml").write_text(recipe)
    damage(latest_checkpoint(run))
    args = (
        ["evaluate", str(run)] if command == "evaluate" else ["train", str(tmp_path / "r.toml"), "--resume"]
    )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert "step_00000008" in res.output  # the message names the checkpoint


@pytest.mark.parametrize(
    ("override", "outcome"),
    [
        ("train.lr=0.1", "train.lr: checkpoint 0.001 vs recipe 0.1"),
        ("train.epochs=3", "train.epochs: checkpoint 1 vs recipe 3"),
        ("train.batch_size=8", "train.batch_size: checkpoint 16 vs recipe 8"),
        ("train.seed=1", "train.seed: checkpoint 42 vs recipe 1"),
        ("data.max_tokens=12", "data.max_tokens: checkpoint 40 vs recipe 12"),
        ("mapper.prefix_length=3", "mapper.prefix_length: checkpoint 2 vs recipe 3"),
        ("mix.images=1.0", "mix.images: checkpoint 0.0 vs recipe 1.0"),  # another batch order
        ("train.log_every=3", None),  # how often it logs or saves may change on resume
        ("generate.beam_size=2", None),
    ],
)
def test_resume_with_changed_settings(tiny_recipe, override: str, outcome) -> None:
    base = {"decoder.tuning": "frozen", "train.epochs": "1"}
    run = train(tiny_recipe(**base), progress=False)
    written = (run / "recipe.toml").read_text()
    key, value = override.split("=")
    changed = tiny_recipe(**{**base, key: value})
    if outcome is None:
        train(changed, resume=True, progress=False)
        assert (run / "recipe.toml").read_text() == changed.to_toml()
        return
    with pytest.raises(CheckpointError) as e:
        train(changed, resume=True, progress=False)
    assert outcome in str(e.value)
    assert (run / "recipe.toml").read_text() == written  # nothing rewritten


# --------------------------------------------------------------------------- non-finite training


def test_non_finite_loss_stops_training_before_the_update(tiny_recipe, monkeypatch, tmp_path: Path) -> None:
    from vicap.model import CaptionModel

    calls = {"n": 0}
    forward = CaptionModel.forward

    def poisoned(self, features, input_ids, attention_mask):
        out = forward(self, features, input_ids, attention_mask)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out["loss_sum"] = out["loss_sum"] * float("nan")
        return out

    monkeypatch.setattr(CaptionModel, "forward", poisoned)
    recipe = tiny_recipe(**{"train.save_every": "1"})
    with pytest.raises(
        TrainingError, match=r"step 3 \(epoch 0\): the loss is nan.*step_00000002\) is intact"
    ):
        train(recipe, progress=False)
    run = Path(recipe.train.output_dir)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    assert all(torch.isfinite(t).all() for t in _weights(run).values())


def test_diverging_learning_rate_is_a_clear_cli_error(tiny_recipe, tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        tiny_recipe(**{"train.lr": "1e30", "train.grad_clip": "0.0", "train.warmup_steps": "0"}).to_toml()
    )
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 2, res.output
    assert "training stopped at step" in res.output and "not finite" in res.output
    assert "Traceback" not in res.output
