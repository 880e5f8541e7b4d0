"""The `vicap` command: a thin Typer layer; each command reads its options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ClipCap-style image captioning for low-resource languages.",
)

Overrides = typer.Argument(None, help="dotted recipe overrides, e.g. train.lr=1e-4 generate.beam_size=3")
RECIPE_HELP = "recipe: a shipped recipe's name (see `vicap list`) or a TOML file"
DeviceOption = typer.Option(
    None,
    "--device",
    help="auto (the GPU if there is one), cpu, cuda, cuda:1, mps, ... (default: the recipe's train.device)",
)


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


class UserError(Exception):
    """Errors whose message is the whole story: printed without a traceback, exit code 2."""


def _setup(verbose: bool) -> None:
    from vicap.log import configure
    from vicap.runtime import log_thread_policy

    configure(verbose)
    log_thread_policy()  # chosen before logging was set up


def _user_errors():
    from vicap.errors import USER_ERRORS

    return (*USER_ERRORS, UserError)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _register_prepare() -> None:
    from data_prep.cli import prepare_command

    app.command("prepare")(prepare_command)


_register_prepare()


@app.command()
def validate(
    recipes: list[str] = typer.Argument(
        ..., help="recipes to check: shipped names (see `vicap list`) or TOML files; no weights are loaded"
    ),
    overrides: list[str] = typer.Option([], "--set", help="override to apply, e.g. --set train.lr=1e-4"),
) -> None:
    """Check recipes: unknown keys, wrong types, unknown registry names and bad values are reported with
    file and key (exit code 1)."""
    from vicap.baseline.recipe import is_baseline_recipe, load_baseline_recipe
    from vicap.recipe import RecipeError, load_recipe

    bad = 0
    for spec in recipes:
        try:
            if is_baseline_recipe(spec):
                b = load_baseline_recipe(spec, overrides)
                typer.echo(f"ok    {spec}  (baseline: {b.encoder.cnn} -> {b.decoder.type} LSTM)")
                continue
            recipe = load_recipe(spec, overrides)
            typer.echo(
                f"ok    {spec}  ({recipe.encoder.model} -> {recipe.mapper.type} -> {recipe.decoder.model}, "
                f"tuning={recipe.decoder.tuning})"
            )
        except RecipeError as e:
            bad += 1
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    if bad:
        raise typer.Exit(1)


@app.command("list")
def list_registered() -> None:
    """Print the shipped recipes and the registered encoders, mappers, languages and dataset adapters."""
    from data_prep.datasets import ADAPTERS
    from data_prep.languages import LANGUAGES
    from vicap.encoders import ENCODERS
    from vicap.mappers import MAPPERS
    from vicap.recipe import SHIPPED_DIR, shipped_descriptions

    typer.echo(
        f"recipes (run one by name, e.g. `vicap validate NAME`; to edit one, copy it from {SHIPPED_DIR}):"
    )
    shipped = shipped_descriptions()
    width = max((len(name) for name, _ in shipped), default=0) + 1
    for name, doc in shipped:
        typer.echo(f"  {name:{width}s} {doc}")
    typer.echo("encoders:")
    for name, doc in ENCODERS.describe():
        typer.echo(f"  {name:14s} {doc}")
    typer.echo(
        "decoders:\n  any Hugging Face causal LM (hub id or local folder): gpt2, NlpHUST/gpt2-vietnamese, ..."
    )
    typer.echo("mappers:")
    for name, doc in MAPPERS.describe():
        typer.echo(f"  {name:14s} {doc}")
    typer.echo("languages (any other ISO 639 code gets the generic fallback):")
    for code in sorted(LANGUAGES):
        typer.echo(f"  {code:14s} {LANGUAGES[code].name}")
    typer.echo("dataset adapters:")
    for name in sorted(ADAPTERS):
        typer.echo(f"  {name:14s} {ADAPTERS[name].doc}")


@app.command()
def features(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    overrides: list[str] = Overrides,
    device: str = DeviceOption,
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Prepare the recipe's manifest and extract one feature per unique image into the feature store.

    Under `accelerate launch` (or `python -m vicap.launch`) every process encodes its share."""
    _setup(verbose)
    from vicap.pipeline import build_features
    from vicap.recipe import load_recipe

    try:
        store = build_features(load_recipe(recipe, overrides or []), device=device)
    except _user_errors() as e:
        _fail(e)
    typer.echo(
        f"{store.root}: {store.features.shape[0]} images x {store.dim} dims; {len(store.failures)} unreadable"
    )


