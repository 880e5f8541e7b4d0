"""The feature store: one encoder vector per unique image (and per unique sentence, for text-only
training), on disk, memory-mapped, never pickled.

Layout of `<features_dir>/<encoder key>/`:
  meta.json                 the encoder's identity (model, weights hash, preprocessing) and row shape
  shards/<name>.npy         float32 rows (n, D), or (n, 1 + T, D) with `encoder.patch_tokens = true`
                            (each image's pooled vector, then its T patch tokens), written as they are
                            encoded and read back memory-mapped
  shards/<name>.json        the shard's index, written last: row -> image key, size and mtime, plus
                            the images that could not be encoded and why. A shard exists once its
                            index does; a shard whose rows file no longer matches its index (size,
                            fingerprint, shape) is ignored and its images are encoded again.

Why shards: extraction never holds more than a batch in RAM, a kill loses at most the shard being
written (`SHARD_IMAGES` images), and every process of a distributed extraction writes shards of its
own, so no two writers ever share a file. The key is a hash of the encoder identity, so a different
model, weights file or preprocessing gets its own store, and a rerun with the same encoder reuses
what is there: only new or changed images (size or mtime) are encoded, an image that could not be
read is retried only once its file changes, and a run that encodes nothing writes nothing. When an
image is encoded again, the newest shard's row wins.

Sentences (text-only training, CapDec-style) are rows of the same store, embedded by the encoder's
text tower into the image space and normalized as image rows are: a sentence's key is `text_key`,
"text:<normalizer>:<sha256 of the normalized text>", so it is keyed by encoder (the store folder)
and text normalization, never goes stale (the key is its content) and is encoded once. Image and
sentence rows can then be mixed in one training set and one loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data_prep.images import ImageRef, TarMember, image_key, stat_path
from data_prep.textio import json_text, write_atomic
from vicap.encoders import Encoder
from vicap.images import ImageError, load_image

log = logging.getLogger(__name__)

SHARD_IMAGES = 4096  # images per shard: what a killed extraction can lose
SHARD_FORMAT = "vicap-features-shard-1"
_FINGERPRINT_BYTES = 1 << 20  # the first and last MiB of a rows file are hashed into its index


TEXT_PREFIX = "text:"


def text_key(text: str, normalizer: str) -> str:
    """A sentence's row key: the normalizer that made `text` (a language's normalizer name, as a
    manifest header records it) and the text's hash. Image keys are absolute paths, never this."""
    return f"{TEXT_PREFIX}{normalizer}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _stat(ref: ImageRef | str) -> list[int] | None:
    """Size and mtime of the image's file (of its shard, for a tar member): a change re-encodes it.
    A sentence (str) has none: its key is its content."""
    if isinstance(ref, str):
        return None
    try:
        st = stat_path(ref).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


_resolve = image_key  # a row's key: the image's absolute path, or its shard's and its member name


