"""Mappers turn one image feature into `prefix_length` embeddings in the LM's input space."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vicap.recipe import MapperConfig
from vicap.registry import Registry

MAPPERS: Registry[Callable[[MapperConfig, int, int], nn.Module]] = Registry("mapper")


@MAPPERS.register("mlp", help="ClipCap's MLP: Linear(d_clip, d_lm*k/2), Tanh, Linear(..., d_lm*k)")
class MLPMapper(nn.Module):
    """ClipCap's MLP mapper. Hidden width defaults to (d_lm * k) // 2 as in the paper's code."""

    def __init__(self, cfg: MapperConfig, in_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.prefix_length, self.lm_dim = cfg.prefix_length, lm_dim
        hidden = cfg.hidden_dim or (lm_dim * cfg.prefix_length) // 2
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.Tanh(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, lm_dim * cfg.prefix_length),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, prefix_length, lm_dim)."""
        return self.net(features).view(features.shape[0], self.prefix_length, self.lm_dim)


def build_mapper(cfg: MapperConfig, in_dim: int, lm_dim: int) -> nn.Module:
    return MAPPERS.get(cfg.type)(cfg, in_dim, lm_dim)
