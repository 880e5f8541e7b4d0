"""The feature store: one encoder vector per unique image, on disk, memory-mapped, never pickled.

Layout of `<features_dir>/<encoder key>/`:
  meta.json      the encoder's identity (model, weights hash, preprocessing) and the array's shape
  features.npy   float32 (N, D), read with mmap so millions of images need no RAM; with
                 `encoder.patch_tokens = true`, (N, 1 + T, D): each image's pooled vector, then its T
                 patch tokens (ViT-B/32 at 224 px: 1 + 49 rows of 512, 100 KB an image)
  index.json     row -> image path, size and mtime; a changed file is re-encoded, never served stale

The key is a hash of the encoder identity, so a different model, weights file or preprocessing gets
its own store and a rerun with the same encoder reuses what is there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vicap.encoders import Encoder
from vicap.images import ImageError, load_image

log = logging.getLogger(__name__)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass
class FeatureStore:
    root: Path
    features: np.ndarray  # (N, D) or (N, 1 + T, D) float32, memory-mapped
    rows: dict[str, int]  # absolute image path -> row
    failures: dict[str, str] = field(default_factory=dict)  # images that could not be encoded this time

    @property
    def dim(self) -> int:
        """D, the width of every feature row (what a mapper takes in)."""
        return int(self.features.shape[-1])

    @property
    def has_tokens(self) -> bool:
        """Whether rows hold patch tokens after the pooled vector."""
        return self.features.ndim == 3

    def row(self, path: str | Path) -> int:
        return self.rows[str(Path(path).resolve())]

    def has(self, path: str | Path) -> bool:
        return str(Path(path).resolve()) in self.rows

    def get(self, paths: list[str | Path]) -> torch.Tensor:
        idx = [self.row(p) for p in paths]
        return torch.from_numpy(np.ascontiguousarray(self.features[idx]))


class _Images(Dataset):
    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.paths[i])), ""
        except ImageError as e:
            return i, None, str(e)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


def _read_store(folder: Path) -> tuple[np.ndarray | None, list[dict]]:
    if not (folder / "features.npy").is_file() or not (folder / "index.json").is_file():
        return None, []
    index = json.loads((folder / "index.json").read_text())
    array = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)
    if array.shape[0] != len(index):
        log.warning(
            "feature store %s is inconsistent (%d rows, %d index entries); rebuilding",
            folder,
            array.shape[0],
            len(index),
        )
        return None, []
    return array, index


def open_store(encoder: Encoder, store_root: str | Path) -> FeatureStore | None:
    folder = Path(store_root) / encoder.key
    array, index = _read_store(folder)
    if array is None:
        return None
    return FeatureStore(folder, array, {e["path"]: r for r, e in enumerate(index)})


def extract_features(
    encoder: Encoder,
    image_paths: list[str | Path],
    store_root: str | Path,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureStore:
    """Encode every image not yet in the store (or changed since), then return the store.

    Images that cannot be read are reported in `store.failures` (path -> reason) and get no row.
    """
    folder = Path(store_root) / encoder.key
    folder.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(Path(p).resolve() for p in image_paths))
    old, index = _read_store(folder)
    have = {e["path"]: (r, e["stat"]) for r, e in enumerate(index)}

    todo: list[Path] = []
    for p in unique:
        hit = have.get(str(p))
        if hit is None or not p.exists() or hit[1] != _stat(p):
            todo.append(p)
    failures: dict[str, str] = {}
    if not todo and old is not None:  # (with no store yet, fall through and write an empty one)
        log.info("feature store %s: all %d images already encoded", folder, len(unique))
        return FeatureStore(folder, old, {e["path"]: r for r, e in enumerate(index)})

    log.info(
        "feature store %s: encoding %d of %d images (%d reused)",
        folder,
        len(todo),
        len(unique),
        len(unique) - len(todo),
    )
    loader = DataLoader(
        _Images(todo, encoder.preprocess), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    new_rows: list[np.ndarray] = []
    new_index: list[dict] = []
    encoder.to(device)
    for ids, pixels, bad in tqdm(loader, desc="features", unit="batch", disable=not progress):
        for i, err in bad:
            failures[str(todo[i])] = err
        if pixels is None:
            continue
        feats = encoder.encode(pixels.to(device)).cpu().numpy().astype(np.float32)
        new_rows.append(feats)
        new_index += [{"path": str(todo[i]), "stat": _stat(todo[i])} for i in ids]

    # Keep old rows that were not re-encoded, append the new ones, write atomically.
    replaced = {e["path"] for e in new_index} | set(failures)
    keep = [r for r, e in enumerate(index) if e["path"] not in replaced]
    parts = ([np.asarray(old[keep])] if old is not None and keep else []) + new_rows
    array = np.concatenate(parts) if parts else np.zeros((0, *encoder.feature_shape), np.float32)
    full_index = [index[r] for r in keep] + new_index
    tmp = folder / "features.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, folder / "features.npy")
    (folder / "index.json").write_text(json.dumps(full_index))
    meta = {
        "identity": encoder.identity,
        "embed_dim": encoder.embed_dim,
        "shape": list(array.shape),
        "rows": len(full_index),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    if failures:
        log.warning(
            "%d image(s) could not be encoded; first: %s", len(failures), next(iter(failures.values()))
        )
    store = open_store(encoder, store_root)
    assert store is not None
    store.failures = failures
    return store