def _fingerprint(path: Path) -> str:
    """sha256 of the size and the first and last MiB: cheap enough to check at every open."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json_text(data), durable=True)


# --------------------------------------------------------------------------- reading


class StoreRows:
    """The live rows of a store as one read-only array: `rows[i]`, `rows[list_of_i]`, `.shape`.

    Row i lives in one shard's memory-mapped file; indexing gathers from those files, so nothing is
    loaded until it is asked for."""

    def __init__(self, arrays: list[np.ndarray], shard: np.ndarray, local: np.ndarray, row_shape) -> None:
        self._arrays, self._shard, self._local = arrays, shard, local
        self.shape = (len(shard), *row_shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._arrays[self._shard[idx]][self._local[idx]]
        idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float32)
        shards = self._shard[idx]
        for s in np.unique(shards):
            where = shards == s
            out[where] = self._arrays[s][self._local[idx[where]]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)


@dataclass
class FeatureStore:
    root: Path
    features: StoreRows  # (N, D) or (N, 1 + T, D) float32, memory-mapped shard by shard
    rows: dict[str, int]  # image key (`data_prep.images.image_key`) -> row
    failures: dict[str, str] = field(default_factory=dict)  # requested images that could not be encoded

    @property
    def dim(self) -> int:
        """D, the width of every feature row (what a mapper takes in)."""
        return int(self.features.shape[-1])

    @property
    def has_tokens(self) -> bool:
        """Whether rows hold patch tokens after the pooled vector."""
        return self.features.ndim == 3

    def row(self, path: str | ImageRef) -> int:
        return self.rows[_resolve(path)]

    def has(self, path: str | ImageRef) -> bool:
        return _resolve(path) in self.rows

    def get(self, paths: list[str | ImageRef]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.features[[self.row(p) for p in paths]]))

    def text_row(self, text: str, normalizer: str) -> int:
        """The row of a sentence embedded by `extract_features(..., texts=...)`."""
        return self.rows[text_key(text, normalizer)]


@dataclass
class _State:
    """What the committed shards say: per image, its newest row or its newest failure."""

    arrays: list[np.ndarray] = field(default_factory=list)
    rows: dict[str, tuple[int, int, list | None]] = field(default_factory=dict)  # path -> shard, row, stat
    failed: dict[str, tuple[str, list | None]] = field(default_factory=dict)  # path -> error, stat
    last_seq: int = -1
    damaged: list[Path] = field(default_factory=list)  # index files of shards that were ignored


def _shards_dir(folder: Path) -> Path:
    return folder / "shards"


def _read_state(folder: Path, row_shape: tuple[int, ...]) -> _State:
    state = _State()
    shards = _shards_dir(folder)
    if not shards.is_dir():
        return state
    for index_file in sorted(shards.glob("*.json")):
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            if index.get("format") != SHARD_FORMAT:
                raise ValueError(f"format {index.get('format')!r}")
            array = None
            if index["npy"]:
                npy = shards / index["npy"]
                if not npy.is_file() or _fingerprint(npy) != index["fingerprint"]:
                    raise ValueError(f"{index['npy']} is missing or does not match its index")
                array = np.load(npy, mmap_mode="r", allow_pickle=False)
                if array.dtype != np.float32 or array.shape != (index["capacity"], *row_shape):
                    raise ValueError(f"{index['npy']} holds {array.dtype} {array.shape}")
            seq = int(index_file.name.split("-", 1)[0])
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            log.warning(
                "feature store %s: ignoring shard %s (%s); its images will be encoded again",
                folder,
                index_file.name,
                e,
            )
            state.damaged.append(index_file)
            continue
        state.last_seq = max(state.last_seq, seq)
        s = len(state.arrays)
        state.arrays.append(array)
        # Shards are read oldest first, so a newer row or failure of the same image replaces the older.
        for e in index["entries"]:
            state.rows[e["path"]] = (s, e["row"], e["stat"])
            state.failed.pop(e["path"], None)
        for e in index["failures"]:
            state.failed[e["path"]] = (e["error"], e["stat"])
            state.rows.pop(e["path"], None)
    return state


def _open(folder: Path, state: _State, row_shape: tuple[int, ...]) -> FeatureStore:
    paths = sorted(state.rows, key=lambda p: state.rows[p][:2])
    shard = np.fromiter((state.rows[p][0] for p in paths), dtype=np.int64, count=len(paths))
    local = np.fromiter((state.rows[p][1] for p in paths), dtype=np.int64, count=len(paths))
    return FeatureStore(
        folder, StoreRows(state.arrays, shard, local, row_shape), {p: i for i, p in enumerate(paths)}
    )


def _row_shape(encoder: Encoder) -> tuple[int, ...]:
    return tuple(encoder.feature_shape)


def open_store(encoder: Encoder, store_root: str | Path) -> FeatureStore | None:
    """The encoder's store as it is on disk, or None when nothing was ever written there."""
    folder = Path(store_root) / encoder.key
    if not (folder / "meta.json").is_file():
        return None
    _migrate_single_file_store(folder)
    shape = _row_shape(encoder)
    return _open(folder, _read_state(folder, shape), shape)


# --------------------------------------------------------------------------- writing


class _Images(Dataset):
    def __init__(self, paths: list[ImageRef], preprocess) -> None:
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


class _ShardWriter:
    """One shard: rows go straight into a memory-mapped file; `commit` writes the index last."""

    def __init__(self, folder: Path, name: str, capacity: int, row_shape: tuple[int, ...]) -> None:
        self.folder, self.name, self.capacity = folder, name, capacity
        self.tmp = folder / f"{name}.npy.tmp"
        self.array = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=np.float32, shape=(capacity, *row_shape)
        )
        self.entries: list[dict] = []
        self.failures: list[dict] = []

    def add(self, key: str, ref: ImageRef | str, row: np.ndarray) -> None:
        self.array[len(self.entries)] = row
        self.entries.append({"path": key, "stat": _stat(ref), "row": len(self.entries)})

    def fail(self, key: str, ref: ImageRef, error: str) -> None:
        self.failures.append({"path": key, "stat": _stat(ref), "error": error})

    def commit(self) -> None:
        self.array.flush()
        del self.array
        npy = None
        if self.entries:
            npy = f"{self.name}.npy"
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.folder / npy)
        else:
            self.tmp.unlink()
        index = {
            "format": SHARD_FORMAT,
            "npy": npy,
            "capacity": self.capacity,
            "fingerprint": _fingerprint(self.folder / npy) if npy else None,
            "entries": self.entries,
            "failures": self.failures,
        }
        _write_json_atomic(self.folder / f"{self.name}.json", index)


