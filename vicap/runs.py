"""A trained run, loaded back: its resolved recipe, a checkpoint, the caption model.

Two kinds of folder hold one: a run directory written by `vicap train` (recipe.toml and
checkpoints/step_N/), and an export written by `vicap export` (recipe.toml, model.safetensors and
export.json at the top; see `vicap.export`). `load_run` reads either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vicap.checkpoint import (
    VICAP_RUN,
    Checkpoint,
    CheckpointError,
    check_compatible,
    load_model_state,
    pick_checkpoint,
    read_checkpoint,
)
from vicap.decoders import load_decoder
from vicap.model import CaptionModel
from vicap.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)


@dataclass
class Run:
    run_dir: Path
    recipe: Recipe
    checkpoint: Checkpoint
    model: CaptionModel
    which: str = ""  # how the checkpoint was chosen, for logs and reports


def load_run(
    run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *, checkpoint: str = "best"
) -> Run:
    """Load `<run>/recipe.toml` (with overrides, e.g. generate.beam_size=3) and a checkpoint: the one
    the run selected ('best', see train.select), 'last', or a step number. An export folder (`vicap
    export`) holds one checkpoint: only 'best' applies."""
    from vicap.export import EXPORT_FILE, load_export

    run_dir = Path(run_dir)
    if (run_dir / EXPORT_FILE).is_file():
        if checkpoint != "best":
            raise CheckpointError(
                f"{run_dir}: an export holds one checkpoint; --checkpoint {checkpoint} does not apply"
            )
        return load_export(run_dir, overrides)
    if not (run_dir / "recipe.toml").is_file():
        raise RecipeError(
            f"{run_dir}: not a vicap run directory (no recipe.toml); train one with `vicap train`"
        )
    recipe = load_recipe(run_dir / "recipe.toml", overrides)
    path, which = pick_checkpoint(run_dir, checkpoint)
    ckpt = read_checkpoint(path, kind=VICAP_RUN)
    check_compatible(ckpt, recipe, VICAP_RUN)
    model = build_model(recipe, ckpt)
    log.info("loaded %s: %s", ckpt.path, which)
    return Run(run_dir, recipe, ckpt, model, which)


def build_model(recipe: Recipe, ckpt: Checkpoint) -> CaptionModel:
    """The caption model of `recipe` (its LM loaded) with the checkpoint's trained tensors in it."""
    decoder = load_decoder(recipe.decoder)
    # LoRA runs get fresh adapters here; load_trainable then fills them (and the mapper) in.
    model = CaptionModel.from_recipe(recipe, ckpt.encoder_dim, decoder)
    try:
        model.load_trainable(load_model_state(ckpt))
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    return model.eval()
