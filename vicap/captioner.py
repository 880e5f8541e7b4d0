"""Captioning images with a trained run: the `Captioner` object, and image files, folders and manifests.

`Captioner` loads a run (or an export) once and captions files, PIL images or preprocessed tensors;
`vicap caption`, `vicap serve` and `vicap evaluate` all go through it.

Images are decoded and preprocessed in a DataLoader (worker processes overlap decoding with
generation), encoded a batch at a time and captioned a batch at a time. A file that cannot be used --
missing, not an image, truncated, over the pixel limit -- becomes an `{"image", "error"}` row and the
rest go on; with `strict=True` the first one raises `ImageError` instead.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.images import TarMember, image_key, walk_images
from data_prep.manifest import read_manifest
from data_prep.textio import atomic_writer, json_text, safe_text
from vicap.encoders import Encoder, load_encoder
from vicap.errors import UsageError
from vicap.features import _collate, _Images
from vicap.generate import Caption, generate
from vicap.images import ImageError
from vicap.model import CaptionModel
from vicap.recipe import GenerateConfig, Recipe
from vicap.runs import Run, load_run

log = logging.getLogger(__name__)


def collect_images(
    paths: Iterable[str | Path],
) -> tuple[list[Path | TarMember], list[tuple[Path, str]]]:
    """Image files from files, folders and manifests (`.jsonl` written by `vicap prepare`: every
    record's image, a file or a member of a tar shard), without duplicates; and what a folder walk could not read, as (path, message).

    Folders are walked by `data_prep.images.walk_images` (recursive, by suffix, sorted, hidden
    entries skipped, links followed, unreadable folders and link loops returned by name). A named
    file that does not exist or cannot be opened is kept: captioning reports it like any bad file.
    """
    found: list[Path | TarMember] = []
    unwalkable: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            scan = walk_images(path)
            found += scan.images
            unwalkable += [(p, f"{p}: {reason}") for _, p, reason in scan.skipped]
        elif path.suffix.lower() == ".jsonl" and path.is_file():
            manifest = read_manifest(path)
            found += [manifest.resolve_image(r) for r in manifest.records]
        else:
            found.append(path)
    unique: dict[str, Path | TarMember] = {}
    for p in found:
        unique.setdefault(image_key(p), p)
    return list(unique.values()), unwalkable


def _row(name: str, captions: list[Caption], n_best: int) -> dict:
    row = {"image": name, "caption": captions[0].text, "score": round(captions[0].score, 4)}
    if n_best > 1:
        row["n_best"] = [{"caption": c.text, "score": round(c.score, 4)} for c in captions]
    return row


ImageInput = str | Path | TarMember | Image.Image | torch.Tensor


class _Inputs(_Images):
    """What `Captioner` captions: image files (decoded by `_Images`, in worker processes when asked),
    PIL images (converted to RGB) and tensors already preprocessed."""

    def __getitem__(self, i: int):
        item = self.paths[i]
        if isinstance(item, torch.Tensor):
            return i, item, ""
        if isinstance(item, Image.Image):
            return i, self.preprocess(item if item.mode == "RGB" else item.convert("RGB")), ""
        return super().__getitem__(i)


def _input_name(item, i: int) -> str:
    """How a row names its input: a file by its path, an in-memory image by its position."""
    if isinstance(item, (str, Path, TarMember)):
        return str(item)
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"<image {i}>"
    return f"<tensor {i}>"


class Captioner:
    """A trained captioner, loaded once: the run's caption model and its image encoder on one device.

    `Captioner.from_run("runs/x")` or `Captioner.from_pretrained("exported")` (a folder from `vicap
    export`), then `cap(["a.jpg", pil_image, pixels], strategy="beam", beam_size=3)`: one row per input,
    in order (see `__call__`). `vicap caption`, `vicap serve` and `vicap evaluate` caption through it.
    The image encoder loads, and the model moves to the device, on first use (evaluation reads stored
    features and never needs the encoder).
    """

    def __init__(self, run: Run, *, device: str | None = None, encoder: Encoder | None = None) -> None:
        from vicap.device import resolve_device

        self.run = run
        self.device = resolve_device(
            device or run.recipe.train.device, key="--device" if device else "train.device"
        )
        self._encoder = encoder.to(self.device) if encoder is not None else None
        self._on_device = False

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        checkpoint: str = "best",
        device: str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
    ) -> Captioner:
        """A run directory (or an export) at `checkpoint`: 'best' (the run's selected one), 'last' or a
        step number; `overrides` are recipe overrides ("generate.beam_size=3"); `device` defaults to
        the recipe's train.device."""
        return cls(load_run(run_dir, overrides, checkpoint=checkpoint), device=device)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | None = None, overrides: list[str] | tuple[str, ...] = ()
    ) -> Captioner:
        """A folder written by `vicap export`, read offline (see `vicap.export`)."""
        from vicap.export import load_export

        return cls(load_export(folder, overrides), device=device)

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    @property
    def model(self) -> CaptionModel:
        """The caption model, moved to the device when first used (evaluation extracts features first,
        without it taking device memory)."""
        if not self._on_device:
            self.run.model = self.run.model.to(self.device).eval()
            self._on_device = True
        return self.run.model

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.recipe.encoder).to(self.device)
        return self._encoder

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image as the (3, H, W) tensor the encoder takes: what `__call__` accepts as a tensor."""
        return self.encoder.preprocess(image if image.mode == "RGB" else image.convert("RGB"))

    def settings(self, strategy: str | None = None, **changes) -> GenerateConfig:
        """The recipe's [generate] settings, decoding with `strategy` (default: the recipe's) and
        `changes` applied as `GenerateConfig.switched` applies them: an unknown key, a wrong type or a
        bad value is a RecipeError naming `generate.KEY`."""
        base = self.recipe.generate
        if strategy is None and not changes:
            return base
        return base.switched(strategy or base.strategy, **changes)

    def encode(self, pixels: torch.Tensor, cfg: GenerateConfig | None = None) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> image features, under cfg.precision's autocast."""
        from vicap.device import autocast

        cfg = cfg or self.recipe.generate
        with autocast(self.device, cfg.precision):
            return self.encoder.encode(pixels.to(self.device))

    def caption_features(
        self, features: torch.Tensor, cfg: GenerateConfig | None = None, *, seed_offset: int = 0
    ) -> list[list[Caption]]:
        """Image features -> per image, cfg.n_best captions, best first (`vicap.generate.generate`)."""
        from vicap.device import autocast

        cfg = cfg or self.recipe.generate
        with autocast(self.device, cfg.precision):
            return generate(
                self.model,
                features.to(self.device),
                cfg,
                language=self.recipe.data.language,
                segment=self.recipe.data.segment,
                seed_offset=seed_offset,
            )

    def __call__(
        self,
        images: ImageInput | Iterable[ImageInput],
        strategy: str | None = None,
        *,
        strict: bool = False,
        num_workers: int = 0,
        progress: bool | None = False,
        **changes,
    ) -> list[dict]:
        """Caption images: file paths (str / Path; decoded with EXIF orientation), PIL images (converted
        to RGB), or tensors already preprocessed (3, H, W), as `preprocess` gives them. One row per
        input, in order: {"image", "caption", "score"} (+ "n_best" when n_best > 1), or {"image",
        "error"} for a file that could not be used (strict=True raises ImageError instead). Files are
        named by their path, other inputs by position ("<image 2>"). `strategy` and `changes`
        (beam_size=3, n_best=2, ...) adjust the recipe's [generate] settings (see `settings`)."""
        single = isinstance(images, (str, Path, TarMember, Image.Image)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3
        )
        items = [images] if single else list(images)  # a (B, 3, H, W) tensor: B images
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor) and item.dim() != 3:
                raise UsageError(
                    f"<tensor {i}>: a tensor of shape {tuple(item.shape)}; give preprocessed images as "
                    "(3, H, W) tensors or one (B, 3, H, W) batch"
                )
        cfg = self.settings(strategy, **changes)
        return list(self._caption(items, cfg, strict=strict, progress=progress, num_workers=num_workers))

    def caption_paths(
        self,
        paths: Iterable[str | Path],
        cfg: GenerateConfig | None = None,
        *,
        strict: bool = False,
        progress: bool | None = False,
        num_workers: int = 0,
    ) -> Iterator[dict]:
        """Every image found in `paths` (files, folders, manifests: see `collect_images`), as rows; first
        those for what a folder walk could not read (an unreadable sub-folder, a link loop)."""
        images, unwalkable = collect_images(paths)
        for path, err in unwalkable:
            if strict:
                raise ImageError(err)
            yield {"image": str(path), "error": err}
        yield from self._caption(
            images, cfg or self.recipe.generate, strict=strict, progress=progress, num_workers=num_workers
        )

    def _caption(
        self, items: list, cfg: GenerateConfig, *, strict: bool, progress: bool | None, num_workers: int
    ) -> Iterator[dict]:
        """Rows for `items`, in order: decoded and preprocessed in a DataLoader (`num_workers` processes
        ahead of the model), encoded and captioned a batch of cfg.batch_size at a time."""
        loader = DataLoader(
            _Inputs(items, self.encoder.preprocess),
            batch_size=cfg.batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        self.model  # noqa: B018  (the encoder and the model on the device before any image is decoded)
        # progress=None is tqdm's own rule: a bar only when stderr is a terminal
        bar = tqdm(
            total=len(items), desc="caption", unit="img", disable=None if progress is None else not progress
        )
        start = 0
        with bar, torch.no_grad():
            for ids, pixels, bad in loader:
                rows: dict[int, dict] = {}
                for i, err in bad:
                    if strict:
                        raise ImageError(err)
                    rows[i] = {"image": _input_name(items[i], i), "error": err}
                if pixels is not None:
                    # sampling: each batch draws its own stream
                    caps = self.caption_features(self.encode(pixels, cfg), cfg, seed_offset=start)
                    for i, c in zip(ids, caps, strict=True):
                        rows[i] = _row(_input_name(items[i], i), c, cfg.n_best)
                for i in sorted(rows):
                    yield rows[i]
                bar.update(len(rows))
                start += len(rows)


def caption_images(
    run_dir: str | Path,
    paths: Iterable[str | Path],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    strict: bool = False,
    progress: bool | None = False,
    num_workers: int = 0,
    device: str | None = None,
    checkpoint: str = "best",
) -> Iterator[dict]:
    """Caption every image found in `paths` (see `collect_images`) with a run, yielding rows in input
    order: `Captioner.from_run(...).caption_paths(...)`.

    A row is {"image", "caption", "score"} (plus "n_best": [{"caption", "score"}, ...] when
    generate.n_best > 1), or {"image", "error"} for a file that could not be used (first, those
    for what a folder walk could not read: an unreadable sub-folder, a link loop). Generation settings
    come from the run's recipe with `overrides` (e.g. "generate.beam_size=3") applied.
    `num_workers` image-decoding processes run ahead of the model (0: decode in this process);
    `progress=None` shows a bar only on a terminal. Encoding and decoding run on `device` (default:
    the recipe's train.device) with generate.precision. `checkpoint`: the run's selected one ('best'),
    'last' or a step number.
    """
    captioner = Captioner.from_run(run_dir, checkpoint=checkpoint, device=device, overrides=overrides)
    yield from captioner.caption_paths(paths, strict=strict, progress=progress, num_workers=num_workers)


# ---------------------------------------------------------------------------------------- output files

# Output files are UTF-8 whatever the file names: a name that is not UTF-8 is written with `\udcXX`
# escapes (data_prep/textio.py), in JSON as JSON's own escape, which reads back as the same name.
OUTPUT_SUFFIXES = (".jsonl", ".csv")


class _CsvRows:
    """image, caption, score; with n-best lists also caption_2, score_2, ... caption_K, score_K."""

    def __init__(self, f: TextIO) -> None:
        self.f, self.writer = f, None

    def write(self, row: dict) -> None:
        extra = row.get("n_best", [])[1:]
        if self.writer is None:
            cols = ["image", "caption", "score"]
            for k in range(2, len(extra) + 2):
                cols += [f"caption_{k}", f"score_{k}"]
            self.writer = csv.writer(self.f)
            self.writer.writerow(cols)
        values = [row["image"], row["caption"], row["score"]]
        for c in extra:
            values += [c["caption"], c["score"]]
        self.writer.writerow([safe_text(v) if isinstance(v, str) else v for v in values])


class _JsonRows:
    def __init__(self, f: TextIO) -> None:
        self.f = f

    def write(self, row: dict) -> None:
        self.f.write(json_text(row) + "\n")


@dataclass
class CaptionSummary:
    captioned: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per file, naming it


def caption_to_file(
    run_dir: str | Path,
    paths: Iterable[str | Path],
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    strict: bool = False,
    progress: bool | None = None,
    num_workers: int = 0,
    on_skip: Callable[[str], None] | None = None,
    device: str | None = None,
    checkpoint: str = "best",
) -> CaptionSummary:
    """`caption_images`, written as it goes to `out` (.jsonl or .csv; None: JSON lines on stdout).

    Files that could not be used are not written; each is passed to `on_skip` and counted.
    """
    out = Path(out) if out is not None else None
    if out is not None and out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"{out}: the output file must end in {' or '.join(OUTPUT_SUFFIXES)}")
    summary = CaptionSummary()

    def write(f: TextIO, rows: _CsvRows | _JsonRows) -> None:
        for row in caption_images(
            run_dir,
            paths,
            overrides,
            strict=strict,
            progress=progress,
            num_workers=num_workers,
            device=device,
            checkpoint=checkpoint,
        ):
            if "error" in row:
                summary.skipped.append(row["error"])
                if on_skip is not None:
                    on_skip(row["error"])
                continue
            rows.write(row)
            summary.captioned += 1
            f.flush()

    if out is None:
        write(sys.stdout, _JsonRows(sys.stdout))
        return summary
    _check_writable(out)
    # The rows go to a temporary file that replaces `out` only once every image is done: a run that
    # stops early never empties an existing file, and what it captioned is kept beside it.
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    try:
        with atomic_writer(out, partial=partial) as f:
            write(f, _CsvRows(f) if out.suffix.lower() == ".csv" else _JsonRows(f))
    except BaseException:
        if partial.exists() and not summary.captioned:
            partial.unlink()
        if partial.exists():
            log.warning(
                "%s: left as it was; the %d caption(s) written before the stop are in %s",
                out,
                summary.captioned,
                partial,
            )
        raise
    partial.unlink(missing_ok=True)  # an earlier stopped run's, now superseded
    return summary


def _check_writable(out: Path) -> None:
    """A UsageError naming `out` when it cannot be written; a missing folder is created (as prepare does)."""
    problem = "a folder" if out.is_dir() else None
    if problem is None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = e.strerror
    if problem is None and not os.access(out.parent, os.W_OK):
        problem = f"no permission to write in {out.parent}"
    if problem is None and out.exists() and not os.access(out, os.W_OK):
        problem = "the file is read-only"
    if problem is not None:
        raise UsageError(f"{out}: cannot write the output file ({problem})")