def _set_aside_damaged(folder: Path, index_files: list[Path]) -> None:
    """Move ignored shards (index and rows) out of the store, into `damaged/`: their images are encoded
    again by this extraction, and the next run neither reads nor warns about them again."""
    if not index_files:
        return
    aside = folder / "damaged"
    aside.mkdir(exist_ok=True)
    for index_file in index_files:
        for p in (index_file, index_file.with_suffix(".npy")):
            if p.exists():
                os.replace(p, aside / p.name)
    log.warning(
        "feature store %s: moved %d damaged shard(s) to %s; delete that folder when you no longer need it",
        folder,
        len(index_files),
        aside,
    )


def _shard_name(seq: int, chunk: int) -> str:
    # seq orders extractions (newest wins); host and pid make every writer's files its own.
    return f"{seq:06d}-{chunk:05d}-{os.getpid()}-{socket.gethostname()}"


def _remove_dead_writers_files(folder: Path) -> None:
    """Uncommitted files (a rows file without its index, `.tmp` files) of writers on this host that are
    no longer running: what an extraction killed mid-shard leaves behind."""
    shards = _shards_dir(folder)
    committed = {p.name[: -len(".json")] for p in shards.glob("*.json")}
    host = socket.gethostname()
    for p in shards.iterdir():
        stem = p.name
        for suffix in (".tmp", ".npy", ".json"):
            stem = stem.removesuffix(suffix)
        if p.name.endswith(".json") or (stem in committed and not p.name.endswith(".tmp")):
            continue
        parts = stem.split("-", 3)
        if len(parts) != 4 or parts[3] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # still running (another extraction on this host)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        p.unlink(missing_ok=True)


def _migrate_single_file_store(folder: Path) -> None:
    """Stores written by vicap 0.1 (one features.npy + index.json) become one shard, once."""
    old_npy, old_index = folder / "features.npy", folder / "index.json"
    if not (old_npy.is_file() and old_index.is_file()) or _shards_dir(folder).is_dir():
        return
    try:
        index = json.loads(old_index.read_text(encoding="utf-8"))
        array = np.load(old_npy, mmap_mode="r", allow_pickle=False)
        # vicap 0.1 replaced features.npy, then wrote index.json: an index older than the rows is the
        # previous run's, left by a process that died between the two (a copy that reordered the
        # mtimes is re-encoded too, which costs time but never serves a wrong row).
        ok = array.shape[0] == len(index) and old_index.stat().st_mtime_ns >= old_npy.stat().st_mtime_ns
    except (OSError, ValueError) as e:
        ok, index = False, []
        log.warning("feature store %s: unreadable single-file store (%s)", folder, e)
    shards = _shards_dir(folder)
    shards.mkdir()
    if not ok:
        log.warning(
            "feature store %s: the old index does not match its rows (or is older than them); the images "
            "will be encoded again",
            folder,
        )
        return
    name = "000000-00000-0-migrated"
    os.replace(old_npy, shards / f"{name}.npy")
    _write_json_atomic(
        shards / f"{name}.json",
        {
            "format": SHARD_FORMAT,
            "npy": f"{name}.npy",
            "capacity": len(index),
            "fingerprint": _fingerprint(shards / f"{name}.npy"),
            "entries": [{"path": e["path"], "stat": e["stat"], "row": r} for r, e in enumerate(index)],
            "failures": [],
        },
    )
    old_index.unlink()
    log.info("feature store %s: moved to the sharded layout (%d rows kept)", folder, len(index))


def _prepare_folder(encoder: Encoder, store_root: Path) -> Path:
    folder = store_root / encoder.key
    folder.mkdir(parents=True, exist_ok=True)
    _migrate_single_file_store(folder)
    _shards_dir(folder).mkdir(exist_ok=True)
    if not (folder / "meta.json").is_file():
        meta = {
            "identity": encoder.identity,
            "embed_dim": encoder.embed_dim,
            "row_shape": list(encoder.feature_shape),
            "dtype": "float32",
            "layout": "shards/<name>.npy + shards/<name>.json (see vicap.features)",
        }
        _write_json_atomic(folder / "meta.json", meta)
    return folder


