"""The `vicap` command: a thin Typer layer; each command reads its options and calls one library function.

Every command goes through `@command`: it sets up logging (`-v` for debug lines) and turns vicap's
user-facing errors (`vicap.errors.USER_ERRORS`) into `error: ...` with exit code 2; anything else is a
bug and keeps its traceback. Recipe overrides are one syntax everywhere: `--set KEY=VALUE`, repeatable.
Nothing here imports torch at module level, so `vicap --help` is quick.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ClipCap-style image captioning for low-resource languages.",
)
baseline_app = typer.Typer(
    no_args_is_help=True, help="The CNN+LSTM baseline: same manifest, same scoring as vicap runs."
)
app.add_typer(baseline_app, name="baseline")

RECIPE_HELP = "recipe: a shipped recipe's name (see `vicap list`) or a TOML file"
Sets = typer.Option([], "--set", help="recipe override KEY=VALUE, e.g. --set train.lr=1e-4 (repeatable)")
# Overrides as bare arguments (`vicap train R train.lr=1e-4`): the syntax of vicap 0.1, still accepted
# with a deprecation message; `--set` is the one syntax.
OldOverrides = typer.Argument(None, hidden=True, help="deprecated: use --set KEY=VALUE")
Verbose = typer.Option(False, "-v", "--verbose", help="also print debug lines")
DeviceOption = typer.Option(
    None,
    "--device",
    help="auto (the GPU if there is one), cpu, cuda, cuda:1, mps, ... (default: the recipe's train.device)",
)

CheckpointOption = typer.Option(
    "best",
    "--checkpoint",
    help="best (the run's selected checkpoint, see train.select), last, or a step number",
)


class UserError(Exception):
    """A problem with the command line itself; printed without a traceback, exit code 2."""


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from vicap.errors import USER_ERRORS

    return (*USER_ERRORS, UserError)


def command(group: typer.Typer = app, name: str | None = None):
    """Register a command: logging set up from its `verbose` option, user errors as `error: ...`."""

    def register(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            from vicap.log import configure
            from vicap.runtime import log_thread_policy

            configure(kwargs.get("verbose", False))
            log_thread_policy()  # chosen before logging was set up
            try:
                return fn(**kwargs)
            except _user_errors() as e:
                _fail(e)

        return group.command(name)(run)

    return register


def overrides(sets: list[str], old: list[str] | None) -> list[str]:
    """The command's recipe overrides: `--set` ones, plus deprecated bare ones (with a message)."""
    if old:
        typer.secho(
            f"warning: overrides as bare arguments are deprecated: write --set {' --set '.join(old)}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return [*(old or []), *sets]


@app.callback()
def _main(
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads for torch (default: $VICAP_THREADS, else $OMP_NUM_THREADS, else the CPUs this "
        "process may use); given before the command: vicap --threads 1 train ...",
    ),
) -> None:
    # Before any command imports torch: OpenMP reads its environment once, when torch loads it.
    from vicap.runtime import apply_thread_policy

    try:
        apply_thread_policy(threads)
    except _user_errors() as e:
        _fail(e)


def _register_prepare() -> None:
    from data_prep.cli import prepare_command

    command(name="prepare")(prepare_command)


_register_prepare()


@command()
def validate(
    recipes: list[str] = typer.Argument(
        ..., help="recipes to check: shipped names (see `vicap list`) or TOML files; no weights are loaded"
    ),
    sets: list[str] = Sets,
    verbose: bool = Verbose,
) -> None:
    """Check recipes: unknown keys, wrong types, unknown registry names and bad values are reported with
    file and key (exit code 1)."""
    from vicap.errors import ModelLoadError
    from vicap.model import check_recipe_lengths
    from vicap.recipe import Recipe, RecipeError, find_recipe, load_any_recipe

    bad = 0
    for spec in recipes:
        try:
            recipe = load_any_recipe(spec, sets)
            lengths = ""
            if isinstance(recipe, Recipe):  # caption lengths against the LM's positions, from its config
                try:
                    limit = check_recipe_lengths(recipe)
                    lengths = f"; lengths fit the LM's {limit} positions" if limit else ""
                except ModelLoadError as e:
                    lengths = f"; caption lengths not checked (the LM: {e}), they are checked when it loads"
                except RecipeError as e:
                    raise RecipeError(f"{find_recipe(spec)}: {e}") from None
            typer.echo(f"ok    {spec}  ({recipe.summary()}{lengths})")
        except RecipeError as e:
            bad += 1
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    if bad:
        raise typer.Exit(1)


@command(name="list")
def list_registered(verbose: bool = Verbose) -> None:
    """Print the shipped recipes and the registered encoders, mappers, languages and dataset adapters."""
    from vicap.recipe import SHIPPED_DIR
    from vicap.registry import catalog

    notes = {
        "recipes": f"run one by name, e.g. `vicap validate NAME`; to edit one, copy it from {SHIPPED_DIR}",
        "languages": "any other ISO 639 code gets the generic fallback",
    }
    for group, rows in catalog().items():
        typer.echo(f"{group}" + (f" ({notes[group]})" if group in notes else "") + ":")
        width = max([14, *(len(name) + 1 for name, _ in rows)])
        for name, doc in rows:
            typer.echo(f"  {name:{width}s} {doc}")


@command()
def features(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    device: str = DeviceOption,
    verbose: bool = Verbose,
) -> None:
    """Prepare the recipe's manifest and extract one feature per unique image into the feature store.

    Under `accelerate launch` (or `python -m vicap.launch`) every process encodes its share."""
    from vicap.pipeline import build_features
    from vicap.recipe import load_recipe

    store = build_features(load_recipe(recipe, overrides(sets, deprecated)), device=device)
    typer.echo(
        f"{store.root}: {store.features.shape[0]} images x {store.dim} dims; {len(store.failures)} unreadable"
    )


@command(name="train")
def train_cmd(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
    verbose: bool = Verbose,
) -> None:
    """Train a recipe's mapper (and LM when tuned). Runs under `accelerate launch` unchanged."""
    from vicap.recipe import load_recipe
    from vicap.train import train

    run_dir = train(load_recipe(recipe, overrides(sets, deprecated)), resume=resume)
    typer.echo(f"run saved to {run_dir}")


@command()
def caption(
    run_dir: Path = typer.Argument(..., help="a trained run directory, or a folder from `vicap export`"),
    paths: list[Path] = typer.Argument(
        ..., help="image files, folders (searched recursively) and manifests (.jsonl from `vicap prepare`)"
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="write FILE.jsonl or FILE.csv (default: JSON lines on stdout)"
    ),
    n_best: int = typer.Option(None, "--n-best", help="also list the K best captions (generate.n_best=K)"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per batch (generate.batch_size=N)"),
    strict: bool = typer.Option(False, "--strict", help="stop with exit code 1 at the first unusable file"),
    workers: int = typer.Option(
        1, "--workers", min=0, help="image-decoding processes (0: decode in this one)"
    ),
    sets: list[str] = Sets,
    device: str = DeviceOption,
    checkpoint: str = CheckpointOption,
    verbose: bool = Verbose,
) -> None:
    """Caption images with a trained run: one row per image (image, caption, score).

    Files that cannot be used (missing, not an image, truncated, too large) are reported by name and
    skipped, with a count at the end; the exit code stays 0 unless --strict.
    """
    from tqdm import tqdm

    from vicap.captioner import caption_to_file
    from vicap.images import ImageError

    sets = list(sets)
    sets += [f"generate.n_best={n_best}"] if n_best is not None else []
    sets += [f"generate.batch_size={batch_size}"] if batch_size is not None else []

    def skipped(message: str) -> None:
        tqdm.write(f"skipped {message}", file=sys.stderr)

    try:
        summary = caption_to_file(
            run_dir,
            paths,
            out,
            sets,
            strict=strict,
            progress=None,
            num_workers=workers,
            on_skip=skipped,
            device=device,
            checkpoint=checkpoint,
        )
    except ImageError as e:  # only raised with --strict
        typer.secho(f"error: {e} (--strict)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    n_skipped = len(summary.skipped)
    typer.echo(
        f"captioned {summary.captioned} image(s)"
        + (f"; skipped {n_skipped} unusable file(s), listed above" if n_skipped else "")
        + (f"; wrote {out}" if out is not None else ""),
        err=True,
    )


@command()
def export(
    run_dir: Path = typer.Argument(..., help="a trained run directory"),
    out_dir: Path = typer.Argument(..., help="a new (or empty) folder to write the export to"),
    checkpoint: str = CheckpointOption,
    copy_models: bool = typer.Option(
        False,
        "--copy-models",
        help="copy the local encoder and LM files into the export, so it loads on a machine without them",
    ),
    verbose: bool = Verbose,
) -> None:
    """Write a run as a self-contained folder: trained weights (safetensors), the resolved recipe, a model
    card with the evaluation table, and the encoder/LM references or copies. Load it with
    `Captioner.from_pretrained(OUT_DIR)` or `vicap caption OUT_DIR ...`."""
    from vicap.export import export_run

    out = export_run(run_dir, out_dir, checkpoint=checkpoint, copy_models=copy_models)
    typer.echo(f"exported {run_dir} to {out}")


def _print_report(report: dict, run_dir: Path) -> None:
    from vicap.evaluate import score_table

    for level, rows in report["scores"].items():
        typer.echo(f"\n{level}-level tokens, {report['images']} images:\n" + score_table(rows))
    typer.echo(
        f"\ncheckpoint: {report.get('checkpoint') or report['step']}; report: {Path(run_dir) / 'report.md'}"
    )


@command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a trained run directory"),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    split: str = typer.Option(None, help="split to score (default: the recipe's eval.split)"),
    device: str = DeviceOption,
    checkpoint: str = CheckpointOption,
    verbose: bool = Verbose,
) -> None:
    """Caption the held-out split and score it; writes report.json and report.md into the run."""
    from vicap.evaluate import evaluate_run

    report = evaluate_run(
        run_dir, overrides(sets, deprecated), split=split, device=device, checkpoint=checkpoint
    )
    _print_report(report, run_dir)


@command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="where data, stand-in models and the run go"),
    dataset: str = typer.Option(
        "shapes",
        "--dataset",
        help="shapes (the demo: one kind of shape per image) or hard (scenes of 2-4 shapes with relations, "
        "textures and clutter: a benchmark with headroom)",
    ),
    recipe: str = typer.Option(
        None, help=f"{RECIPE_HELP} (default: the set's, demo_vi_synthetic for shapes)"
    ),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    verbose: bool = Verbose,
) -> None:
    """Offline end-to-end demo: synthetic KTVIC-layout data, tiny stand-in models, train, caption, score."""
    from vicap.demo import demo_set, run_demo
    from vicap.evaluate import FLOOR, HUMAN, score_table

    spec = demo_set(dataset)  # an unknown name is an error before anything is printed or built
    typer.echo(
        "vicap demo: everything is built locally, nothing is downloaded.\n"
        f"  data   : {spec.blurb}, in KTVIC's file layout\n"
        "  models : STAND-INS so the pipeline runs offline - a tiny CLIP trained on the demo images and a\n"
        "           tiny GPT-2 with its own BPE tokenizer; real recipes name real CLIP and GPT-2 weights\n"
        "  tuning : the tiny LM is trained with the mapper (ClipCap's MLP + fine-tuned LM setting),\n"
        "           because a randomly initialised LM has nothing useful to keep frozen\n"
    )
    report = run_demo(out, dataset=dataset, recipe_path=recipe, overrides=tuple(overrides(sets, deprecated)))
    for ex in report["examples"][:3]:
        typer.echo(f"  {ex['image']}\n    vicap    : {ex['caption']}\n    reference: {ex['reference']}")
    for level, rows in report["scores"].items():
        typer.echo(f"\n{level}-level tokens, held-out split '{report['split']}', {report['images']} images:")
        typer.echo(score_table(rows))
    syllables = report["scores"]["syllable"]
    ours, floor = syllables["vicap"]["CIDEr-D"], syllables[FLOOR]["CIDEr-D"]
    typer.echo(
        f"\nCIDEr-D (syllables): vicap {ours:.3f} vs most-frequent-caption {floor:.3f} "
        f'({ours / max(floor, 1e-9):.1f}x); baseline caption: "{report["baseline_caption"]}"'
    )
    if HUMAN in syllables:
        human = syllables[HUMAN]["CIDEr-D"]
        typer.echo(
            f"CIDEr-D (syllables): human leave-one-out {human:.3f}; vicap at {ours / max(human, 1e-9):.2f}x"
        )
    typer.echo(f"checkpoint: {report['checkpoint'] or 'step ' + str(report['step'])}")
    typer.echo("stage times (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    typer.echo(f"wall time: {report['wall_s']:.0f} s; report: {Path(report['run']) / 'report.md'}")


@command(baseline_app, name="train")
def baseline_train(
    recipe: str = typer.Argument(
        ..., help="baseline recipe: a shipped name (baseline_*, see `vicap list`) or a file"
    ),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
    verbose: bool = Verbose,
) -> None:
    """Train the CNN+LSTM baseline of a baseline recipe; writes the run named by `train.output_dir`."""
    from vicap.baseline.train import train_baseline_file

    run_dir = train_baseline_file(recipe, overrides(sets, deprecated), resume=resume)
    typer.echo(f"baseline run saved to {run_dir}")


@command(baseline_app, name="evaluate")
def baseline_evaluate(
    run_dir: Path = typer.Argument(..., help="a trained baseline run directory"),
    deprecated: list[str] = OldOverrides,
    sets: list[str] = Sets,
    split: str = typer.Option(None, help="split to score (default: the recipe's eval.split)"),
    device: str = DeviceOption,
    checkpoint: str = CheckpointOption,
    verbose: bool = Verbose,
) -> None:
    """Caption the held-out split with the baseline and score it exactly as `vicap evaluate` does."""
    from vicap.baseline.train import evaluate_baseline

    report = evaluate_baseline(
        run_dir, overrides(sets, deprecated), split=split, device=device, checkpoint=checkpoint
    )
    _print_report(report, run_dir)


@command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="evaluated run directories (vicap or baseline)"),
    reference: list[str] = typer.Option(
        [], "--reference", help="published rows to add: ktvic (ViClipCap paper), coco-clipcap (ClipCap paper)"
    ),
    out: Path = typer.Option(Path("compare"), "--out", help="folder for the table, charts and gallery"),
    level: list[str] = typer.Option([], "--level", help="only these token levels (default: all)"),
    verbose: bool = Verbose,
) -> None:
    """Side-by-side table (Markdown, CSV, JSON), metric chart, loss curves and caption gallery."""
    from vicap.compare import compare_runs

    result = compare_runs(run_dirs, out, references=reference, levels=level or None)
    typer.echo(result["markdown"])
    for what, path in result["files"].items():
        typer.echo(f"{what}: {path}")


