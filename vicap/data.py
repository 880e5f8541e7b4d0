"""Caption pairs for training: (feature row, token ids) built once from a manifest and a feature store.

Tokenization happens once per (manifest captions, tokenizer, segmentation, max_tokens), with the LM's
own (fast) tokenizer, into a memory-mapped cache beside the feature store:
`<features_dir>/captions/<key>/` holds every caption's ids end to end (`ids.bin`, int32), where each
caption starts (`offsets.npy`) and where each record's captions start (`first.npy`), and `meta.json`,
written last. The key hashes all of what the ids depend on, so a run with the same captions and
tokenizer reuses the cache and any change builds a new one; training never holds a Python object per
caption. Batches are padded dynamically to their longest caption, so no step pays for the longest
caption in the dataset.

`GlobalBatches` decides which captions each process sees: one seeded shuffle of all captions, cut
into global batches of `train.batch_size`, each split into contiguous per-process slices. A run on
N processes therefore trains on exactly the batches a one-process run does. With
train.group_by_image the shuffle is of images, each image's captions kept together, and the collated
batch holds each image's features once (see `CaptionModel.grouped_logits`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from data_prep.textio import json_text, write_atomic
from vicap.decoders import Decoder
from vicap.errors import RecipeError
from vicap.features import FeatureStore

log = logging.getLogger(__name__)

CAPTIONS_FORMAT = "vicap-captions-1"
_CHUNK = 8192  # captions segmented and tokenized at a time while a cache is built


def lm_text(caption: str, language: str, segment: str) -> str:
    """The text the LM sees for a caption: word-segmented when the recipe asks for it."""
    return get_language(language).segment(caption, segment) if segment != "none" else caption


def encode_captions(texts: list[str], decoder: Decoder, max_tokens: int) -> list[list[int]]:
    """Caption token ids ending with EOS, at most max_tokens long (the EOS is always kept)."""
    ids = decoder.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(t[: max_tokens - 1]) + [decoder.eos_token_id] for t in ids]


@dataclass
class CaptionTokens:
    """Every caption of a manifest as token ids, memory-mapped: caption c is
    `ids[offsets[c]:offsets[c + 1]]`, and record r's captions are `first[r]` to `first[r + 1]`."""

    folder: Path
    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, captions + 1
    first: np.ndarray  # int64, records + 1

    def __getitem__(self, c: int) -> list[int]:
        return self.ids[self.offsets[c] : self.offsets[c + 1]].tolist()


def _tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: a fast tokenizer's full state (vocabulary, merges,
    normalizer, added tokens), else its vocabulary and model files."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json_text(sorted(tokenizer.get_vocab().items())).encode())
        for name in ("vocab_file", "merges_file"):
            path = getattr(tokenizer, name, None)
            if isinstance(path, str) and os.path.isfile(path):
                h.update(Path(path).read_bytes())
    return h.hexdigest()


def caption_cache_key(manifest: Manifest, decoder: Decoder, *, segment: str, max_tokens: int) -> str:
    """The hash that names a manifest's caption cache: its captions (per record, in order), the
    language and segmentation (with the segmenter's version), the tokenizer, EOS and max_tokens."""
    lang = get_language(manifest.language)
    identity = {
        "format": CAPTIONS_FORMAT,
        "language": lang.code,
        "segment": segment,
        "segmenter": lang.segmenter_version() if segment != "none" else "",
        "tokenizer": _tokenizer_fingerprint(decoder.tokenizer),
        "eos": decoder.eos_token_id,
        "max_tokens": max_tokens,
    }
    h = hashlib.sha256(json_text(identity, sort_keys=True).encode())
    for rec in manifest.records:
        h.update(json_text(rec.captions).encode() + b"\n")
    return h.hexdigest()[:32]


