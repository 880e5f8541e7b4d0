"""Checkpoints: safetensors for every tensor, JSON for everything else, the recipe inside each one.

<run>/checkpoints/step_00001234/
    model.safetensors    trainable weights only: the mapper, plus the LM when fully tuned or its LoRA
                         adapters (lora_A / lora_B, never the base LM) under LoRA; metadata holds the
                         resolved recipe, the encoder width and the step
    trainer.safetensors  optimizer moments and the torch RNG state, for resuming
    trainer.json         step, epoch, scheduler state and optimizer hyperparameters
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vicap import __version__
from vicap.recipe import Recipe, recipe_from_json

log = logging.getLogger(__name__)

FORMAT = "vicap-checkpoint-1"
# Recipe sections that decide the model's shape and meaning; a checkpoint only fits a recipe that
# agrees on these.
MODEL_SECTIONS = ("encoder", "decoder", "mapper")
# Keys in those sections that a checkpoint may differ on: feature-extraction batch size, and the dtype
# a frozen LM is held in (the trained weights are the same either way).
NOT_MODEL_DEFINING = ("batch_size", "dtype")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its recipe."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    epoch: int
    recipe: Recipe
    encoder_dim: int


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir(run_dir).glob("step_*") if (p / "model.safetensors").is_file())


def save_checkpoint(
    run_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    recipe: Recipe,
    encoder_dim: int,
    step: int,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    keep: int = 2,
) -> Path:
    folder = checkpoint_dir(run_dir) / f"step_{step:08d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "format": FORMAT,
        "vicap_version": __version__,
        "recipe": recipe.to_json(),
        "encoder_dim": str(encoder_dim),
        "step": str(step),
        "epoch": str(epoch),
    }
    save_file(model_state, tmp / "model.safetensors", metadata=meta)
    if optimizer is not None:
        tensors, state_json = _optimizer_to_tensors(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "trainer.safetensors")
        trainer = {
            "step": step,
            "epoch": epoch,
            "optimizer": state_json,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, default=_jsonable))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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


def read_checkpoint(path: Path) -> Checkpoint:
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint weights not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a vicap checkpoint (metadata format={meta.get('format')!r})")
    return Checkpoint(
        Path(path),
        int(meta["step"]),
        int(meta["epoch"]),
        recipe_from_json(meta["recipe"]),
        int(meta["encoder_dim"]),
    )


def load_model_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.path / "model.safetensors"))


def load_trainer_state(ckpt: Checkpoint, optimizer, scheduler) -> None:
    tensors = load_file(str(ckpt.path / "trainer.safetensors"))
    trainer = json.loads((ckpt.path / "trainer.json").read_text())
    # The saved param groups carry the implementation flags (fused, foreach) of the optimizer that
    # saved them; which kernel runs the update is this machine's choice (vicap.train.build_optimizer),
    # not training state, so it is kept across the load.
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(_optimizer_from_tensors(tensors, trainer["optimizer"]))
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
        if kept["fused"]:  # the fused kernel keeps its step counters on the parameters' device
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    if scheduler is not None and trainer.get("scheduler") is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])


def check_compatible(ckpt: Checkpoint, recipe: Recipe) -> None:
    """A checkpoint fits a recipe when the model-defining sections agree; name every key that differs."""
    a, b = ckpt.recipe.to_dict(), recipe.to_dict()
    diffs = [
        f"{s}.{k}: checkpoint {a[s].get(k)!r} vs recipe {b[s].get(k)!r}"
        for s in MODEL_SECTIONS
        for k in sorted(set(a[s]) | set(b[s]))
        if a[s].get(k) != b[s].get(k) and k not in NOT_MODEL_DEFINING
    ]
    if diffs:
        raise CheckpointError(f"{ckpt.path} does not match the recipe:\n  " + "\n  ".join(diffs))
