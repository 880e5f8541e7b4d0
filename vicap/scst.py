"""Self-critical sequence training (Rennie et al., 2017): a second stage after cross-entropy.

For each training image, `SelfCritical` samples `scst.samples` captions from the current model
(vicap's batched generation, no gradient), scores each with CIDEr-D against the image's training
references, on the language's metric tokens (`scst.level`), with document frequencies from all
training references (`vicap.metrics.cider.CiderD`, the code the evaluation uses), and compares it with
a baseline: the mean reward of the image's other samples (as the M2 transformer) or the reward of the
image's greedy caption (as Rennie et al.). The loss of one sampled caption is

    -(reward - baseline) * mean log-probability of its tokens (EOS included when it ended),

averaged over the step's sampled captions (as M2 normalizes: a long caption does not weigh more). The
log-probabilities come from one teacher-forced forward pass of the model over the samples, so
gradients reach exactly what the recipe trains (the mapper; the LM too when tuned, its adapters under
LoRA; with a frozen LM only the mapper). It trains through the same loop as cross-entropy
(`vicap.train.fit`): Accelerate, N processes, accumulation, checkpoints, exact resume (sampling draws
from each process's RNG, which checkpoints keep), validation and best-checkpoint selection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vicap.generate import decode_batch, hyp_texts
from vicap.model import IGNORE, CaptionModel
from vicap.recipe import GenerateConfig, RecipeError, ScstConfig


class Rewarder:
    """CIDEr-D of captions of training images, against their references, with document frequencies
    from all of them (what SCST maximizes)."""

    def __init__(self, refs: dict[str, list[str]], *, language: str, level: str) -> None:
        from vicap.metrics.cider import CiderD
        from vicap.metrics.tokens import tokenize_references

        self.language, self.level = language, level
        self.cider = CiderD(tokenize_references(refs, language, level))

    def __call__(self, keys: list[str], captions: list[str]) -> list[float]:
        from vicap.metrics.tokens import tokenize_for_metrics

        tokens = tokenize_for_metrics(captions, self.language, self.level)
        return [self.cider.image_score(k, t) for k, t in zip(keys, tokens, strict=True)]


class Images(Dataset):
    """The training images with features: item i -> i (its row and key are looked up by index)."""

    def __init__(self, rows: list[int], keys: list[str]) -> None:
        self.rows, self.keys = rows, keys

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return i


class ImageCollator:
    def __init__(self, store, images: Images) -> None:
        self.store, self.images = store, images

    def __call__(self, batch: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.images.rows[i] for i in batch]
        feats = torch.from_numpy(np.ascontiguousarray(self.store.features[rows]))
        return {"features": feats, "image": torch.tensor(batch, dtype=torch.long)}


class SelfCritical(nn.Module):
    """The SCST objective around a caption model: a `vicap.train.TrainableModel` whose batches are images.

    Its checkpoints hold the caption model's trainable weights under their own names, so a SCST run
    loads like any vicap run (`vicap evaluate`, `caption`, `serve`)."""

    def __init__(
        self,
        model: CaptionModel,
        cfg: ScstConfig,
        generate: GenerateConfig,
        rewarder: Rewarder,
        keys: list[str],
        *,
        segment: str,
    ) -> None:
        super().__init__()
        self.model, self.cfg, self.rewarder, self.keys, self.segment = model, cfg, rewarder, keys, segment
        common = {"max_new_tokens": generate.max_new_tokens, "stop": generate.stop, "batch_size": 1 << 30}
        self.sampling = GenerateConfig(
            strategy="sample", n_best=cfg.samples, temperature=cfg.temperature, **common
        )
        self.greedy = GenerateConfig(strategy="greedy", **common)

    def learned_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss is averaged over sampled captions, not tokens."""
        return torch.tensor(batch["features"].shape[0] * self.cfg.samples, device=batch["features"].device)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable(state)

    def _captions(self, features: torch.Tensor, cfg: GenerateConfig) -> list:
        """Hypotheses (k per image, image by image), decoded in eval mode without a graph."""
        training = self.model.training
        with torch.no_grad():
            hyps = [h for per_image in decode_batch(self.model, features, cfg) for h in per_image]
        self.model.train(training)
        return hyps

    def _rewards(self, hyps: list, keys: list[str]) -> torch.Tensor:
        texts = hyp_texts(
            self.model, hyps, self.greedy.stop, language=self.rewarder.language, segment=self.segment
        )
        return torch.tensor(self.rewarder(keys, texts), dtype=torch.float32)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> dict:
        k = self.cfg.samples
        keys = [self.keys[i] for i in image.tolist()]
        samples = self._captions(features, self.sampling)
        rewards = self._rewards(samples, [key for key in keys for _ in range(k)]).view(-1, k)
        if self.cfg.baseline == "greedy":
            baseline = self._rewards(self._captions(features, self.greedy), keys)[:, None].expand(-1, k)
        else:
            baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
        # The sampled tokens, with the stop token that was sampled where one ended the caption (any of
        # the LM's stop ids), teacher-forced for their log-probs.
        seqs = [h.ids + ([h.end] if h.end is not None else []) for h in samples]
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), self.model.decoder.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, dtype=torch.long), 1
        ids, mask = ids.to(features.device), mask.to(features.device)
        out = self.model(features.repeat_interleave(k, dim=0), ids, mask)
        token_logp = -F.cross_entropy(
            out["logits"].float().transpose(1, 2),
            ids.masked_fill(mask == 0, IGNORE),
            ignore_index=IGNORE,
            reduction="none",
        )
        seq_logp = token_logp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        advantage = (rewards - baseline).flatten().to(seq_logp.device)
        return {
            "loss_sum": -(advantage * seq_logp).sum(),
            "tokens": torch.tensor(len(seqs)),
            "stats": {"reward": rewards.sum(), "baseline": baseline.sum()},
        }


def init_model(recipe) -> tuple[CaptionModel, str]:
    """The caption model of `scst.init_from` at `scst.init_checkpoint`, and a description of it. The
    run must have the recipe's encoder, decoder and mapper (the weights fit nothing else)."""
    from vicap.checkpoint import recipe_differences
    from vicap.runs import load_run

    init = load_run(Path(recipe.scst.init_from), checkpoint=recipe.scst.init_checkpoint)
    diffs = recipe_differences(
        init.recipe.to_dict(),
        recipe.to_dict(),
        ("encoder", "decoder", "mapper"),
        allowed=("encoder.batch_size",),
    )
    if diffs:
        raise RecipeError(
            f"scst.init_from = {recipe.scst.init_from}: that run's model differs from this recipe's:\n  "
            + "\n  ".join(diffs)
        )
    return init.model, f"{init.checkpoint.path} ({init.which})"