def _open_cache(folder: Path) -> CaptionTokens | None:
    """The cache in `folder`, or None when there is none or it does not hold what its meta.json says."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        offsets = np.load(folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
        first = np.load(folder / "first.npy", mmap_mode="r", allow_pickle=False)
        n_ids = (folder / "ids.bin").stat().st_size // 4
        # np.memmap refuses an empty file: a manifest without captions has no ids
        ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r") if n_ids else np.zeros(0, np.int32)
        ok = (
            meta.get("format") == CAPTIONS_FORMAT
            and len(first) == meta["records"] + 1
            and len(offsets) == meta["captions"] + 1
            and first[-1] == meta["captions"]
            and offsets[-1] == n_ids == meta["tokens"]
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        ok, why = False, str(e)
    else:
        why = "its files do not match its meta.json"
    if not ok:
        log.warning("caption cache %s is unreadable (%s); tokenizing again", folder, why)
        return None
    return CaptionTokens(folder, ids, offsets, first)


def _build_cache(
    folder: Path, manifest: Manifest, decoder: Decoder, *, segment: str, max_tokens: int
) -> None:
    """Tokenize every caption of the manifest into `folder`, a chunk at a time; the folder appears
    complete or not at all (built beside it, renamed into place)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{socket.gethostname()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = np.fromiter((len(r.captions) for r in manifest.records), np.int64, len(manifest.records))
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    offsets = np.zeros(int(first[-1]) + 1, dtype=np.int64)
    done = 0

    def flush(texts: list[str], f) -> None:
        nonlocal done
        ids = encode_captions(texts, decoder, max_tokens)
        lengths = np.fromiter((len(t) for t in ids), np.int64, len(ids))
        offsets[done + 1 : done + 1 + len(ids)] = offsets[done] + np.cumsum(lengths)
        f.write(np.fromiter((i for t in ids for i in t), np.int32, int(lengths.sum())).tobytes())
        done += len(ids)

    with open(tmp / "ids.bin", "wb") as f:
        texts: list[str] = []
        for rec in manifest.records:
            for caption in rec.captions:
                texts.append(lm_text(caption, manifest.language, segment))
                if len(texts) == _CHUNK:
                    flush(texts, f)
                    texts = []
        flush(texts, f)
        f.flush()
        os.fsync(f.fileno())
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "first.npy", first)
    meta = {
        "format": CAPTIONS_FORMAT,
        "manifest": str(manifest.path),
        "records": len(manifest.records),
        "captions": int(first[-1]),
        "tokens": int(offsets[-1]),
        "segment": segment,
        "max_tokens": max_tokens,
        "tokenizer": getattr(decoder.tokenizer, "name_or_path", ""),
    }
    write_atomic(tmp / "meta.json", json_text(meta, indent=1), durable=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # there already: another process built it first, or a broken one is in the way
        if _open_cache(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def caption_tokens(
    manifest: Manifest, decoder: Decoder, cache_root: str | Path, *, segment: str, max_tokens: int
) -> CaptionTokens:
    """Every caption of `manifest` tokenized (see `encode_captions`), from the cache under
    `cache_root` when it holds them, else tokenized once into it."""
    key = caption_cache_key(manifest, decoder, segment=segment, max_tokens=max_tokens)
    folder = Path(cache_root) / key
    tokens = _open_cache(folder)
    if tokens is not None:
        log.info("caption tokens of %s: reused %s", manifest.path, folder)
        return tokens
    n = sum(len(r.captions) for r in manifest.records)
    log.info("caption tokens of %s: tokenizing %d captions into %s", manifest.path, n, folder)
    _build_cache(folder, manifest, decoder, segment=segment, max_tokens=max_tokens)
    tokens = _open_cache(folder)
    if tokens is None:
        raise OSError(f"caption cache {folder} could not be read back after it was written")
    return tokens


@dataclass
class CaptionPairs(Dataset):
    features: FeatureStore
    rows: np.ndarray  # feature-store row per pair
    captions: np.ndarray  # per pair, its caption's index in `tokens`
    tokens: CaptionTokens
    skipped_images: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return int(self.rows[i]), self.tokens[int(self.captions[i])]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per pair's caption (EOS included): what a batch is padded by."""
        return np.diff(self.tokens.offsets)[self.captions]


def build_pairs(
    manifest: Manifest,
    records: list[Record],
    store: FeatureStore,
    decoder: Decoder,
    *,
    segment: str,
    max_tokens: int,
) -> CaptionPairs:
    """One pair per caption of `records` (the manifest's own, e.g. one split) whose image has features,
    in record order. Token ids come from the manifest's caption cache beside the feature store
    (`<features_dir>/captions/`); per pair only two integers are held."""
    tokens = caption_tokens(
        manifest, decoder, store.root.parent / "captions", segment=segment, max_tokens=max_tokens
    )
    position = {id(r): i for i, r in enumerate(manifest.records)}
    picked, image_rows, skipped = [], [], 0
    for rec in records:
        path = manifest.resolve_image(rec)
        if not store.has(path):
            skipped += 1  # unreadable image: reported when features were extracted
            continue
        if id(rec) not in position:
            raise ValueError(f"record {rec.image_id!r} is not one of {manifest.path}'s records")
        picked.append(position[id(rec)])
        image_rows.append(store.row(path))
    if skipped:
        log.warning(
            "%d image(s) have no features and are left out of training (see the feature report)", skipped
        )
    picked_a = np.asarray(picked, dtype=np.int64)
    start = np.asarray(tokens.first[picked_a])
    count = np.asarray(tokens.first[picked_a + 1]) - start
    # Record j's captions start[j] .. start[j] + count[j] - 1, laid end to end in record order.
    before = np.cumsum(count) - count
    captions = np.repeat(start - before, count) + np.arange(int(count.sum()), dtype=np.int64)
    rows = np.repeat(np.asarray(image_rows, dtype=np.int64), count)
    return CaptionPairs(store, rows, captions, tokens, skipped)


def is_pairs(manifest: Manifest) -> bool:
    """A manifest of sentence pairs (the `text` adapter with a source column), not of sentences."""
    return "source_normalizer" in manifest.meta


def sentence_inputs(manifest: Manifest) -> tuple[list[str], str]:
    """What the text tower embeds for each caption of a text manifest, in caption order, and the
    normalizer that made it: a sentence itself, or a sentence pair's source sentence."""
    if is_pairs(manifest):
        return [r.source for r in manifest.records for _ in r.captions], manifest.meta["source_normalizer"]
    return [c for r in manifest.records for c in r.captions], manifest.meta.get("normalizer", "")


def build_text_pairs(
    manifest: Manifest, store: FeatureStore, decoder: Decoder, *, segment: str, max_tokens: int
) -> CaptionPairs:
    """One pair per caption of a text manifest (the `text` adapter's: records without images): the
    text-embedding row of its `sentence_inputs` (the sentence itself, or a sentence pair's source
    sentence; `vicap.features.text_key`) and its token ids, from the same caption cache as image
    captions."""
    tokens = caption_tokens(
        manifest, decoder, store.root.parent / "captions", segment=segment, max_tokens=max_tokens
    )
    texts, normalizer = sentence_inputs(manifest)
    rows = [store.text_row(text, normalizer) for text in texts]
    captions = np.arange(int(tokens.first[-1]), dtype=np.int64)  # every caption, in record order
    return CaptionPairs(store, np.asarray(rows, dtype=np.int64), captions, tokens)


class MixedPairs(ConcatDataset):
    """Pairs of several sources over one feature store (image captions, a text corpus's sentences,
    sentence pairs), laid end to end. Without `counts`, one global shuffle mixes them in proportion to
    their sizes; with `counts` (items of each part in every global batch: recipe [mix]),
    `GlobalBatches` fills every global batch with that many items of each part."""

    def __init__(self, parts: list[CaptionPairs], counts: list[int] | None = None) -> None:
        super().__init__(parts)
        self.parts, self.counts = parts, counts

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate([p.rows for p in self.parts])

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts])


