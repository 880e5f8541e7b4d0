"""Caption pairs for training: (feature row, token ids) built once from a manifest and a feature store.

Tokenization happens once per run, up front, with the LM's own (fast) tokenizer. Batches are padded
dynamically to their longest caption, so no step pays for the longest caption in the dataset.

`GlobalBatches` decides which captions each process sees: one seeded shuffle of all captions, cut
into global batches of `train.batch_size`, each split into contiguous per-process slices. A run on
N processes therefore trains on exactly the batches a one-process run does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from vicap.decoders import Decoder
from vicap.errors import RecipeError
from vicap.features import FeatureStore

log = logging.getLogger(__name__)


def lm_text(caption: str, language: str, segment: str) -> str:
    """The text the LM sees for a caption: word-segmented when the recipe asks for it."""
    return get_language(language).segment(caption, segment) if segment != "none" else caption


def encode_captions(texts: list[str], decoder: Decoder, max_tokens: int) -> list[list[int]]:
    """Caption token ids ending with EOS, at most max_tokens long (the EOS is always kept)."""
    ids = decoder.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(t[: max_tokens - 1]) + [decoder.eos_token_id] for t in ids]


@dataclass
class CaptionPairs(Dataset):
    features: FeatureStore
    rows: np.ndarray  # feature-store row per pair
    tokens: list[list[int]]
    skipped_images: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return int(self.rows[i]), self.tokens[i]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per caption (EOS included): what a batch is padded by."""
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))


def build_pairs(
    manifest: Manifest,
    records: list[Record],
    store: FeatureStore,
    decoder: Decoder,
    *,
    segment: str,
    max_tokens: int,
) -> CaptionPairs:
    rows, texts, skipped = [], [], 0
    for rec in records:
        path = manifest.resolve_image(rec)
        if not store.has(path):
            skipped += 1  # unreadable image: reported when features were extracted
            continue
        r = store.row(path)
        for caption in rec.captions:
            rows.append(r)
            texts.append(lm_text(caption, manifest.language, segment))
    if skipped:
        log.warning(
            "%d image(s) have no features and are left out of training (see the feature report)", skipped
        )
    tokens = encode_captions(texts, decoder, max_tokens)
    return CaptionPairs(store, np.asarray(rows, dtype=np.int64), tokens, skipped)


class Collator:
    """Gathers features from the (memory-mapped) store and pads token ids to the batch's longest."""

    def __init__(self, store: FeatureStore, pad_id: int) -> None:
        self.store, self.pad_id = store, pad_id

    def __call__(self, batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        rows = [r for r, _ in batch]
        feats = torch.from_numpy(np.ascontiguousarray(self.store.features[rows]))
        width = max(len(t) for _, t in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, t) in enumerate(batch):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return {"features": feats, "input_ids": ids, "attention_mask": mask}


class GlobalBatches(Sampler[list[int]]):
    """Per-process batches of a global batch order; a DataLoader `batch_sampler`.

    Epoch e shuffles with `torch.randperm(n, generator seeded seed + e)` (the order Accelerate's
    seedable sampler produces), cuts the permutation into global batches of `batch_size`, and gives
    process `rank` of `world` its contiguous slice of each (sizes differ by at most one when the
    batch does not divide evenly). A final global batch smaller than `world` is dropped so every
    process has a batch at every step; that is at most world - 1 captions an epoch, none on one
    process. `start` skips that many global batches of the current epoch (resuming mid-epoch).
    With `lengths` (train.group_by_length), the shuffled order is regrouped by length first.
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
    ) -> None:
        if batch_size < world:
            raise RecipeError(
                f"train.batch_size = {batch_size} is the global batch and must be at least the number of "
                f"processes ({world})"
            )
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0
        self.lengths = lengths  # given: global batches grouped by length (see `length_grouped`)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Global batches per epoch (the same on every process)."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world else 0)

    def order(self, epoch: int) -> list[int]:
        """Every index once, in epoch `epoch`'s order (cut into global batches by `__iter__`)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is not None:
            order = length_grouped(order, self.lengths, self.batch_size)
        return order

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