def _encoded(encoder: Encoder, sources: list, batch_size: int, num_workers: int, device):
    """(indices into `sources`, their rows, [(index, why it failed)]) batch by batch: images through
    the image tower (read by DataLoader workers), sentences (str) through the text tower."""
    images = [i for i, s in enumerate(sources) if not isinstance(s, str)]
    texts = [i for i, s in enumerate(sources) if isinstance(s, str)]
    if images:
        loader = DataLoader(
            _Images([sources[i] for i in images], encoder.preprocess),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        for ids, pixels, bad in loader:
            feats = encoder.encode(pixels.to(device)).float().cpu().numpy() if pixels is not None else []
            yield [images[i] for i in ids], feats, [(images[i], err) for i, err in bad]
    for start in range(0, len(texts), batch_size):
        ids = texts[start : start + batch_size]
        yield ids, encoder.encode_text([sources[i] for i in ids]).cpu().numpy(), []


def extract_features(
    encoder: Encoder,
    image_paths: list[str | ImageRef],
    store_root: str | Path,
    *,
    texts: list[str] | tuple[str, ...] = (),
    text_normalizer: str = "",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    shard_images: int = SHARD_IMAGES,
) -> FeatureStore:
    """Encode every image not yet in the store (new, changed, or failed and since changed); return
    the store.

    Under N processes (`rank` of `world`, with `barrier` waiting for all of them), each process
    encodes every N-th image still to do into shards of its own; all return the same store. Images
    that cannot be read are reported in `store.failures` (path -> reason) and get no row.

    `texts` (normalized by `text_normalizer`, a language's normalizer name) are embedded by the
    encoder's text tower (loaded with `text=True`) into rows of the same store, found with
    `store.text_row(text, text_normalizer)`; a sentence already there is not embedded again.
    """
    barrier = barrier or (lambda: None)
    row_shape = _row_shape(encoder)
    folder = _prepare_folder(encoder, Path(store_root)) if rank == 0 else Path(store_root) / encoder.key
    state = None
    if rank == 0:
        _remove_dead_writers_files(folder)
        state = _read_state(folder, row_shape)
        _set_aside_damaged(folder, state.damaged)
    barrier()
    state = state or _read_state(folder, row_shape)
    wanted: dict[str, ImageRef] = {}  # key -> the image to read: its resolved path, or a shard's member
    for p in image_paths:
        key = _resolve(p)
        wanted.setdefault(key, p if isinstance(p, TarMember) else Path(key))
    for t in texts:  # a sentence is its own source: a str, never a path
        wanted.setdefault(text_key(t, text_normalizer), t)
    todo: list[tuple[str, ImageRef | str]] = []
    for p, ref in wanted.items():
        if isinstance(ref, str):
            if p not in state.rows:
                todo.append((p, ref))
            continue
        stat = _stat(ref)
        if p in state.rows and stat is not None and state.rows[p][2] == stat:
            continue  # encoded, unchanged
        if p in state.failed and state.failed[p][1] == stat:
            continue  # failed before, unchanged: not retried
        todo.append((p, ref))
    mine = todo[rank::world]
    if todo:
        log.info(
            "feature store %s: encoding %d of %d images and sentences (%d reused)%s",
            folder,
            len(todo),
            len(wanted),
            len(wanted) - len(todo),
            f", {len(mine)} in process {rank} of {world}" if world > 1 else "",
        )
    elif rank == 0:
        log.info("feature store %s: all %d images and sentences already encoded", folder, len(wanted))
    if mine:
        encoder.to(device)
        bar = tqdm(total=len(mine), desc="features", unit="row", disable=not progress)
        seq = state.last_seq + 1
        for chunk, start in enumerate(range(0, len(mine), shard_images)):
            paths = mine[start : start + shard_images]
            writer = _ShardWriter(_shards_dir(folder), _shard_name(seq, chunk), len(paths), row_shape)
            sources = [ref for _, ref in paths]
            for ids, feats, bad in _encoded(encoder, sources, batch_size, num_workers, device):
                for i, err in bad:
                    writer.fail(*paths[i], err)
                for i, row in zip(ids, feats, strict=True):
                    writer.add(*paths[i], row)
                bar.update(len(ids) + len(bad))
            writer.commit()
        bar.close()
    barrier()
    if todo:
        del todo, mine, state  # per-image lists: not held while the new state is read
        state = _read_state(folder, row_shape)
    store = _open(folder, state, row_shape)
    store.failures = {p: state.failed[p][0] for p in wanted if p in state.failed}
    return store
