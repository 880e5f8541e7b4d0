"""Caption pairs for training: (feature row, token ids) built once from a manifest and a feature store.

Tokenization happens once per run, up front, with the LM's own (fast) tokenizer. Batches are padded
dynamically to their longest caption, so no step pays for the longest caption in the dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from vicap.decoders import Decoder
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
