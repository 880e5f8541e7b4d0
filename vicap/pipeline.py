"""Steps shared by train, evaluate, caption and the demo: the run's manifest and its features."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from data_prep.manifest import Manifest, read_manifest
from vicap.encoders import load_encoder
from vicap.features import FeatureStore, extract_features
from vicap.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def prepare_manifest(recipe: Recipe, run_dir: Path) -> Manifest:
    """The run's manifest: `data.source` itself for the 'manifest' adapter, else the adapter's output,
    written once to <run>/manifest.jsonl (with its report beside it) and reused afterwards."""
    from data_prep.datasets import prepare, report_path

    d = recipe.data
    if d.adapter == "manifest":
        manifest = read_manifest(d.source)
        # A manifest's language and splits were fixed when `vicap prepare` wrote it.
        if manifest.language != d.language:
            raise RecipeError(
                f"data.language = {d.language!r}, but the manifest {d.source} is {manifest.language!r}"
            )
        return manifest
    out = Path(run_dir) / "manifest.jsonl"
    if not out.exists():
        options = {"images": d.images} if d.images else {}
        # write_manifest renames a complete file into place: a killed prepare is redone, never half-reused
        report = prepare(
            d.adapter,
            Path(d.source),
            out,
            language=d.language,
            val_fraction=d.val_fraction,
            seed=recipe.train.seed,
            stats=False,  # lengths and vocabulary: `vicap prepare` reports them; training needs none
            **options,
        )
        log.info(
            "prepared %s from %s with adapter %r (%d problems; report: %s)",
            out,
            d.source,
            d.adapter,
            len(report.problems),
            report_path(out),
        )
    return read_manifest(out)


def prepare_text_manifest(recipe: Recipe, run_dir: Path, kind: str = "text") -> Manifest | None:
    """The run's text corpus (`kind` "text": `text.source`) or sentence pairs ("pairs": `pairs.source`)
    read by the `text` adapter in data.language, written once to <run>/<kind>_manifest.jsonl (its report
    beside it) and reused afterwards while the recipe names the same file, options and language (written
    again otherwise); None when the recipe has none."""
    from data_prep.datasets import prepare, report_path

    if kind == "text":
        source, options = recipe.text.source, {"text_column": recipe.text.column}
    else:
        p = recipe.pairs
        source = p.source
        options = {
            "text_column": p.target_column,
            "source_column": p.source_column,
            "source_language": p.source_language,
        }
    if not source:
        return None
    out = Path(run_dir) / f"{kind}_manifest.jsonl"
    if out.exists():  # written by an earlier start of this run: reused only if the recipe still says so
        meta = read_manifest(out).meta
        now = (str(Path(source)), options, recipe.data.language)
        if (meta.get("source"), meta.get("options"), meta.get("language")) != now:
            log.info("%s: written from other %s settings; prepared again", out, kind)
            out.unlink()
    if not out.exists():
        report = prepare(
            "text",
            Path(source),
            out,
            language=recipe.data.language,
            seed=recipe.train.seed,
            stats=False,
            **options,
        )
        log.info(
            "prepared %s from %s: %d %s (%d problems; report: %s)",
            out,
            source,
            report.counts["captions"],
            "sentences" if kind == "text" else "sentence pairs",
            len(report.problems),
            report_path(out),
        )
    return read_manifest(out)


def run_text_features(
    recipe: Recipe,
    text_manifest: Manifest,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    accelerator=None,
) -> tuple[FeatureStore, torch.Tensor | None]:
    """Every sentence of the text corpus (or every source sentence of the sentence pairs) embedded by
    the encoder's text tower into the run's feature store (beside its images), and, for the text
    corpus, the modality offset: the mean embedding of the images in `text.offset_images` minus the
    mean sentence embedding (None when no folder is named)."""
    from data_prep.images import walk_images
    from vicap.data import is_pairs, sentence_inputs

    offset_images: list = []
    if recipe.text.offset_images and not is_pairs(text_manifest):
        folder = Path(recipe.text.offset_images)
        if not folder.is_dir():
            raise RecipeError(f"text.offset_images = {recipe.text.offset_images!r}: not a folder")
        scan = walk_images(folder)
        for kind, path, reason in scan.skipped:
            log.warning("text.offset_images: %s %s (%s), left out", kind, path, reason)
        offset_images = scan.images
        if not offset_images:
            raise RecipeError(f"text.offset_images = {recipe.text.offset_images!r}: no images in it")
    texts, normalizer = sentence_inputs(text_manifest)
    store = extract_features(
        load_encoder(recipe.encoder, text=True),
        offset_images,
        Path(recipe.data.features_dir),
        texts=texts,
        text_normalizer=normalizer,
        batch_size=recipe.encoder.batch_size,
        **sharing(accelerator, device, progress),
    )
    if not offset_images:
        return store, None
    if accelerator is None or accelerator.is_main_process:
        report_failures(store, len(offset_images))
    image_rows = [store.row(p) for p in offset_images if store.has(p)]
    if not image_rows:
        raise RecipeError(
            f"text.offset_images = {recipe.text.offset_images!r}: none of its images could be read"
        )
    offset = _mean_row(store, image_rows) - _mean_row(store, [store.text_row(t, normalizer) for t in texts])
    log.info(
        "modality offset from %d images of %s and %d sentences: norm %.4f",
        len(image_rows),
        folder,
        len(texts),
        float(offset.norm()),
    )
    return store, offset


def _mean_row(store: FeatureStore, rows: list[int], chunk: int = 65536) -> torch.Tensor:
    """The mean of store rows, read a chunk at a time (a corpus may not fit in memory at once)."""
    total = torch.zeros(store.dim, dtype=torch.float64)
    for i in range(0, len(rows), chunk):
        total += torch.from_numpy(store.features[rows[i : i + chunk]]).double().sum(0)
    return (total / len(rows)).float()


def sharing(accelerator, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """`extract_features` arguments that split the work over Accelerate's processes (none: one process)."""
    if accelerator is None:
        return {"device": device, "progress": progress}
    return {
        "device": accelerator.device,
        "progress": progress and accelerator.is_main_process,
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "barrier": accelerator.wait_for_everyone,
    }


