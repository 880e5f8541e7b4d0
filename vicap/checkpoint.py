"""Checkpoints of every captioner vicap trains: safetensors for tensors, JSON for the rest.

<run>/checkpoints/step_00001234/
    model.safetensors    what training changed, nothing else (vicap: the mapper, plus the LM when fully
                         tuned or its LoRA adapters; baseline: the LSTM, plus the CNN when trained);
                         metadata: format, the resolved recipe as JSON, step, epoch and the kind's own
                         keys (vicap: encoder_dim; baseline: vocab_size)
    trainer.safetensors  optimizer moments and each process's torch RNG state, for resuming
    trainer.json         step, epoch, scheduler state and optimizer hyperparameters

A checkpoint is written into `step_N.tmp/`, its files flushed to disk, and only then renamed to
`step_N/`; old checkpoints are renamed to `step_N.old/` before they are deleted. A process killed at
any moment therefore leaves complete `step_N/` folders and, at most, a leftover `.tmp`/`.old` folder
that nothing lists, loads or prunes as a checkpoint (the next save removes it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vicap import __version__
from vicap.errors import CheckpointError  # noqa: F401  (raised here; importable from here too)
from vicap.recipe import recipe_from_json

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step_(\d{8})")
MODEL_FILE, TRAINER_FILE, TRAINER_JSON = "model.safetensors", "trainer.safetensors", "trainer.json"


@dataclass(frozen=True)
class RunKind:
    """How a kind of run is stored: checkpoint format, recipe file, which recipe keys define the model."""

    format: str
    recipe_file: str
    parse_recipe: Callable[[str], Any]
    model_sections: tuple[str, ...]  # a checkpoint only fits a recipe that agrees on these sections...
    free_keys: tuple[str, ...] = ()  # ...except these dotted keys (they do not change trained weights)


VICAP_RUN = RunKind(
    format="vicap-checkpoint-1",
    recipe_file="recipe.toml",
    parse_recipe=recipe_from_json,
    model_sections=("encoder", "decoder", "mapper"),
    # feature-extraction batch size, and the dtype a frozen LM is held in (same trained weights)
    free_keys=("encoder.batch_size", "decoder.dtype"),
)


@dataclass
class Checkpoint:
    path: Path
    step: int
    epoch: int
    recipe: Any  # the kind's recipe dataclass, parsed from the metadata
    meta: dict[str, str]  # the safetensors metadata as written

    @property
    def encoder_dim(self) -> int:
        return int(self.meta["encoder_dim"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Leftovers of an interrupted save or prune
    (`step_N.tmp`, `step_N.old`) never match."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / MODEL_FILE).is_file())


def read_selection(path: Path) -> dict | None:
    """The best-checkpoint record saved with a checkpoint (None: none, or an older checkpoint)."""
    try:
        return json.loads((Path(path) / TRAINER_JSON).read_text()).get("selection")
    except (OSError, ValueError, AttributeError):
        return None


def pick_checkpoint(run_dir: Path, which: str = "best") -> tuple[Path, str]:
    """The checkpoint `which` names, and a description of it: 'best' (the one the run's selection metric
    chose, recorded in its newest checkpoint; the last one when the run selected none), 'last', or a
    step number."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints yet (looked in {checkpoint_dir(run_dir)})")
    steps = {int(p.name[5:]): p for p in found}
    if which == "last":
        return found[-1], f"the last checkpoint (step {int(found[-1].name[5:])})"
    if which.isdigit():
        if int(which) not in steps:
            raise CheckpointError(
                f"{run_dir}: no checkpoint at step {which}; steps: {', '.join(map(str, steps))}"
            )
        return steps[int(which)], f"the checkpoint of step {int(which)}"
    if which != "best":
        raise CheckpointError(f"checkpoint {which!r}: use best, last or a step number")
    sel = read_selection(found[-1])
    if sel and sel.get("best_step") in steps:
        what = f"best by validation {sel['metric']} = {sel['best_value']:.4f}"
        return steps[
            sel["best_step"]
        ], f"{what} (step {sel['best_step']}; last is step {int(found[-1].name[5:])})"
    return found[-1], f"the last checkpoint (step {int(found[-1].name[5:])}; the run selected no best)"


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints yet (looked in {checkpoint_dir(run_dir)})")
    return found[-1]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder so that no half-deleted checkpoint is ever listed: rename it out of the
    `step_N` namespace first (atomic), then delete."""
    if not folder.exists():
        return
    gone = folder.with_name(folder.name + ".old")
    shutil.rmtree(gone, ignore_errors=True)
    folder.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, str],
    step: int,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
    selection: dict | None = None,
    keep: int = 2,
    protect: Iterable[int] = (),
) -> Path:
    """Write `step_N/` atomically, then prune to the `keep` newest (never a step in `protect`).

    `meta` holds the kind's metadata (format, recipe JSON, ...); step and epoch are added here.
    `rng_states` are every process's RNG states (torch's CPU generator, and the accelerator's own
    one when there is one), saved for an exact resume. `selection` is the run's best-checkpoint record
    as of this step (`vicap.train.Selection`), which `pick_checkpoint` reads back."""
    folder = checkpoint_dir(run_dir) / f"step_{step:08d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {**meta, "vicap_version": __version__, "step": str(step), "epoch": str(epoch)}
    save_file(model_state, tmp / MODEL_FILE, metadata=meta)
    if optimizer is not None:
        tensors, state_json = _optimizer_to_tensors(optimizer.state_dict())
        for rank, states in enumerate(rng_states or [{"torch": torch.get_rng_state()}]):
            for name, state in states.items():
                tensors[f"rng.{name}.{rank}"] = state
        save_file(tensors, tmp / TRAINER_FILE)
        trainer = {
            "step": step,
            "epoch": epoch,
            "optimizer": state_json,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "selection": selection,
        }
        (tmp / TRAINER_JSON).write_text(json.dumps(trainer, indent=1, default=_jsonable))
    for f in tmp.iterdir():
        _fsync(f)
    _remove(folder)
    tmp.rename(folder)
    _fsync(folder.parent)
    keep_steps = set(protect)
    for old in list_checkpoints(run_dir)[:-keep]:
        if int(old.name[5:]) not in keep_steps:
            _remove(old)
    return folder


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in trainer.json")


def _optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], state_json: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, extra in state_json.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": state_json["param_groups"]}


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_checkpoint(path: Path, *, kind: RunKind = VICAP_RUN) -> Checkpoint:
    """The checkpoint's metadata and recipe, checked for the kind's format; its tensors stay on
    disk until `load_model_state`. Anything missing or cut short is a CheckpointError naming the file."""
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint weights not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if meta.get("format") != kind.format:
        raise CheckpointError(f"{file}: format {meta.get('format')!r}, expected {kind.format!r}")
    try:
        step, epoch = int(meta["step"]), int(meta["epoch"])
        recipe = kind.parse_recipe(meta["recipe"])
    except KeyError as e:
        raise CheckpointError(f"{file}: metadata has no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:  # bad numbers, JSON cut short, a recipe that no longer validates
        raise CheckpointError(f"{file}: unreadable metadata ({type(e).__name__}: {e})") from None
    return Checkpoint(Path(path), step, epoch, recipe, meta)


def load_model_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The trained tensors; every one must be finite (NaN/inf weights would caption silently)."""
    state = _load_tensors(ckpt.path / MODEL_FILE)
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{ckpt.path / MODEL_FILE}: tensor {name} holds NaN or infinite values; "
                "the training that wrote it diverged"
            )
    return state


