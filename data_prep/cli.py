"""`vicap prepare`: a thin Typer command over `data_prep.datasets.prepare`.

`prepare_command` is a plain function with Typer-typed parameters; vicap's CLI
registers it (`app.command("prepare")(prepare_command)`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from data_prep.datasets import ADAPTERS, DataError, prepare, report_path
from data_prep.datasets.base import MAX_CAPTION_CHARS
from data_prep.errors import DataPrepError
from data_prep.report import PrepareReport
from data_prep.textio import safe_text

log = logging.getLogger(__name__)


def _parse_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        options[key.strip().replace("-", "_")] = value
    return options


def prepare_command(
    adapter: str = typer.Argument(..., help=f"Dataset adapter: {', '.join(sorted(ADAPTERS))}."),
    source: Path = typer.Argument(..., help="The dataset as published: its folder or annotation file."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Manifest to write (JSONL); the report goes beside it."
    ),
    images: Path | None = typer.Option(
        None, "--images", help="Image folder, where the dataset keeps images apart."
    ),
    lang: str | None = typer.Option(
        None, "--lang", help="Language code (vi, en, ...); default: the adapter's."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail (exit 1) with the report if any problem is found."
    ),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Carve this fraction of train images into val."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the by-image validation split."),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="LM tokenizer (hub name in the local cache, or folder) for length statistics.",
    ),
    check_images: bool = typer.Option(
        True, "--check-images/--no-check-images", help="Open every image to find missing/broken files."
    ),
    max_caption_chars: int = typer.Option(
        MAX_CAPTION_CHARS,
        "--max-caption-chars",
        help="Skip (and report as long_caption) captions longer than this many characters; 0: no limit.",
    ),
    max_problems: int = typer.Option(
        20, "--max-problems", help="Problems listed per kind; the rest are counted."
    ),
    option: list[str] = typer.Option(
        [], "--option", help="Adapter option KEY=VALUE (e.g. caption_column=text)."
    ),
) -> None:
    """Read a dataset as published, write a clean normalized manifest, and report what was found."""
    try:
        report = prepare(
            adapter,
            source,
            out,
            language=lang,
            strict=strict,
            val_fraction=val_fraction,
            seed=seed,
            check_images=check_images,
            max_caption_chars=max_caption_chars or None,
            tokenizer=tokenizer,
            images=images,
            **_parse_options(option),
        )
    except DataError as err:
        _print(err.report, out, max_problems)
        typer.echo(f"--strict: {len(err.report.problems)} problem(s) found; no manifest written", err=True)
        raise typer.Exit(1) from None
    except (DataPrepError, OSError) as err:  # OSError: a file the system would not let us read
        typer.echo(f"error: {safe_text(str(err))}", err=True)
        raise typer.Exit(2) from None
    _print(report, out, max_problems)


def _print(report: PrepareReport, out: Path, max_problems: int) -> None:
    typer.echo(report.format(max_problems=max_problems))
    typer.echo(f"report: {safe_text(str(report_path(out)))}")