class Collator:
    """Gathers features from the (memory-mapped) store and pads token ids to the batch's longest.

    With `group` (train.group_by_image), `features` holds each image of the batch once and `image`
    gives each caption's row in it, so `CaptionModel.forward` runs each image's prefix once."""

    def __init__(self, store: FeatureStore, pad_id: int, *, group: bool = False) -> None:
        self.store, self.pad_id, self.group = store, pad_id, group

    def __call__(self, batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        rows = [r for r, _ in batch]
        out = {}
        if self.group:
            unique, inverse = np.unique(rows, return_inverse=True)
            rows, out["image"] = unique.tolist(), torch.from_numpy(inverse.astype(np.int64))
        feats = torch.from_numpy(np.ascontiguousarray(self.store.features[rows]))
        width = max(len(t) for _, t in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, t) in enumerate(batch):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return {"features": feats, "input_ids": ids, "attention_mask": mask, **out}


class GlobalBatches(Sampler[list[int]]):
    """Per-process batches of a global batch order; a DataLoader `batch_sampler`.

    Epoch e shuffles with `torch.randperm(n, generator seeded seed + e)` (the order Accelerate's
    seedable sampler produces), cuts the permutation into global batches of `batch_size`, and gives
    process `rank` of `world` its contiguous slice of each (sizes differ by at most one when the
    batch does not divide evenly). A final global batch smaller than `world` is dropped so every
    process has a batch at every step; that is at most world - 1 captions an epoch, none on one
    process. `start` skips that many global batches of the current epoch (resuming mid-epoch).
    With `lengths` (train.group_by_length), the shuffled order is regrouped by length first.
    With `parts` (the sizes of consecutive sources of the items, and each one's count of items in every
    global batch: recipe [mix]), every global batch holds exactly that many items of each source (see
    `mixed_order`).
    With `images` (each item's image; train.group_by_image), the images are shuffled and each one's
    items laid end to end, so a global batch holds whole images with all their captions; it is still
    cut every `batch_size` items, so an image at a batch's (or a process slice's) edge is split
    there. With both, images are grouped by their longest caption.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        lengths: np.ndarray | None = None,
        images: np.ndarray | None = None,
        parts: tuple[list[int], list[int]] | None = None,
    ) -> None:
        if parts is not None and (sum(parts[1]) != batch_size or sum(parts[0]) != n):
            raise ValueError(f"parts {parts} do not add up to {n} items and batches of {batch_size}")
        if batch_size < world:
            raise RecipeError(
                f"train.batch_size = {batch_size} is the global batch and must be at least the number of "
                f"processes ({world})"
            )
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0
        self.lengths = lengths  # given: global batches grouped by length (see `length_grouped`)
        self.images = images
        self.parts = parts if shuffle else None
        if images is not None:  # items by image (stable: an image's items keep their order)
            self._by_image = np.argsort(images, kind="stable")
            _, self._starts, self._counts = np.unique(
                images[self._by_image], return_index=True, return_counts=True
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Global batches per epoch (the same on every process)."""
        if self.parts is not None:  # enough for the source that needs the most to be seen once
            return max(math.ceil(size / count) for size, count in zip(*self.parts, strict=True) if count)
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world else 0)

    def order(self, epoch: int) -> list[int]:
        """Every index once, in epoch `epoch`'s order (cut into global batches by `__iter__`)."""
        if not self.shuffle:
            return list(range(self.n))
        if self.parts is not None:
            return self.mixed_order(epoch)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        if self.images is None:
            order = torch.randperm(self.n, generator=g).tolist()
            return order if self.lengths is None else length_grouped(order, self.lengths, self.batch_size)
        starts, counts = self._starts, self._counts
        order = torch.randperm(len(starts), generator=g).tolist()
        if self.lengths is not None and len(starts):
            # images by their longest caption, in runs of ~50 global batches
            longest = np.maximum.reduceat(self.lengths[self._by_image], starts)
            order = length_grouped(order, longest, max(1, round(self.batch_size * len(starts) / self.n)))
        # the images' items end to end, each image's as a run (the index arithmetic of build_pairs)
        start, count = starts[order], counts[order]
        at = np.repeat(start - (np.cumsum(count) - count), count) + np.arange(self.n, dtype=np.int64)
        return self._by_image[at].tolist()

    def mixed_order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s global batches of a [mix]: each source is an endless stream of its items,
        every pass over them a new seeded shuffle, and global batch b of the run (epoch x len + step)
        takes its next `count` items from each stream, shuffled together so that every process's
        slice holds every source. An epoch is as many global batches as the source that needs the
        most takes to be seen once; a smaller source repeats (a new pass) within it, none is cut.
        Everything follows from (seed, epoch, step), so a resumed run reads the same batches."""
        batches, first = len(self), 0
        columns = []
        for s, (size, count) in enumerate(zip(*self.parts, strict=True)):
            if count:
                at = np.arange(epoch * batches * count, (epoch + 1) * batches * count, dtype=np.int64)
                passes = at // size
                items = np.empty_like(at)
                for p in range(int(passes[0]), int(passes[-1]) + 1):
                    shuffle = np.random.default_rng([self.seed, 1 + s, p]).permutation(size)
                    picked = passes == p
                    items[picked] = shuffle[at[picked] - p * size]
                columns.append(first + items.reshape(batches, count))
            first += size
        table = np.concatenate(columns, axis=1)  # a global batch a row, the sources side by side
        within = np.random.default_rng([self.seed, 0, epoch]).random(table.shape).argsort(axis=1)
        return np.take_along_axis(table, within, axis=1).reshape(-1).tolist()

    def slices(self, chunk: list[int]) -> list[list[int]]:
        """A global batch's per-process slices, in rank order."""
        return [
            chunk[(len(chunk) * r) // self.world : (len(chunk) * (r + 1)) // self.world]
            for r in range(self.world)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for b in range(self.start, len(self)):
            yield self.slices(order[b * self.batch_size : (b + 1) * self.batch_size])[self.rank]

    def padding(self, lengths: np.ndarray, epoch: int = 0) -> float:
        """The fraction of padded positions over every process's micro-batches of `epoch`."""
        order, padded, real = self.order(epoch), 0, 0
        for b in range(len(self)):
            for part in self.slices(order[b * self.batch_size : (b + 1) * self.batch_size]):
                if part:
                    sizes = lengths[part]
                    padded += int(sizes.max()) * len(part)
                    real += int(sizes.sum())
        return 1 - real / max(padded, 1)


def length_grouped(order: list[int], lengths: np.ndarray, batch_size: int, megabatch: int = 50) -> list[int]:
    """`order` regrouped so that global batches hold captions of similar length, as transformers'
    `group_by_length`: consecutive runs of `megabatch` global batches, each run sorted longest first.
    Every index stays once, and which run it falls in is still the shuffle's, so batches stay random
    mixtures of images while their padding falls."""
    size = batch_size * megabatch
    out: list[int] = []
    for i in range(0, len(order), size):
        run = order[i : i + size]
        out += sorted(run, key=lambda j: -int(lengths[j]))  # stable: ties keep the shuffle's order
    return out


def optimizer_steps(n_batches: int, grad_accum: int) -> int:
    """Optimizer steps for n_batches micro-batches: a short final accumulation window still steps."""
    return math.ceil(n_batches / grad_accum)
