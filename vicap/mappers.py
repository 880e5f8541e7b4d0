"""Mappers turn image features into `prefix_length` embeddings in the LM's input space.

Features reach a mapper as (B, D), the pooled image vector, or (B, 1 + T, D) when the feature store
keeps patch tokens (`encoder.patch_tokens = true`): the pooled vector first, then T patch tokens, all
projected to the same width D. Mappers that read only the pooled vector take row 0; a mapper that
attends to the tokens sets `uses_tokens = True` and refuses pooled-only features.

- `mlp`: ClipCap's MLP.
- `transformer`: ClipCap's transformer mapper, module for module (names included, so the original's
  weights load): the image vector becomes `clip_length` tokens, `prefix_length` learned constants are
  appended, 8 self-attention layers run over both, and the constants' outputs are the prefix.
- `attention`: `prefix_length` learned queries that alternately cross-attend to the image tokens
  (pooled + patches) and self-attend, built from the same layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from vicap.errors import RecipeError
from vicap.recipe import MapperConfig
from vicap.registry import Registry

MAPPERS: Registry[Callable[[MapperConfig, int, int], nn.Module]] = Registry("mapper")


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, D) or (B, 1 + T, D) -> (B, D): the pooled image vector."""
    return features[:, 0] if features.dim() == 3 else features


@MAPPERS.register("mlp", help="ClipCap's MLP: Linear(d_clip, d_lm*k/2), Tanh, Linear(..., d_lm*k)")
class MLPMapper(nn.Module):
    """ClipCap's MLP mapper. Hidden width defaults to (d_lm * k) // 2 as in the paper's code."""

    uses_tokens = False

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
        x = pooled(features)
        return self.net(x).view(x.shape[0], self.prefix_length, self.lm_dim)


# --------------------------------------------------------------------------- ClipCap's transformer
# The classes below mirror CLIP_prefix_caption's MlpTransformer / MultiHeadAttention / TransformerLayer /
# Transformer: same sub-modules, same names, same biases (none on queries and keys/values, one on the
# output projection), pre-norm residual layers, ReLU MLPs. Attention runs through PyTorch's fused
# scaled_dot_product_attention; the arithmetic is the original's einsum softmax(q k^T / sqrt(d_head)) v.


class MlpTransformer(nn.Module):
    def __init__(self, in_dim: int, h_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.fc2 = nn.Linear(h_dim, in_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    """Queries from x (width dim_self), keys and values from y (width dim_ref)."""

    def __init__(self, dim_self: int, dim_ref: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim_self % num_heads:
            raise RecipeError(f"mapper.num_heads = {num_heads} must divide the LM width {dim_self}")
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = x if y is None else y
        b, n, c = x.shape
        m, h = y.shape[1], self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (b, h, n, d)
        kv = self.to_keys_values(y).view(b, m, 2, h, c // h)  # the original's (keys, values) split
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # the original never applies attention dropout
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class TransformerLayer(nn.Module):
    def __init__(
        self, dim_self: int, dim_ref: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), dropout)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, last: int | None = None
    ) -> torch.Tensor:
        """With `last`, only the last `last` positions are computed (they still attend to all of x):
        the same values as running every position and slicing, for less work."""
        if last is None:
            x = x + self.attn(self.norm1(x), y)
        else:
            h = self.norm1(x)
            x = x[:, -last:] + self.attn(h[:, -last:], h if y is None else y)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of layers; with enc_dec, even layers cross-attend to `y` and odd layers self-attend."""

    def __init__(
        self,
        dim_self: int,
        num_heads: int,
        num_layers: int,
        dim_ref: int | None = None,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        enc_dec: bool = False,
    ) -> None:
        super().__init__()
        dim_ref = dim_self if dim_ref is None else dim_ref
        self.enc_dec = enc_dec
        n = num_layers * 2 if enc_dec else num_layers
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim_self, dim_ref if (i % 2 == 0 or not enc_dec) else dim_self, num_heads, mlp_ratio, dropout
            )
            for i in range(n)
        )

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, last: int | None = None
    ) -> torch.Tensor:
        """With `last`, returns only the last `last` positions, and the final layer computes only them."""
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, y if (i % 2 == 0 or not self.enc_dec) else None, last if i == n - 1 else None)
        return x


@MAPPERS.register(
    "transformer",
    help="ClipCap's transformer: image vector -> clip_length tokens + prefix_length learned constants, "
    "8 layers x 8 heads",
)
class TransformerMapper(nn.Module):
    uses_tokens = False

    def __init__(self, cfg: MapperConfig, in_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.clip_length = cfg.clip_length
        self.transformer = Transformer(
            lm_dim, cfg.num_heads, cfg.num_layers or 8, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout
        )
        self.linear = nn.Linear(in_dim, cfg.clip_length * lm_dim)
        self.prefix_const = nn.Parameter(torch.randn(cfg.prefix_length, lm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, prefix_length, lm_dim)."""
        x = pooled(features)
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        # Only the constants' outputs are the prefix, so the last layer computes only those rows (the
        # original runs all clip_length + prefix_length rows and slices; the values are the same).
        return self.transformer(torch.cat([x, const], dim=1), last=const.shape[1])


@MAPPERS.register(
    "attention",
    help="learned queries cross-attending to the image's patch tokens (needs encoder.patch_tokens = true)",
)
class AttentionMapper(nn.Module):
    """`prefix_length` learned queries; each of `num_layers` blocks cross-attends to the image tokens
    (pooled vector + patch tokens, layer-normed) and then self-attends among the queries."""

    uses_tokens = True

    def __init__(self, cfg: MapperConfig, in_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.prefix_length, lm_dim))
        self.memory_norm = nn.LayerNorm(in_dim)
        self.transformer = Transformer(
            lm_dim,
            cfg.num_heads,
            cfg.num_layers or 2,
            dim_ref=in_dim,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            enc_dec=True,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T, in_dim) -> (B, prefix_length, lm_dim)."""
        if features.dim() != 3:
            raise RecipeError(
                "the attention mapper needs patch tokens, got pooled features of shape "
                f"{tuple(features.shape)}: set encoder.patch_tokens = true"
            )
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        return self.transformer(queries, self.memory_norm(features))


def build_mapper(cfg: MapperConfig, in_dim: int, lm_dim: int) -> nn.Module:
    return MAPPERS.get(cfg.type)(cfg, in_dim, lm_dim)
