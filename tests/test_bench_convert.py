"""bench/convert_efficientnet_lite.py: EfficientNet-PyTorch's EfficientNet-Lite keys -> timm's, on a random
state dict with the real file's key names (the real file is not needed)."""

from __future__ import annotations

import pytest
import torch

from bench.convert_efficientnet_lite import convert, convert_keys

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _lite0_source_keys() -> list[str]:
    """The key names of efficientnet-lite0-57934424.pth: a stem, 16 flatly numbered blocks (the first
    without an expansion conv), a head and the classifier `_fc`."""
    keys = ["_conv_stem.weight", *(f"_bn0.{t}" for t in BN)]
    for i in range(16):
        layers = [] if i == 0 else [("_expand_conv", "_bn0")]
        layers += [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        for conv, bn in layers:
            keys += [f"_blocks.{i}.{conv}.weight", *(f"_blocks.{i}.{bn}.{t}" for t in BN)]
    return [*keys, "_conv_head.weight", *(f"_bn1.{t}" for t in BN), "_fc.weight", "_fc.bias"]


@pytest.fixture(scope="module")
def lite0():
    import timm

    return timm.create_model("efficientnet_lite0")


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.1._bn1.weight", "blocks.1.0.bn2.weight"),
        ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
        ("_blocks.3._bn0.weight", "blocks.2.0.bn1.weight"),
        ("_blocks.15._bn2.bias", "blocks.6.0.bn3.bias"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.running_mean", "bn2.running_mean"),
        ("_fc.weight", "classifier.weight"),
    ],
)
def test_key_mapping(source: str, target: str, lite0) -> None:
    assert convert_keys(_lite0_source_keys(), list(lite0.state_dict()))[source] == target


def test_a_random_state_dict_converts_into_timms_model(lite0) -> None:
    target = lite0.state_dict()
    mapping = convert_keys(_lite0_source_keys(), list(target))
    assert sorted(mapping.values()) == sorted(target)  # every timm key, once
    torch.manual_seed(0)
    source = {k: torch.randn(target[t].shape) if target[t].dim() else target[t] for k, t in mapping.items()}
    out = convert(source, lite0)
    lite0.load_state_dict(out)  # strict: every key and shape
    torch.testing.assert_close(lite0.state_dict()["blocks.6.0.bn3.bias"], source["_blocks.15._bn2.bias"])


@pytest.mark.parametrize(
    ("case", "edit", "expected"),
    [
        ("unknown key", lambda s: {**s, "_swish.x": torch.zeros(1)}, "_swish.x: not a key"),
        (
            "a block too many",
            lambda s: {**s, "_blocks.16._bn2.bias": torch.zeros(1)},
            "_blocks.16._bn2.bias: no",
        ),
        (
            "a key missing",
            lambda s: {k: v for k, v in s.items() if k != "_fc.bias"},
            "missing.*classifier.bias",
        ),
        ("wrong shape", lambda s: {**s, "_fc.bias": torch.zeros(10)}, r"classifier.bias: shape \(10,\)"),
    ],
)
def test_bad_source_is_an_error(case: str, edit, expected: str, lite0) -> None:
    target = lite0.state_dict()
    mapping = convert_keys(_lite0_source_keys(), list(target))
    source = {k: torch.zeros(target[t].shape) for k, t in mapping.items()}
    with pytest.raises(ValueError, match=expected):
        convert(edit(source), lite0)
