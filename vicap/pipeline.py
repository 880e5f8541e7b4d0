"""Steps shared by train, evaluate, caption and the demo: the run's manifest and its features."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from data_prep.manifest import Manifest, read_manifest
from vicap.encoders import load_encoder
from vicap.features import FeatureStore, extract_features
from vicap.recipe import Recipe

log = logging.getLogger(__name__)


def prepare_manifest(recipe: Recipe, run_dir: Path) -> Manifest:
    """The run's manifest: `data.source` itself for the 'manifest' adapter, else the adapter's output,
    written once to <run>/manifest.jsonl (with its report beside it) and reused afterwards."""
    from data_prep.datasets import prepare

    d = recipe.data
    if d.adapter == "manifest":
        return read_manifest(d.source)
    out = Path(run_dir) / "manifest.jsonl"
    if not out.exists():
        options = {"images": d.images} if d.images else {}
        report = prepare(
            d.adapter,
            Path(d.source),
            out,
            language=d.language,
            val_fraction=d.val_fraction,
            seed=recipe.train.seed,
            **options,
        )
        (Path(run_dir) / "prepare_report.json").write_text(
            json.dumps(report.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8"
        )
        log.info("prepared %s from %s with adapter %r", out, d.source, d.adapter)
    return read_manifest(out)


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
) -> FeatureStore:
    """Features for every image in the manifest (all splits at once, so evaluation reuses them).

    Under Accelerate with N processes (`accelerator`), each process encodes its share on its own
    device into shards of its own; every process returns the complete store."""
    paths = [manifest.resolve_image(r) for r in manifest.records]
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
    if store.failures and (accelerator is None or accelerator.is_main_process):
        log.warning(
            "%d of %d images could not be read and are skipped: %s",
            len(store.failures),
            len(paths),
            "; ".join(list(store.failures.values())[:3]),
        )
    return store