def load_trainer_state(
    ckpt: Checkpoint, optimizer, scheduler, *, rank: int = 0
) -> dict[str, torch.Tensor] | None:
    """Restore optimizer and scheduler; returns this process's saved RNG states ({"torch": ..., and
    the accelerator's when it had one}), or None if the checkpoint was written by fewer processes."""
    tensors = _load_tensors(ckpt.path / TRAINER_FILE)
    file = ckpt.path / TRAINER_JSON
    try:
        trainer = json.loads(file.read_text())
        state = _optimizer_from_tensors(tensors, trainer["optimizer"])
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    # The saved param groups carry the implementation flags (fused, foreach) of the optimizer that
    # saved them; which kernel runs the update is this machine's choice (vicap.train.build_optimizer),
    # not training state, so it is kept across the load.
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not fit this model ({e})") from None
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
        if kept["fused"]:  # the fused kernel keeps its step counters on the parameters' device
            for p in group["params"]:
                s = optimizer.state.get(p, {})
                if "step" in s:
                    s["step"] = s["step"].to(device=p.device, dtype=torch.float32)
    if scheduler is not None and trainer.get("scheduler") is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    suffix = f".{rank}"
    states = {
        k[4 : -len(suffix)]: v for k, v in tensors.items() if k.startswith("rng.") and k.endswith(suffix)
    }
    if not states and rank == 0 and "rng.torch" in tensors:  # written before per-process states
        states = {"torch": tensors["rng.torch"]}
    return states or None


def recipe_differences(
    saved: dict, current: dict, sections: Iterable[str], *, allowed: Iterable[str] = ()
) -> list[str]:
    """'section.key: checkpoint X vs recipe Y' for every key of `sections` that differs, except the
    dotted keys in `allowed`."""
    allowed = set(allowed)
    out = []
    for s in sections:
        a, b = saved.get(s, {}), current.get(s, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k) and f"{s}.{k}" not in allowed:
                out.append(f"{s}.{k}: checkpoint {a.get(k)!r} vs recipe {b.get(k)!r}")
    return out


def check_compatible(ckpt: Checkpoint, recipe, kind: RunKind) -> None:
    """A checkpoint fits a recipe when the model-defining sections agree; name every key that differs."""
    diffs = recipe_differences(
        ckpt.recipe.to_dict(), recipe.to_dict(), kind.model_sections, allowed=kind.free_keys
    )
    if diffs:
        raise CheckpointError(f"{ckpt.path} does not match the recipe:\n  " + "\n  ".join(diffs))
