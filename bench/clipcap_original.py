"""ClipCap's mappers as the original code computes them, for the equivalence test and the benchmarks.

A faithful re-implementation of CLIP_prefix_caption's train.py `MlpTransformer`, `MultiHeadAttention`,
`TransformerLayer`, `Transformer`, `TransformerMapper` and `MLP` (einsum attention, no query/key-value bias,
dropout defined and applied where the original applies it): tests/test_mappers.py checks that vicap's
transformer mapper has the same parameter names and computes the same values, and
bench/train_throughput.py trains it as the reference side. One copy, so both compare against the same
thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OriginalMlp(nn.Module):
    def __init__(self, in_dim, h_dim, out_d=None, act=F.relu, dropout=0.0):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class OriginalAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim_self // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = nn.Dropout(dropout)  # defined, never applied, as in the original

    def forward(self, x, y=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, _ = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return self.project(out), attention


class OriginalLayer(nn.Module):
    # The original's Transformer passes (dim_self, dim_ref, num_heads, mlp_ratio) positionally, so
    # bias keeps its default False.
    def __init__(self, dim_self, dim_ref, num_heads, mlp_ratio=4.0, bias=False, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = OriginalAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = OriginalMlp(dim_self, int(dim_self * mlp_ratio), dropout=dropout)

    def forward(self, x, y=None):
        x = x + self.attn(self.norm1(x), y)[0]
        return x + self.mlp(self.norm2(x))


class OriginalTransformer(nn.Module):
    def __init__(self, dim_self, num_heads, num_layers, dim_ref=None, mlp_ratio=2.0):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        self.layers = nn.ModuleList(
            [OriginalLayer(dim_self, dim_ref, num_heads, mlp_ratio) for _ in range(num_layers)]
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class OriginalTransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = OriginalTransformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length :]


class OriginalMLP(nn.Module):
    """CLIP_prefix_caption's `MLP` (its MLP-mapper setting: sizes (d_clip, d_lm * k // 2, d_lm * k)),
    as written: Linear layers with Tanh between them, in `self.model`."""

    def forward(self, x):
        return self.model(x)

    def __init__(self, sizes, bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)