def run_features(
    recipe: Recipe,
    manifest: Manifest,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    accelerator=None,
    records: list | None = None,
) -> FeatureStore:
    """Features for every image in the manifest (all splits at once, so evaluation reuses them), or
    for `records` of it only.

    Under Accelerate with N processes (`accelerator`), each process encodes its share on its own
    device into shards of its own; every process returns the complete store."""
    paths = [manifest.resolve_image(r) for r in (manifest.records if records is None else records)]
    store_root = Path(recipe.data.features_dir)
    encoder = load_encoder(recipe.encoder)
    # Encodes only images that are new or changed since the store was written (size/mtime checked).
    store = extract_features(
        encoder,
        paths,
        store_root,
        batch_size=recipe.encoder.batch_size,
        **sharing(accelerator, device, progress),
    )
    if accelerator is None or accelerator.is_main_process:
        report_failures(store, len(paths))
    return store


def report_failures(store: FeatureStore, total: int, *, most: int = 20) -> None:
    """Name the images that could not be encoded (the first `most`; the count of the rest)."""
    if not store.failures:
        return
    reasons = list(store.failures.values())
    more = (
        f"\n  ... and {len(reasons) - most} more (listed in {store.root / 'shards'})"
        if len(reasons) > most
        else ""
    )
    log.warning(
        "%d of %d images could not be read and are skipped:\n  %s%s",
        len(reasons),
        total,
        "\n  ".join(reasons[:most]),
        more,
    )


def build_features(recipe: Recipe, *, device: str | None = None, progress: bool = True) -> FeatureStore:
    """`vicap features`: the recipe's manifest, then its feature store. Under `accelerate launch` with
    N processes every process encodes its share on its own device; otherwise the work runs on `device`
    (default: the recipe's train.device)."""
    from vicap.device import resolve_device

    run_dir = Path(recipe.train.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vicap.train import make_accelerator

        accelerator = make_accelerator(recipe.train)
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
            manifest = prepare_manifest(recipe, run_dir)
        return run_features(recipe, manifest, progress=progress, accelerator=accelerator)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or recipe.train.device, key="--device" if device else "train.device")
    return run_features(recipe, prepare_manifest(recipe, run_dir), device=dev, progress=progress)
