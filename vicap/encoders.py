"""Image encoders: a registry of loaders that turn an `EncoderConfig` into a frozen `Encoder`.

Only the image tower is kept. Its output width (`embed_dim`) is read from the loaded model, and its
identity (model, weights, preprocessing) keys the feature store so features never go stale silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vicap.recipe import EncoderConfig
from vicap.registry import Registry

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was looked for and how to provide it."""


@dataclass
class Encoder:
    """A frozen image tower plus the preprocessing that belongs to it."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) tensor
    embed_dim: int
    identity: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) float32."""
        return self.model(pixels).float()

    def to(self, device: torch.device | str) -> Encoder:
        self.model.to(device)
        return self

    @property
    def key(self) -> str:
        """Short stable hash of the identity, used to name the feature store."""
        blob = json.dumps(self.identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


ENCODERS: Registry[Callable[[EncoderConfig], Encoder]] = Registry("encoder")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_identity(cfg: EncoderConfig) -> str:
    """The weights' identity: a pretrained tag as is, a local file or folder by its content hash."""
    if cfg.model.startswith("local-dir:"):
        folder = Path(cfg.model[len("local-dir:") :])
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".json"))
        return ",".join(f"{p.name}:{file_digest(p)[:16]}" for p in files)
    if cfg.pretrained and Path(cfg.pretrained).is_file():
        return f"file:{file_digest(Path(cfg.pretrained))[:16]}"
    return cfg.pretrained


@ENCODERS.register(
    "open_clip", help="open_clip image tower: model name + pretrained tag, local-dir:PATH or hf-hub:ID"
)
def load_open_clip(cfg: EncoderConfig) -> Encoder:
    import open_clip  # after vicap's torchvision guard (vicap/__init__.py)

    if cfg.model.startswith("local-dir:"):
        folder = Path(cfg.model[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"encoder.model = {cfg.model!r}: no open_clip_config.json in {folder}. A local-dir encoder "
                "is a folder holding open_clip_config.json and open_clip_model.safetensors "
                "(the layout open_clip's push_to_hf_hub writes)."
            )
        # open_clip only warns when the folder has no weights and returns a randomly initialised
        # model, whose features would be silently meaningless.
        if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir()):
            raise ModelLoadError(
                f"encoder.model = {cfg.model!r}: no weights file (*.safetensors, *.bin, *.pth) in {folder}; "
                "expected open_clip_model.safetensors beside open_clip_config.json."
            )
    elif cfg.pretrained and cfg.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(cfg.pretrained).is_file():
            raise ModelLoadError(f"encoder.pretrained = {cfg.pretrained!r}: file not found")
    elif not cfg.model.startswith("hf-hub:") and cfg.model not in open_clip.list_models():
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r} is not an open_clip model; known include "
            f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())"
        )
    pretrained = None if cfg.model.startswith(("local-dir:", "hf-hub:")) else (cfg.pretrained or None)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained)
    except Exception as e:  # network errors, missing files, bad tags all land here
        raise ModelLoadError(
            f"could not load open_clip model {cfg.model!r} (pretrained={pretrained!r}): {type(e).__name__}: {e}\n"
            "vicap looked in the local open_clip / Hugging Face cache. Offline, download the weights on a "
            "connected machine (e.g. `python -c \"import open_clip; open_clip.create_model('ViT-B-32', "
            "pretrained='openai')\"`) and copy the cache, or set encoder.pretrained to a local .safetensors "
            "file or encoder.model to 'local-dir:PATH'."
        ) from e
    visual = model.visual
    visual.requires_grad_(False).eval()
    embed_dim = int(getattr(model, "embed_dim", 0) or getattr(visual, "output_dim", 0))
    if not embed_dim:  # fall back to asking the model
        size = visual.image_size if hasattr(visual, "image_size") else 224
        size = size if isinstance(size, (tuple, list)) else (size, size)
        with torch.no_grad():
            embed_dim = visual(torch.zeros(1, 3, *size)).shape[-1]
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    identity = {
        "encoder": "open_clip",
        "model": cfg.model if not cfg.model.startswith("local-dir:") else "local-dir",
        "weights": _weights_identity(cfg),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(pp.items())},
        "normalize": cfg.normalize,
    }
    del model  # drop the text tower
    encoder = Encoder(
        model=_Normalized(visual) if cfg.normalize else visual,
        preprocess=preprocess,
        embed_dim=embed_dim,
        identity=identity,
    )
    log.info("encoder %s (%s): embed_dim=%d, store key %s", cfg.model, pretrained, embed_dim, encoder.key)
    return encoder


class _Normalized(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.inner(x), dim=-1)


def load_encoder(cfg: EncoderConfig) -> Encoder:
    return ENCODERS.get(cfg.name)(cfg)
