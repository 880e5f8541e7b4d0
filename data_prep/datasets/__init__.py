"""Dataset adapters: read a dataset as published, write the canonical manifest.

Each adapter is a function ``fn(source: Path, *, images: Path | None = None, **options) -> AdapterOutput``
registered with `@register_adapter(name, language=...)`. `prepare` runs one,
validates and normalizes its output in one shared place, writes the manifest
and returns a `PrepareReport`.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from data_prep.datasets.base import (
    MAX_CAPTION_CHARS,
    Adapter,
    AdapterFn,
    AdapterOutput,
    RawCaption,
    RawImage,
    build_records,
)
from data_prep.errors import AdapterNotFoundError, SettingError, SourceNotFoundError
from data_prep.languages import get_language
from data_prep.manifest import write_manifest
from data_prep.report import DataError, PrepareReport, Problem

log = logging.getLogger(__name__)

ADAPTERS: dict[str, Adapter] = {}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterOutput",
    "DataError",
    "PrepareReport",
    "Problem",
    "RawCaption",
    "RawImage",
    "get_adapter",
    "prepare",
    "register_adapter",
]


def register_adapter(
    name: str, *, language: str = "generic", patterns: bool = False
) -> Callable[[AdapterFn], AdapterFn]:
    """Decorator: register `fn` as adapter `name`; `language` is used when the user names none;
    `patterns`: the source may be a pattern (`data/{00000..00127}.tar`) that `fn` expands and checks."""

    def deco(fn: AdapterFn) -> AdapterFn:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered")
        doc = inspect.getdoc(fn) or ""
        ADAPTERS[name] = Adapter(
            name=name, fn=fn, language=language, doc=doc.splitlines()[0] if doc else "", patterns=patterns
        )
        return fn

    return deco


def get_adapter(name: str) -> Adapter:
    """The adapter called `name`; an unknown name lists the known ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise AdapterNotFoundError(
            f"unknown dataset adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}"
        ) from None


def _check_options(adapter: Adapter, options: dict) -> None:
    params = inspect.signature(adapter.fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SettingError(
            f"adapter {adapter.name!r} got unknown option(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}"
        )


def _check_source(source: Path) -> None:
    try:
        os.stat(source)
    except OSError as err:  # not found, a symbolic link loop, no permission
        raise SourceNotFoundError(f"dataset source not found: {source} ({err.strerror})") from None


def report_path(out: Path) -> Path:
    """Where a manifest's report goes: beside it, `<name>.report.json`."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".report.json")


def prepare(
    adapter: str,
    source: Path,
    out: Path,
    *,
    language: str | None = None,
    strict: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    check_images: bool = True,
    max_caption_chars: int | None = MAX_CAPTION_CHARS,
    tokenizer: str | None = None,
    stats: bool = True,
    **options,
) -> PrepareReport:
    """Read `source` with `adapter`, write the manifest to `out` and its report beside it
    (`report_path(out)`), return the report.

    Bad items are skipped and listed in the report; with `strict=True` any problem raises
    `DataError` (carrying the report, which is written too) and no manifest is written. Captions
    longer than `max_caption_chars` characters are skipped as `long_caption` (None: no limit). The
    report's statistics (`stats`: lengths and vocabulary; Vietnamese words are segmented for them,
    which takes a while on large sets) add LM-token lengths when `tokenizer` names one (a hub name in
    the local cache, or a folder).
    """
    from data_prep.stats import caption_stats, load_tokenizer

    start = time.perf_counter()
    # The tokenizer first: a wrong name should fail before minutes of image checks.
    tok = load_tokenizer(tokenizer) if tokenizer else None
    ad = get_adapter(adapter)
    options = {k: v for k, v in options.items() if v is not None}
    _check_options(ad, options)
    source, out = Path(source), Path(out)
    if not ad.patterns:
        _check_source(source)
    lang = get_language(language or ad.language)

    raw = ad.fn(source, **options)
    records, problems, counts = build_records(
        raw,
        lang,
        out,
        check=check_images,
        val_fraction=val_fraction,
        seed=seed,
        max_caption_chars=max_caption_chars,
    )
    report = PrepareReport(
        adapter=adapter,
        source=str(source),
        out=str(out),
        language=lang.code,
        counts=counts,
        splits=_split_counts(records),
        problems=problems,
    )
    if strict and problems:
        report.elapsed_s = time.perf_counter() - start
        report.write(report_path(out))
        raise DataError(report)
    meta = {"dataset": adapter, **_provenance(source, lang, val_fraction, seed, options), **raw.meta}
    write_manifest(out, records, meta)
    if stats:
        report.stats = caption_stats([c for r in records for c in r.captions], lang, tok)
    if tokenizer and report.stats:
        report.stats["tokenizer"] = tokenizer
    report.elapsed_s = time.perf_counter() - start
    report.write(report_path(out))
    log.info(
        "wrote %s: %d images, %d captions, %d problems",
        out,
        counts["images"],
        counts["captions"],
        len(problems),
    )
    return report


def _provenance(source: Path, lang, val_fraction: float, seed: int, options: dict) -> dict:
    """What the manifest header records about how it was made."""
    return {
        "language": lang.code,
        "source": str(source.absolute()),
        "normalizer": lang.normalizer_name,
        "val_fraction": val_fraction,
        "seed": seed,
        "options": {k: str(Path(v).absolute()) if isinstance(v, Path) else v for k, v in options.items()},
    }


def _split_counts(records) -> dict[str, dict[str, int]]:
    splits: dict[str, dict[str, int]] = {}
    for r in records:
        s = splits.setdefault(r.split, {"images": 0, "captions": 0})
        s["images"] += 1
        s["captions"] += len(r.captions)
    return splits


# Importing the adapter modules registers them.
from data_prep.datasets import coco, flickr8k, karpathy, ktvic, table, text, webdataset  # noqa: E402,F401