@app.command("train")
def train_cmd(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    overrides: list[str] = Overrides,
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Train a recipe's mapper (and LM when tuned). Runs under `accelerate launch` unchanged."""
    _setup(verbose)
    from vicap.recipe import load_recipe
    from vicap.train import train

    try:
        run_dir = train(load_recipe(recipe, overrides or []), resume=resume)
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"run saved to {run_dir}")


@app.command()
def caption(
    run_dir: Path = typer.Argument(..., help="a trained run directory"),
    paths: list[Path] = typer.Argument(
        ..., help="image files, folders (searched recursively) and manifests (.jsonl from `vicap prepare`)"
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="write FILE.jsonl or FILE.csv (default: JSON lines on stdout)"
    ),
    n_best: int = typer.Option(None, "--n-best", help="also list the K best captions (generate.n_best=K)"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per batch (generate.batch_size=N)"),
    strict: bool = typer.Option(False, "--strict", help="stop with exit code 1 at the first unusable file"),
    workers: int = typer.Option(1, "--workers", help="image-decoding processes (0: decode in this one)"),
    overrides: list[str] = typer.Option(
        [], "--set", help="recipe override, e.g. --set generate.beam_size=3 (repeatable)"
    ),
    device: str = DeviceOption,
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Caption images with a trained run: one row per image (image, caption, score).

    Files that cannot be used (missing, not an image, truncated, too large) are reported by name and
    skipped, with a count at the end; the exit code stays 0 unless --strict.
    """
    _setup(verbose)
    from tqdm import tqdm

    from vicap.captioner import OUTPUT_SUFFIXES, caption_to_file
    from vicap.images import ImageError

    sets = list(overrides)
    sets += [f"generate.n_best={n_best}"] if n_best is not None else []
    sets += [f"generate.batch_size={batch_size}"] if batch_size is not None else []

    def skipped(message: str) -> None:
        tqdm.write(f"skipped {message}", file=sys.stderr)

    try:
        if out is not None and out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UserError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_SUFFIXES)}")
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
        )
    except ImageError as e:  # only raised with --strict
        typer.secho(f"error: {e} (--strict)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except _user_errors() as e:
        _fail(e)
    n_skipped = len(summary.skipped)
    typer.echo(
        f"captioned {summary.captioned} image(s)"
        + (f"; skipped {n_skipped} unusable file(s), listed above" if n_skipped else "")
        + (f"; wrote {out}" if out is not None else ""),
        err=True,
    )


def _print_report(report: dict, run_dir: Path) -> None:
    from vicap.evaluate import score_table

    for level, rows in report["scores"].items():
        typer.echo(f"\n{level}-level tokens, {report['images']} images:\n" + score_table(rows))
    typer.echo(f"\nreport: {Path(run_dir) / 'report.md'}")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a trained run directory"),
    overrides: list[str] = Overrides,
    split: str = typer.Option(None, help="split to score (default: the recipe's eval.split)"),
    device: str = DeviceOption,
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Caption the held-out split and score it; writes report.json and report.md into the run."""
    _setup(verbose)
    from vicap.evaluate import evaluate_run

    try:
        report = evaluate_run(run_dir, overrides or [], split=split, device=device)
    except _user_errors() as e:
        _fail(e)
    _print_report(report, run_dir)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="where data, stand-in models and the run go"),
    recipe: str = typer.Option(None, help=f"{RECIPE_HELP} (default: demo_vi_synthetic)"),
    overrides: list[str] = Overrides,
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Offline end-to-end demo: synthetic KTVIC-layout data, tiny stand-in models, train, caption, score."""
    _setup(verbose)
    from vicap.demo import run_demo
    from vicap.evaluate import score_table

    typer.echo(
        "vicap demo: everything is built locally, nothing is downloaded.\n"
        "  data   : synthetic shapes with 5 Vietnamese captions each, in KTVIC's file layout\n"
        "  models : STAND-INS so the pipeline runs offline - a tiny CLIP trained on the demo images and a\n"
        "           tiny GPT-2 with its own BPE tokenizer; real recipes name real CLIP and GPT-2 weights\n"
        "  tuning : the tiny LM is trained with the mapper (ClipCap's MLP + fine-tuned LM setting),\n"
        "           because a randomly initialised LM has nothing useful to keep frozen\n"
    )
    try:
        report = run_demo(out, recipe_path=recipe, overrides=tuple(overrides or ()))
    except _user_errors() as e:
        _fail(e)
    for ex in report["examples"][:3]:
        typer.echo(f"  {ex['image']}\n    vicap    : {ex['caption']}\n    reference: {ex['reference']}")
    for level, rows in report["scores"].items():
        typer.echo(f"\n{level}-level tokens, held-out split '{report['split']}', {report['images']} images:")
        typer.echo(score_table(rows))
    ours = report["scores"]["syllable"]["vicap"]["CIDEr-D"]
    floor = report["scores"]["syllable"]["most frequent train caption"]["CIDEr-D"]
    typer.echo(
        f"\nCIDEr-D (syllables): vicap {ours:.3f} vs most-frequent-caption {floor:.3f} "
        f'({ours / max(floor, 1e-9):.1f}x); baseline caption: "{report["baseline_caption"]}"'
    )
    typer.echo("stage times (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    typer.echo(f"wall time: {report['wall_s']:.0f} s; report: {Path(report['run']) / 'report.md'}")


baseline_app = typer.Typer(
    no_args_is_help=True, help="The CNN+LSTM baseline: same manifest, same scoring as vicap runs."
)
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("train")
def baseline_train(
    recipe: str = typer.Argument(
        ..., help="baseline recipe: a shipped name (baseline_*, see `vicap list`) or a file"
    ),
    overrides: list[str] = Overrides,
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Train the CNN+LSTM baseline of a baseline recipe; writes the run named by `train.output_dir`."""
    _setup(verbose)
    from vicap.baseline.train import train_baseline_file

    try:
        run_dir = train_baseline_file(recipe, overrides or [], resume=resume)
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"baseline run saved to {run_dir}")


