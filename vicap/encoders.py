"""Image encoders: a registry of loaders that turn an `EncoderConfig` into a frozen `Encoder`.

Only the image tower is kept. Its output width (`embed_dim`) is read from the loaded model, and its
identity (model, weights, preprocessing) keys the feature store so features never go stale silently.

An encoder's features are (B, D), the pooled image embedding, or with `encoder.patch_tokens = true`
(B, 1 + T, D): the pooled embedding first, then the T patch tokens passed through the tower's final
norm and projection, so every row lives in the same D-dimensional embedding space.
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
    patch_tokens: int = 0  # T: patch tokens per image after the pooled row; 0 = pooled vector only

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), or (B, 1 + T, embed_dim) with patch tokens; float32."""
        return self.model(pixels).float()

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features."""
        return (1 + self.patch_tokens, self.embed_dim) if self.patch_tokens else (self.embed_dim,)

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
    tower: nn.Module = _OpenClipViTTokens(visual, cfg.model) if cfg.patch_tokens else visual
    identity = {
        "encoder": "open_clip",
        "model": cfg.model if not cfg.model.startswith("local-dir:") else "local-dir",
        "weights": _weights_identity(cfg),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(pp.items())},
        "normalize": cfg.normalize,
    }
    del model  # drop the text tower
    encoder = _finish(cfg, tower, preprocess, embed_dim, identity)
    log.info("encoder %s (%s): embed_dim=%d, store key %s", cfg.model, pretrained, embed_dim, encoder.key)
    return encoder


def _finish(
    cfg: EncoderConfig, tower: nn.Module, preprocess: Callable, embed_dim: int, identity: dict
) -> Encoder:
    """Shared tail of every loader: normalization, patch-token count, the store identity."""
    if cfg.patch_tokens:
        identity = dict(identity, patch_tokens=True)  # its own store; pooled-only keys stay as they were
    model = (_Normalized(tower) if cfg.normalize else tower).requires_grad_(False).eval()
    encoder = Encoder(
        model=model,
        preprocess=preprocess,
        embed_dim=embed_dim,
        identity=identity,
    )
    if cfg.patch_tokens:
        probe = encoder.encode(_blank_pixels(preprocess))
        if probe.dim() != 3 or probe.shape[-1] != embed_dim:
            raise ModelLoadError(
                f"encoder {cfg.model!r}: patch tokens came out as {tuple(probe.shape)}, expected "
                f"(1, 1 + T, {embed_dim})"
            )
        encoder.patch_tokens = probe.shape[1] - 1
    return encoder


def _blank_pixels(preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    return preprocess(Image.new("RGB", (64, 64), (127, 127, 127))).unsqueeze(0)


class _Normalized(nn.Module):
    """L2-normalizes every output row (the pooled vector and each patch token)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.inner(x), dim=-1)


class _OpenClipViTTokens(nn.Module):
    """An open_clip VisionTransformer that returns [pooled, patch tokens] in the embedding space."""

    def __init__(self, visual: nn.Module, name: str) -> None:
        super().__init__()
        if not hasattr(visual, "output_tokens") or getattr(visual, "attn_pool", None) is not None:
            raise ModelLoadError(
                f"encoder.patch_tokens = true needs a ViT image tower; {name!r} has a "
                f"{type(visual).__name__}. Use a ViT model (ViT-B-32, ...) or set encoder.patch_tokens = false."
            )
        visual.output_tokens = True
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled, tokens = self.visual(pixels)
        if getattr(self.visual, "final_ln_after_pool", False):
            tokens = self.visual.ln_post(tokens)  # this variant norms only the pooled vector
        if self.visual.proj is not None:
            tokens = tokens @ self.visual.proj
        return torch.cat([pooled.unsqueeze(1), tokens], dim=1)


# --------------------------------------------------------------------------- Hugging Face CLIP


class _HFClipTower(nn.Module):
    """transformers' CLIPVisionModelWithProjection -> image_embeds, or [image_embeds, patch tokens]."""

    def __init__(self, model: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if not self.tokens:
            return out.image_embeds
        # image_embeds = projection(post_layernorm(CLS)); the same map applied to every position
        # puts the patch tokens in the same space, with the pooled vector as row 0.
        return self.model.visual_projection(self.model.vision_model.post_layernorm(out.last_hidden_state))


@ENCODERS.register(
    "hf_clip", help="transformers CLIPVisionModelWithProjection: hub id or local save_pretrained folder"
)
def load_hf_clip(cfg: EncoderConfig) -> Encoder:
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    folder = Path(cfg.model).expanduser()
    local = folder.is_dir()
    if not local and (cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
        raise ModelLoadError(f"encoder.model = {cfg.model!r}: directory not found")
    if local and not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r}: no preprocessor_config.json in {folder}; save the model's "
            "CLIPImageProcessor beside it (processor.save_pretrained(folder))."
        )
    try:
        processor = AutoImageProcessor.from_pretrained(cfg.model, local_files_only=local)
        model = CLIPVisionModelWithProjection.from_pretrained(
            cfg.model, local_files_only=local, dtype=torch.float32
        )
    except Exception as e:
        raise ModelLoadError(
            f"could not load Hugging Face CLIP vision model {cfg.model!r}: {type(e).__name__}: {e}\n"
            "vicap looked for a local directory of that name, then the Hugging Face cache/hub. Offline, run "
            f"`huggingface-cli download {cfg.model} --local-dir DIR` on a connected machine, copy DIR here "
            "and set encoder.model = DIR."
        ) from e
    model.requires_grad_(False).eval()

    def preprocess(image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    if local:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        weights = ",".join(f"{p.name}:{file_digest(p)[:16]}" for p in files)
    else:
        weights = cfg.model
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(processor.to_dict().items())}
    identity = {
        "encoder": "hf_clip",
        "model": "local-dir" if local else cfg.model,
        "weights": weights,
        "preprocess": json.loads(json.dumps(pp, default=str)),
        "normalize": cfg.normalize,
    }
    embed_dim = int(model.config.projection_dim)
    encoder = _finish(cfg, _HFClipTower(model, cfg.patch_tokens), preprocess, embed_dim, identity)
    log.info("encoder %s (hf_clip): embed_dim=%d, store key %s", cfg.model, embed_dim, encoder.key)
    return encoder


def load_encoder(cfg: EncoderConfig) -> Encoder:
    return ENCODERS.get(cfg.name)(cfg)