@command()
def serve(
    run_dirs: list[Path] = typer.Argument(
        ..., help="trained run directories (or `vicap export` folders), shown side by side"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (0.0.0.0: all)"),
    port: int = typer.Option(7860, "--port", help="port to listen on"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="largest image accepted"),
    max_reference_chars: int = typer.Option(
        10_000, "--max-reference-chars", min=1, help="most characters in the reference box (more: refused)"
    ),
    max_reference_lines: int = typer.Option(
        50, "--max-reference-lines", min=1, help="most reference captions, one per line (more: refused)"
    ),
    max_batch_files: int = typer.Option(64, "--max-batch-files", min=1, help="most images per batch request"),
    device: str = DeviceOption,
    checkpoint: str = CheckpointOption,
    verbose: bool = Verbose,
) -> None:
    """A web page for trying runs: upload an image, compare captions, score against a reference."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('vicap serve needs the serve extra: pip install -e ".[serve]"') from None
    from vicap.serve import Limits
    from vicap.serve import serve as serve_app

    limits = Limits(
        upload_bytes=int(max_upload_mb * 2**20),
        reference_chars=max_reference_chars,
        reference_lines=max_reference_lines,
        batch_files=max_batch_files,
    )
    serve_app(run_dirs, host=host, port=port, limits=limits, device=device, checkpoint=checkpoint)


def main() -> None:
    try:
        app()
    except SystemExit as done:
        # a failed process is ended by the launcher; waiting for the others would hang
        if not done.code and _leave_process_group():
            # Leaving the group did not make the exit safe: in about one launch in twenty a process still
            # aborted in interpreter teardown ("terminate called without an active exception", SIGABRT)
            # after the run was saved, as native communication threads were destroyed. Everything is
            # written and closed by now, so the process ends here, without that teardown.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


def _leave_process_group() -> bool:
    """Under `accelerate launch`, leave the process group together before the processes exit: one that
    exits with it open, or while another still uses it, can abort as its communication threads are torn
    down, after the run was saved. True when there was a group to leave. In-process callers keep
    theirs (see make_accelerator)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


if __name__ == "__main__":
    main()