@baseline_app.command("evaluate")
def baseline_evaluate(
    run_dir: Path = typer.Argument(..., help="a trained baseline run directory"),
    overrides: list[str] = Overrides,
    split: str = typer.Option(None, help="split to score (default: the recipe's eval.split)"),
    device: str = DeviceOption,
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Caption the held-out split with the baseline and score it exactly as `vicap evaluate` does."""
    _setup(verbose)
    from vicap.baseline.train import evaluate_baseline

    try:
        report = evaluate_baseline(run_dir, overrides or [], split=split, device=device)
    except _user_errors() as e:
        _fail(e)
    _print_report(report, run_dir)


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="evaluated run directories (vicap or baseline)"),
    reference: list[str] = typer.Option(
        [], "--reference", help="published rows to add: ktvic (ViClipCap paper), coco-clipcap (ClipCap paper)"
    ),
    out: Path = typer.Option(Path("compare"), "--out", help="folder for the table, charts and gallery"),
    level: list[str] = typer.Option([], "--level", help="only these token levels (default: all)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Side-by-side table (Markdown, CSV, JSON), metric chart, loss curves and caption gallery."""
    _setup(verbose)
    from vicap.compare import compare_runs

    try:
        result = compare_runs(run_dirs, out, references=reference, levels=level or None)
    except _user_errors() as e:
        _fail(e)
    typer.echo(result["markdown"])
    for what, path in result["files"].items():
        typer.echo(f"{what}: {path}")


@app.command()
def serve(
    run_dirs: list[Path] = typer.Argument(..., help="trained run directories, shown side by side"),
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
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """A web page for trying runs: upload an image, compare captions, score against a reference."""
    _setup(verbose)
    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail(UserError('vicap serve needs the serve extra: pip install -e ".[serve]"'))
    from vicap.serve import Limits
    from vicap.serve import serve as serve_app

    limits = Limits(
        upload_bytes=int(max_upload_mb * 2**20),
        reference_chars=max_reference_chars,
        reference_lines=max_reference_lines,
        batch_files=max_batch_files,
    )
    try:
        serve_app(run_dirs, host=host, port=port, limits=limits, device=device)
    except _user_errors() as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
