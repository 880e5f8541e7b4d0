"""`vicap export`: a trained run as a self-contained folder that loads offline.

    OUT_DIR/
      model.safetensors   the checkpoint's trained tensors (the mapper, plus LoRA adapters or the LM's
                          weights when the run tuned them), with the checkpoint's metadata
      recipe.toml         the resolved recipe; model references rewritten (see below)
      export.json         format, the run and checkpoint it came from, which settings point into models/
      README.md           a model card: what it is, the run's evaluation table, how to load it
      models/             with --copy-models: copies of the local encoder / LM files and folders

A model reference (encoder.model, encoder.pretrained, decoder.model) that names a local file or
folder is written as an absolute path, or, with --copy-models, copied under models/ and written
relative to the export (export.json lists those settings; `load_export` makes them absolute again
wherever the folder now is). A hub name (gpt2, ViT-B-32 with a tag) stays a name: the machine that
loads the export needs it in its Hugging Face / open_clip cache, and --copy-models refuses it by name
rather than export something that is not self-contained. Nothing is pickled and no model code is
imported from the folder: tensors are safetensors, settings TOML and JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from vicap.checkpoint import (
    MODEL_FILE,
    VICAP_RUN,
    check_compatible,
    load_model_state,
    pick_checkpoint,
    read_checkpoint,
)
from vicap.errors import CheckpointError, ModelLoadError, RecipeError, UsageError
from vicap.recipe import Recipe, load_recipe
from vicap.resolve import LOCAL_DIR, resolve

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "vicap-export-1"
MODELS_DIR = "models"


@dataclass(frozen=True)
class Reference:
    """A model setting of the recipe and what it points at."""

    key: str  # "decoder.model"
    value: str  # as the recipe writes it
    path: Path | None  # the local file or folder it names; None for a name
    copy_as: str = ""  # where --copy-models puts it, relative to the export folder
    cached: bool = False  # a hub / open_clip pretrained name: read from the machine's model cache


def model_references(recipe: Recipe) -> list[Reference]:
    """The recipe's model settings, each resolved as its loader resolves it (a local path that is not
    there is a ModelLoadError naming it)."""
    enc, dec = recipe.encoder, recipe.decoder
    family = enc.name if enc.name in ("open_clip", "timm") else "transformers"
    encoder = resolve(enc.model, "encoder.model", family, enc.pretrained)
    # an open_clip or timm model name with a local weights file needs no download: the library ships
    # the architecture
    weights = encoder.weights_file if encoder.kind in ("open_clip", "timm") else None
    refs = [
        Reference(
            "encoder.model",
            enc.model,
            encoder.path,
            f"{MODELS_DIR}/encoder",
            not encoder.local and not weights,
        )
    ]
    if weights is not None:
        refs.append(
            Reference("encoder.pretrained", enc.pretrained, weights, f"{MODELS_DIR}/weights/{weights.name}")
        )
    decoder = resolve(dec.model, "decoder.model", gguf_file=dec.gguf_file)
    if decoder.kind == "gguf" and dec.gguf_file:  # only the one file the recipe reads, in a folder
        refs.append(Reference("decoder.model", dec.model, decoder.path.parent, f"{MODELS_DIR}/decoder"))
    elif decoder.kind == "gguf":
        refs.append(Reference("decoder.model", dec.model, decoder.path, f"{MODELS_DIR}/{decoder.path.name}"))
    else:
        refs.append(
            Reference("decoder.model", dec.model, decoder.path, f"{MODELS_DIR}/decoder", not decoder.local)
        )
    return refs


def _with_path(value: str, path: Path | str) -> str:
    """`value` pointing at `path`, keeping its `local-dir:` prefix when it has one."""
    return (LOCAL_DIR if value.startswith(LOCAL_DIR) else "") + str(path)


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best", copy_models: bool = False
) -> Path:
    """Write the run's checkpoint `checkpoint` ('best', 'last' or a step) as an export folder (see the
    module docstring). `out_dir` must not exist or be empty; the folder is written beside it and
    renamed into place once complete, so a failed export leaves nothing half-written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / VICAP_RUN.recipe_file).is_file():
        raise RecipeError(
            f"{run_dir}: not a vicap run directory (no recipe.toml); train one with `vicap train`"
        )
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise UsageError(f"{out_dir}: already exists and is not an empty folder; name a new folder")
    recipe = load_recipe(run_dir / VICAP_RUN.recipe_file)
    path, which = pick_checkpoint(run_dir, checkpoint)
    ckpt = read_checkpoint(path, kind=VICAP_RUN)
    check_compatible(ckpt, recipe, VICAP_RUN)
    state = load_model_state(ckpt)  # checked finite before anything is written

    refs = model_references(recipe)
    if copy_models:
        remote = [r for r in refs if r.cached]
        if remote:
            raise UsageError(
                "--copy-models copies local files and folders, and "
                + ", ".join(f"{r.key} = {r.value!r}" for r in remote)
                + " is a hub or open_clip name with no local copy vicap can find; set it to a local "
                "folder or file in the run's recipe, or export without --copy-models (the model card "
                "names it)"
            )
    changes = {
        r.key: _with_path(r.value, r.copy_as if copy_models else r.path.absolute())
        for r in refs
        if r.path is not None
    }
    exported = recipe.replace(**changes) if changes else recipe

    from safetensors.torch import save_file

    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, tmp / MODEL_FILE, metadata={**ckpt.meta, "recipe": exported.to_json()})
        (tmp / VICAP_RUN.recipe_file).write_text(exported.to_toml(), encoding="utf-8")
        copied = {}
        if copy_models:
            for r in refs:
                if r.path is None:
                    continue
                source, target = r.path, tmp / r.copy_as
                if r.key == "decoder.model" and recipe.decoder.gguf_file:  # that file of the folder only
                    source, target = source / recipe.decoder.gguf_file, target / recipe.decoder.gguf_file
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target)
                else:
                    shutil.copy2(source, target)
                copied[r.key] = r.copy_as
        info = {
            "format": EXPORT_FORMAT,
            "run": str(run_dir.absolute()),
            "checkpoint": which,
            "step": ckpt.step,
            "copied": copied,  # settings whose paths are relative to the export folder
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        card = model_card(exported, refs, info, state, _report(run_dir), copied)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", run_dir, which, out_dir)
    return out_dir


def _report(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_card(
    recipe: Recipe, refs: list[Reference], info: dict, state: dict, report: dict | None, copied: dict
) -> str:
    """The export's README.md: the model, its evaluation, the models it needs, how to load it."""
    from vicap.evaluate import score_table
    from vicap.serve import recipe_summary

    groups: dict[str, int] = {}
    for name, t in state.items():
        part = "mapper" if name.startswith("mapper.") else "LM LoRA adapters" if ".lora_" in name else "LM"
        groups[part] = groups.get(part, 0) + t.numel()
    out = [
        f"# {recipe.name or 'vicap captioner'}",
        "",
        recipe.description or "An image captioner trained with vicap.",
        "",
        f"- model: {recipe_summary(recipe)}",
        f"- checkpoint: {info['checkpoint']}, of the run {info['run']}",
        "- trained tensors in model.safetensors: "
        + ", ".join(f"{part} {n:,} parameters" for part, n in groups.items()),
        "- decoding (recipe.toml [generate]): "
        + ", ".join(f"{k} = {v!r}" for k, v in recipe.to_dict()["generate"].items()),
        "",
        "## Evaluation",
        "",
    ]
    if report is None:
        out += ["The run has no report.json (run `vicap evaluate` on it before exporting).", ""]
    else:
        if report.get("step") != info["step"]:
            out += [
                f"Scored at step {report.get('step')}, not the exported step {info['step']}: "
                "re-run `vicap evaluate` with this checkpoint for its own scores.",
                "",
            ]
        for level, rows in report.get("scores", {}).items():
            out += [
                f"{level}-level tokens, split `{report.get('split')}`, {report.get('images')} images:",
                "",
                score_table(rows),
                "",
            ]
    out += ["## Models it needs", "", "| setting | value | where |", "|---|---|---|"]
    values = recipe.to_dict()
    for r in refs:
        section, key = r.key.split(".")
        value = values[section][key]
        where = (
            "copied into this folder"
            if r.key in copied
            else "a local path on the exporting machine"
            if r.path is not None
            else "a hub / open_clip name: needs the model in this machine's cache (offline)"
            if r.cached
            else "an open_clip architecture name (ships with open_clip)"
        )
        out.append(f"| {r.key} | `{value}` | {where} |")
    out += [
        "",
        "## Use",
        "",
        "```python",
        "from vicap import Captioner",
        "",
        'cap = Captioner.from_pretrained("THIS_FOLDER")',
        'rows = cap(["photo.jpg"], strategy="beam", beam_size=3)',
        'print(rows[0]["caption"])',
        "```",
        "",
        "or `vicap caption THIS_FOLDER photo.jpg`. Loading reads only local files: safetensors, TOML and "
        "JSON, never pickles or model code.",
        "",
    ]
    return "\n".join(out)


def load_export(folder: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """The export in `folder` as a `vicap.runs.Run`; settings copied under models/ point into the
    folder wherever it now is. A model it names that is not there is a ModelLoadError naming the path."""
    from vicap.runs import Run, build_model

    folder = Path(folder)
    file = folder / EXPORT_FILE
    if not file.is_file():
        raise RecipeError(f"{folder}: not a vicap export (no {EXPORT_FILE}); write one with `vicap export`")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
        if info.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
        copied = dict(info.get("copied", {}))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    recipe = load_recipe(folder / VICAP_RUN.recipe_file, overrides)
    ckpt = read_checkpoint(folder, kind=VICAP_RUN)
    check_compatible(ckpt, recipe, VICAP_RUN)
    values = recipe.to_dict()
    here = {}
    for key, rel in copied.items():
        section, name = key.split(".")
        here[key] = _with_path(values[section][name], (folder / rel).absolute())
    recipe = recipe.replace(**here) if here else recipe
    try:  # a missing folder or file, named before any model loads
        model_references(recipe)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"{folder}: this export refers to a model that is not on this machine: {e}\n"
            "Copy it to that path, or export the run again with `vicap export --copy-models`."
        ) from None
    which = f"exported: {info.get('checkpoint') or f'step {ckpt.step}'}"
    model = build_model(recipe, ckpt)
    log.info("loaded the export %s: %s", folder, which)
    return Run(folder, recipe, ckpt, model, which)
