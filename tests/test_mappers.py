"""Mappers: shapes, gradients, parameter counts, and ClipCap's transformer against a faithful copy.

`OriginalTransformerMapper` (bench/clipcap_original.py, the copy the training benchmark uses too)
re-implements CLIP_prefix_caption's transformer mapper the way the original computes it (einsum
attention, no biases on queries and keys/values, ReLU MLP with ratio 2, 8 heads). vicap's `transformer`
mapper must have the same parameters under the same names and compute the same function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.clipcap_original import OriginalTransformerMapper
from vicap.mappers import MAPPERS, build_mapper
from vicap.recipe import MapperConfig


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _transformer_closed_form(d_clip: int, d: int, k: int, clip_length: int, layers: int) -> int:
    # per layer: 2 LayerNorms (4d), queries d^2, keys/values 2d^2, projection d^2 + d,
    # MLP d*2d + 2d + 2d*d + d  ->  8d^2 + 8d; plus the input projection and the constants.
    return layers * (8 * d * d + 8 * d) + d_clip * clip_length * d + clip_length * d + k * d


# --------------------------------------------------------------------------- every mapper


def _input(mapper: nn.Module, batch: int, dim: int, tokens: int = 4) -> torch.Tensor:
    return torch.randn(batch, 1 + tokens, dim) if mapper.uses_tokens else torch.randn(batch, dim)


@pytest.mark.parametrize("name", MAPPERS.names())
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_every_mapper_shapes_and_gradients(name: str, dropout: float) -> None:
    torch.manual_seed(0)
    cfg = MapperConfig(type=name, prefix_length=5, clip_length=3, num_layers=2, num_heads=4, dropout=dropout)
    mapper = build_mapper(cfg, 24, 32)
    x = _input(mapper, 3, 24)
    out = mapper(x)
    assert tuple(out.shape) == (3, 5, 32) and out.dtype == torch.float32
    out.pow(2).mean().backward()
    for n, p in mapper.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    mapper.eval()
    with torch.no_grad():  # eval is deterministic (dropout off) and rows do not mix across the batch
        a = mapper(x)
        torch.testing.assert_close(mapper(x), a)
        torch.testing.assert_close(mapper(x[1:2]), a[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_pooled_mappers_take_row_zero_of_token_features(name: str) -> None:
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig(type=name, prefix_length=2, num_layers=1, num_heads=2), 8, 6).eval()
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(mapper(tokens), mapper(tokens[:, 0]))


def test_attention_mapper_needs_tokens_and_reads_them() -> None:
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig(type="attention", prefix_length=3, num_heads=2), 8, 6).eval()
    with pytest.raises(ValueError, match=r"needs patch tokens.*encoder\.patch_tokens = true"):
        mapper(torch.randn(2, 8))
    x = torch.randn(2, 5, 8)
    y = x.clone()
    y[:, 3] = torch.randn(2, 8)  # change one patch token only
    with torch.no_grad():
        assert not torch.allclose(mapper(x), mapper(y))
        # any number of tokens works: the mapper has no per-token parameters
        assert tuple(mapper(torch.randn(2, 17, 8)).shape) == (2, 3, 6)


def test_attention_mapper_layout_and_size() -> None:
    d_in, d, k, layers = 24, 32, 4, 2
    mapper = build_mapper(MapperConfig(type="attention", prefix_length=k, num_heads=4), d_in, d)
    assert len(mapper.transformer.layers) == 2 * layers  # default 2 blocks of cross + self attention
    cross, self_ = mapper.transformer.layers[0].attn, mapper.transformer.layers[1].attn
    assert cross.to_keys_values.in_features == d_in and self_.to_keys_values.in_features == d
    per_cross = 2 * 2 * d + d * d + 2 * d * d_in + d * d + d + (d * 2 * d + 2 * d + 2 * d * d + d)
    per_self = 8 * d * d + 8 * d
    assert _count(mapper) == k * d + 2 * d_in + layers * (per_cross + per_self)


# --------------------------------------------------------------------------- ClipCap's transformer


@pytest.mark.parametrize(
    ("d_clip", "d", "k", "clip_length", "layers"),
    [(24, 32, 4, 3, 2), (16, 64, 10, 10, 8), (40, 16, 2, 5, 1)],
)
def test_transformer_matches_the_original(d_clip: int, d: int, k: int, clip_length: int, layers: int) -> None:
    torch.manual_seed(0)
    original = OriginalTransformerMapper(d_clip, d, k, clip_length, num_layers=layers)
    cfg = MapperConfig(type="transformer", prefix_length=k, clip_length=clip_length, num_layers=layers)
    ours = build_mapper(cfg, d_clip, d)
    # Same parameter count, same names and shapes: the original's weights load as they are.
    assert _count(ours) == _count(original) == _transformer_closed_form(d_clip, d, k, clip_length, layers)
    theirs = original.state_dict()
    assert {k_: tuple(v.shape) for k_, v in ours.state_dict().items()} == {
        k_: tuple(v.shape) for k_, v in theirs.items()
    }
    ours.load_state_dict(theirs)
    x = torch.randn(3, d_clip)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-5, atol=1e-5)


def test_transformer_at_clipcap_size() -> None:
    # ClipCap's COCO transformer setting: ViT-B/32 (512) -> GPT-2 (768), prefix 40, clip length 40, 8 layers.
    cfg = MapperConfig(type="transformer", prefix_length=40, clip_length=40, num_layers=8)
    with torch.device("meta"):  # sizes only; no memory
        ours = build_mapper(cfg, 512, 768)
        original = OriginalTransformerMapper(512, 768, 40, 40, num_layers=8)
    assert _count(ours) == _count(original) == _transformer_closed_form(512, 768, 40, 40, 8) == 53_587_968
    assert MapperConfig().num_heads == 8 and MapperConfig().mlp_ratio == 2.0  # ClipCap's 8 heads, ratio 2


def test_transformer_mapper_rejects_heads_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="num_heads = 5 must divide the LM width 32"):
        build_mapper(MapperConfig(type="transformer", num_heads=5), 24, 32)


@pytest.mark.parametrize("mode", ["self", "cross", "alternating"])
def test_transformer_last_rows_equal_full_run_sliced(mode: str) -> None:
    # The transformer mapper's last layer computes only the prefix rows; values and gradients must be
    # those of running every row and slicing, whether that layer self-attends or cross-attends.
    from vicap.mappers import Transformer

    torch.manual_seed(0)
    net = Transformer(32, 4, 3, dim_ref=None if mode == "self" else 24, enc_dec=mode == "alternating")
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = None if mode == "self" else torch.randn(2, 5, 24)
    full = net(x, y)[:, -4:]
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    part = net(x, y, last=4)
    (g_part,) = torch.autograd.grad(part.square().sum(), x)
    assert part.shape == (2, 4, 32)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_part, g_full, rtol=1e-5, atol=1e-6)
