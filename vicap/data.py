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
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        if batch_size < world:
            raise RecipeError(
                f"train.batch_size = {batch_size} is the global batch and must be at least the number of "
                f"processes ({world})"
            )
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Global batches per epoch (the same on every process)."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world else 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start, len(self)):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            lo, hi = (len(chunk) * self.rank) // self.world, (len(chunk) * (self.rank + 1)) // self.world
            yield chunk[lo:hi]


def optimizer_steps(n_batches: int, grad_accum: int) -> int:
    """Optimizer steps for n_batches micro-batches: a short final accumulation window still steps."""
    return math.ceil(n_batches / grad_accum)
