"""Image encoders: a registry of loaders that turn an `EncoderConfig` into a frozen `Encoder`.

The image tower is always kept; the text tower only when asked for (`load_encoder(cfg, text=True)`),
to embed sentences into the same space for text-only training (CapDec; see vicap.features). Its output width (`embed_dim`) is read from the loaded model, and its
identity (model, weights, preprocessing) keys the feature store so features never go stale silently.

An encoder's features are (B, D), the pooled image embedding, or with `encoder.patch_tokens = true`
(B, 1 + T, D): the pooled embedding first, then the T patch tokens passed through the tower's final
norm and projection, so every row lives in the same D-dimensional embedding space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vicap.errors import ModelLoadError
from vicap.recipe import EncoderConfig
from vicap.registry import Registry
from vicap.resolve import WEIGHT_SUFFIXES, ModelRef, resolve

log = logging.getLogger(__name__)


@dataclass
class Encoder:
    """A frozen image tower plus the preprocessing that belongs to it."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) tensor
    embed_dim: int
    identity: dict[str, Any] = field(default_factory=dict)
    patch_tokens: int = 0  # T: patch tokens per image after the pooled row; 0 = pooled vector only
    # The text tower (only when loaded with text=True): tokenizer output -> (B, embed_dim), normalized
    # as the image rows are (encoder.normalize), and the tokenizer that belongs to it.
    text_model: nn.Module | None = None
    tokenize: Callable[[list[str]], Any] | None = None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), or (B, 1 + T, embed_dim) with patch tokens; float32."""
        return self.model(pixels).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Sentences -> (B, embed_dim) float32 in the image embedding space (the text tower)."""
        if self.text_model is None or self.tokenize is None:
            raise ModelLoadError(
                "this encoder was loaded without its text tower (load_encoder(cfg, text=True))"
            )
        device = next(self.text_model.parameters()).device
        batch = self.tokenize(texts)
        batch = batch.to(device) if torch.is_tensor(batch) else {k: v.to(device) for k, v in batch.items()}
        return self.text_model(batch).float()

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features."""
        return (1 + self.patch_tokens, self.embed_dim) if self.patch_tokens else (self.embed_dim,)

    def to(self, device: torch.device | str) -> Encoder:
        self.model.to(device)
        if self.text_model is not None:
            self.text_model.to(device)
        return self

    @property
    def key(self) -> str:
        """Short stable hash of the identity, used to name the feature store."""
        blob = json.dumps(self.identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# A loader takes the config, and `text=True` when the text tower is wanted too.
ENCODERS: Registry[Callable[..., Encoder]] = Registry("encoder")


def load_weights_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file; never runs code the file carries. `where` starts every
    error message: the setting that named the file, and the file.

    `.safetensors` is read by safetensors. `.pt` / `.pth` / `.bin` go through
    `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers and
    refuses any other import (a payload that would call `os.system`, a TorchScript archive). A training
    checkpoint's `state_dict` entry and DistributedDataParallel's `module.` prefix are unwrapped, as
    open_clip does.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{where}: file not found")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{where}: expected a {', '.join(WEIGHT_SUFFIXES)} weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, a header cut short...
            raise ModelLoadError(
                f"{where}: not a readable safetensors file ({type(e).__name__}: {e})"
            ) from None
    if torch.__version__ < "2.6":  # CVE-2025-32434: weights_only could be bypassed before 2.6
        raise ModelLoadError(
            f"{where}: reading .pt/.pth/.bin files safely needs torch >= 2.6 (this is {torch.__version__}); "
            "upgrade torch or convert the file to safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refused(path, where, e) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(
            f"{where}: expected a state dict (names -> tensors), found {type(state).__name__}"
        )
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise ModelLoadError(f"{where}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _unsafe_globals(path: Path) -> list[str]:
    """What a torch.save file asks to import beyond tensors, read statically (nothing runs)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip-format file, a TorchScript archive...
        return []


def _refused(path: Path, where: str, e: Exception) -> ModelLoadError:
    """The error for a .pt/.pth/.bin file that torch.load(weights_only=True) would not read."""
    unsafe = _unsafe_globals(path)
    text = str(e)
    if unsafe:
        why = f"it asks to import {', '.join(unsafe)}"
    elif "TorchScript" in text:
        why = "a TorchScript archive, which holds code"
    elif m := re.search(r"GLOBAL ([\w.]+)", text):  # torch's message names the first global it refused
        why = f"it asks to import {m.group(1)}"
    elif isinstance(e, pickle.UnpicklingError):
        why = "pickled content that weights_only does not allow"
    else:  # a file cut short, not a torch.save file at all...
        why = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    return ModelLoadError(
        f"{where}: refused, not a plain file of tensors ({why}). vicap reads .pt/.pth/.bin files only "
        "with torch.load(weights_only=True), which runs no code from the file; save just the state dict "
        "(torch.save(model.state_dict(), path)) or convert it to safetensors"
    )


def hf_load_error(ref: ModelRef, what: str, e: Exception) -> ModelLoadError:
    """A transformers loader's failure on `ref` as one message. transformers reads a local folder's .bin
    weights with torch.load(weights_only=True); its refusal names the file."""
    if isinstance(e, pickle.UnpicklingError) and ref.local:
        bins = sorted(ref.path.glob("*.bin"))
        named = [p for p in bins if _unsafe_globals(p)] or bins
        if named:
            return _refused(named[0], f"{ref.key} = {ref.name!r} (weights file {str(named[0])!r})", e)
    return ref.load_error(what, e)


@ENCODERS.register(
    "open_clip", help="open_clip image tower: model name + pretrained tag, local-dir:PATH or hf-hub:ID"
)
def load_open_clip(cfg: EncoderConfig, *, text: bool = False) -> Encoder:
    import open_clip  # after vicap's torchvision guard (vicap/__init__.py)

    ref = resolve(cfg.model, "encoder.model", "open_clip", cfg.pretrained)
    # a file the user handed in: vicap reads it, not open_clip
    weights_file, where = ref.weights_file, f"encoder.pretrained = {cfg.pretrained!r}"
    if ref.local:
        folder = ref.path
        if not (folder / "open_clip_config.json").is_file():
            raise ref.error(f"no open_clip_config.json in {folder}")
        found = open_clip.factory._find_checkpoint_in_dir(folder)  # the file open_clip itself would pick
        # open_clip only warns when the folder has no weights and returns a randomly initialised
        # model, whose features would be silently meaningless.
        if found is None:
            raise ModelLoadError(
                f"encoder.model = {cfg.model!r}: no weights file (*.safetensors, *.bin, *.pth) in {folder}; "
                "expected open_clip_model.safetensors beside open_clip_config.json."
            )
        weights_file = Path(found)
        where = f"encoder.model = {cfg.model!r} (weights file {str(weights_file)!r})"
    pretrained = (cfg.pretrained or None) if ref.kind == "open_clip" and not weights_file else None
    # With a user's file, open_clip builds the model without any weights (nor a text tower's base
    # weights from the hub); the file is read below by load_weights_file.
    no_weights = {"load_weights": False, "pretrained_text": False} if weights_file else {}
    try:
        with _quiet_root_log("No pretrained weights loaded") if weights_file else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                ref.target, pretrained=pretrained, **no_weights
            )
    except Exception as e:  # network errors, missing files, bad tags all land here
        raise ref.load_error("open_clip model", e) from e
    if weights_file is not None:
        state = load_weights_file(weights_file, where)
        _load_image_tower(model, state, where)
        if text:
            _load_text_tower(model, state, where)
        del state
    visual = model.visual
    visual.requires_grad_(False).eval()
    embed_dim = int(getattr(model, "embed_dim", 0) or getattr(visual, "output_dim", 0))
    if not embed_dim:  # fall back to asking the model
        size = visual.image_size if hasattr(visual, "image_size") else 224
        size = size if isinstance(size, (tuple, list)) else (size, size)
        with torch.no_grad():
            embed_dim = visual(torch.zeros(1, 3, *size)).shape[-1]
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    tower: nn.Module = _open_clip_tokens(visual, cfg.model) if cfg.patch_tokens else visual
    identity = {
        "encoder": "open_clip",
        **ref.identity(),  # model and weights
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(pp.items())},
        "normalize": cfg.normalize,
    }
    encoder = _finish(cfg, tower, preprocess, embed_dim, identity)
    if text:
        _attach_text(encoder, cfg, _OpenClipText(model), _open_clip_tokenizer(ref, model, cfg))
    del model  # without text=True, the text tower goes
    log.info("encoder %s (%s): embed_dim=%d, store key %s", cfg.model, pretrained, embed_dim, encoder.key)
    return encoder


@contextlib.contextmanager
def _quiet_root_log(start: str):
    """Drops the root logger's records that begin with `start` for the duration: open_clip warns
    "No pretrained weights loaded ... initialized randomly" on the root logger when vicap builds the
    model empty to read the user's weights file itself, which it does right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(start)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_image_tower(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A CLIP state dict's image tower into `model.visual`, with the key handling of open_clip's
    `load_checkpoint` that concerns it (vicap keeps only the image tower)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed

    state = convert_state_dict(model, state)  # third-party layouts (Apple MobileCLIP) -> open_clip's
    resize_pos_embed(state, model)  # a position grid saved for another image size
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ModelLoadError(f"{where}: no image-tower tensors (visual.*); not an open_clip CLIP state dict")
    try:
        model.visual.load_state_dict(visual)
    except RuntimeError as e:
        raise ModelLoadError(f"{where}: does not fit the model's image tower ({str(e)[:300]})") from None


def _load_text_tower(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Everything of a CLIP state dict but the image tower (token embedding, transformer, projection,
    or a custom text tower's `text.*`) into `model`; a state dict without them is an error."""
    from open_clip.convert import convert_state_dict

    state = convert_state_dict(model, state)
    wanted = [
        k
        for k in model.state_dict()
        if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")
    ]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ModelLoadError(
            f"{where}: no text-tower tensors ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            "missing); text-only training needs a CLIP state dict with both towers"
        )
    try:
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    except RuntimeError as e:
        raise ModelLoadError(f"{where}: does not fit the model's text tower ({str(e)[:300]})") from None


class _OpenClipText(nn.Module):
    """An open_clip CLIP's text tower: token ids -> text embeddings (the model's own encode_text)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids)


def _open_clip_tokenizer(ref: ModelRef, model: nn.Module, cfg: EncoderConfig) -> Callable:
    """The model's own tokenizer (open_clip.get_tokenizer: a local-dir's text_cfg.hf_tokenizer_name
    means the tokenizer files saved in that folder), checked against the text tower's vocabulary."""
    import open_clip

    try:
        tokenizer = open_clip.get_tokenizer(ref.target)
        probe = tokenizer(["a b c"])
    except Exception as e:
        raise ref.load_error("open_clip text tokenizer", e) from e
    vocab = getattr(getattr(model, "token_embedding", None), "num_embeddings", None)
    if vocab is not None and int(probe.max()) >= vocab:
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r}: its tokenizer ({type(tokenizer).__name__}) gives token ids up to "
            f"{int(probe.max())}, but the text tower has {vocab}; save the tower's own tokenizer in the "
            "folder and name it in open_clip_config.json (text_cfg.hf_tokenizer_name)"
        )
    return tokenizer


def _attach_text(encoder: Encoder, cfg: EncoderConfig, tower: nn.Module, tokenize: Callable) -> None:
    """Give `encoder` its frozen text tower, normalized as its image rows are."""
    if cfg.patch_tokens:
        raise ModelLoadError(
            "encoder.patch_tokens = true: text embeddings have no patch tokens; text-only training needs "
            "encoder.patch_tokens = false"
        )
    encoder.text_model = (_Normalized(tower) if cfg.normalize else tower).requires_grad_(False).eval()
    encoder.tokenize = tokenize


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


def _gray_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (127, 127, 127))


def _blank_pixels(preprocess: Callable) -> torch.Tensor:
    return preprocess(_gray_image()).unsqueeze(0)


class _Normalized(nn.Module):
    """L2-normalizes every output row (the pooled vector and each patch token)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.inner(x), dim=-1)


def _open_clip_tokens(visual: nn.Module, name: str) -> nn.Module:
    """An open_clip image tower that returns [pooled, patch tokens] in the embedding space: its own
    VisionTransformer, or a timm trunk (SigLIP's ViTs, ConvNeXt) behind open_clip's projection head."""
    if type(visual).__name__ == "TimmModel" and not hasattr(visual.head, "pool"):
        return _OpenClipTimmTokens(visual)
    if not hasattr(visual, "output_tokens") or getattr(visual, "attn_pool", None) is not None:
        raise ModelLoadError(
            f"encoder.patch_tokens = true needs a ViT or timm image tower; {name!r} has a "
            f"{type(visual).__name__} with its own attention pooling. Use a ViT model (ViT-B-32, "
            "ViT-B-16-SigLIP, ...) or set encoder.patch_tokens = false."
        )
    return _OpenClipViTTokens(visual)


class _OpenClipTimmTokens(nn.Module):
    """open_clip's TimmModel: the trunk's [pooled, tokens] (as for encoder.name = "timm"), each row then
    through open_clip's head (a linear or MLP projection, or nothing, as SigLIP has), so row 0 is
    exactly the tower's image embedding and the tokens are projected the same way."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = _TimmTokens(visual.trunk), visual.head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels))


class _OpenClipViTTokens(nn.Module):
    """An open_clip VisionTransformer that returns [pooled, patch tokens] in the embedding space."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
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


def _check_processor_file(cfg: EncoderConfig, ref, what: str) -> None:
    """A local transformers folder must hold its image processor: without it there is no preprocessing."""
    if ref.local and not (ref.path / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r}: no preprocessor_config.json in {ref.path}; save the model's "
            f"{what} beside it (processor.save_pretrained(folder))."
        )


def _processor_identity(name: str, processor, ref, cfg: EncoderConfig) -> tuple[Callable, dict]:
    """A transformers image processor as an encoder's `preprocess`, and the store identity it gives
    (encoder, model and weights, every processor setting, normalize)."""

    def preprocess(image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(processor.to_dict().items())}
    identity = {
        "encoder": name,
        **ref.identity(),  # model and weights
        "preprocess": json.loads(json.dumps(pp, default=str)),
        "normalize": cfg.normalize,
    }
    return preprocess, identity


@ENCODERS.register(
    "hf_clip", help="transformers CLIPVisionModelWithProjection: hub id or local save_pretrained folder"
)
def load_hf_clip(cfg: EncoderConfig, *, text: bool = False) -> Encoder:
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    ref = resolve(cfg.model, "encoder.model")
    _check_processor_file(cfg, ref, "CLIPImageProcessor")
    try:
        processor = AutoImageProcessor.from_pretrained(ref.target, local_files_only=ref.local)
        model = CLIPVisionModelWithProjection.from_pretrained(
            ref.target, local_files_only=ref.local, dtype=torch.float32
        )
    except Exception as e:
        raise hf_load_error(ref, "Hugging Face CLIP vision model", e) from e
    model.requires_grad_(False).eval()

    preprocess, identity = _processor_identity("hf_clip", processor, ref, cfg)
    embed_dim = int(model.config.projection_dim)
    encoder = _finish(cfg, _HFClipTower(model, cfg.patch_tokens), preprocess, embed_dim, identity)
    if text:
        _attach_text(encoder, cfg, *_hf_clip_text(ref))
    log.info("encoder %s (hf_clip): embed_dim=%d, store key %s", cfg.model, embed_dim, encoder.key)
    return encoder


class _HFClipText(nn.Module):
    """transformers' CLIPTextModelWithProjection -> text_embeds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).text_embeds


def _hf_clip_text(ref: ModelRef) -> tuple[nn.Module, Callable]:
    """The text tower and tokenizer saved with a Hugging Face CLIP (hub id or folder)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.target, local_files_only=ref.local)
        model = CLIPTextModelWithProjection.from_pretrained(
            ref.target, local_files_only=ref.local, dtype=torch.float32
        )
    except Exception as e:
        raise hf_load_error(ref, "Hugging Face CLIP text model and tokenizer", e) from e
    longest = int(model.config.max_position_embeddings)

    def tokenize(texts: list[str]):
        out = tokenizer(texts, padding=True, truncation=True, max_length=longest, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    return _HFClipText(model), tokenize


# --------------------------------------------------------------------------- timm


@ENCODERS.register(
    "timm",
    help="any timm model: a model name + encoder.pretrained = a local .safetensors/.pth file, or "
    "local-dir:PATH (timm's save_for_hf folder)",
)
def load_timm(cfg: EncoderConfig, *, text: bool = False) -> Encoder:
    """A timm model without its classifier (num_classes=0), its weights from a local file only, and its
    preprocessing from timm's own data config (eval transform)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    _no_text_tower(cfg, text)
    ref = resolve(cfg.model, "encoder.model", "timm", cfg.pretrained)
    if not ref.local and ref.kind != "timm":  # hf-hub:: timm would download; vicap reads local files
        raise ref.error("the timm encoder reads local files only")
    if ref.local:
        from timm.models._hub import load_model_config_from_path

        weights_file = next(
            (ref.path / n for n in ("model.safetensors", "pytorch_model.bin") if (ref.path / n).is_file()),
            None,
        )
        if not (ref.path / "config.json").is_file() or weights_file is None:
            raise ref.error(f"no config.json and model.safetensors (or pytorch_model.bin) in {ref.path}")
        where = f"encoder.model = {cfg.model!r} (weights file {str(weights_file)!r})"
        try:
            pretrained_cfg, arch, model_args = load_model_config_from_path(ref.path)
            # the folder's num_classes is its classifier's; vicap drops the classifier
            model_args = {**model_args, "num_classes": 0}
            model = timm.create_model(arch, pretrained_cfg=pretrained_cfg, **model_args)
        except Exception as e:
            raise ref.load_error("timm model", e) from e
    else:
        weights_file, arch = ref.weights_file, ref.target
        where = f"encoder.pretrained = {cfg.pretrained!r}"
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    _load_timm_weights(model, load_weights_file(weights_file, where), where)
    model.requires_grad_(False).eval()
    data_config = resolve_data_config({}, model=model)
    preprocess = create_transform(**data_config, is_training=False)
    identity = {
        "encoder": "timm",
        **ref.identity(),  # model name and weights file, or the folder's files
        "preprocess": json.loads(json.dumps(data_config, default=str)),
        "normalize": cfg.normalize,
    }
    tower: nn.Module = _TimmTokens(model) if cfg.patch_tokens else model
    with torch.no_grad():  # timm's num_features is the feature map's width; a head may change it
        embed_dim = int(model(_blank_pixels(preprocess)).shape[-1])
    encoder = _finish(cfg, tower, preprocess, embed_dim, identity)
    log.info("encoder %s (timm %s): embed_dim=%d, store key %s", cfg.model, arch, embed_dim, encoder.key)
    return encoder


def _load_timm_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """`state` into `model`, all of it: only the classifier head, which num_classes=0 removed, may be
    extra (timm's own loader drops it the same way); any other missing or unexpected key is an error."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in heads))}
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")

        parts = [
            f"missing {first(missing)}" if missing else "",
            f"unexpected {first(unexpected)}" if unexpected else "",
        ]
        raise ModelLoadError(
            f"{where}: does not fit timm's {model.pretrained_cfg.get('architecture', type(model).__name__)} "
            f"({'; '.join(p for p in parts if p)}). vicap reads weights in timm's own key layout "
            "(model.state_dict() of the timm model); convert other layouts first"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # same names, other shapes: another variant of the model
        raise ModelLoadError(f"{where}: does not fit the timm model ({str(e)[:300]})") from None


class _TimmTokens(nn.Module):
    """A timm model -> [pooled, tokens]: the pooled features the model gives without its classifier,
    then its final feature map's positions (forward_features): a ViT's patch tokens after its final
    norm, without its class/register tokens; a CNN's last feature map, one token per cell (H*W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixels)
        pooled = self.model.forward_head(features, pre_logits=True)
        width = pooled.shape[-1]
        if features.dim() == 3:  # (B, prefix + T, C)
            tokens = features[:, getattr(self.model, "num_prefix_tokens", 0) :]
        elif features.dim() == 4 and features.shape[1] == width:  # (B, C, H, W)
            tokens = features.flatten(2).transpose(1, 2)
        elif features.dim() == 4:  # (B, H, W, C), as some timm models keep it
            tokens = features.flatten(1, 2)
        else:
            tokens = features
        if tokens.dim() != 3 or tokens.shape[-1] != width:
            name = self.model.pretrained_cfg.get("architecture", type(self.model).__name__)
            raise ModelLoadError(
                f"encoder.patch_tokens = true: timm's {name} gives a feature map of shape "
                f"{tuple(features.shape)} that is not {width} wide like its pooled features; "
                "set encoder.patch_tokens = false"
            )
        return torch.cat([pooled.unsqueeze(1), tokens], dim=1)


def _no_text_tower(cfg: EncoderConfig, text: bool) -> None:
    if text:
        raise ModelLoadError(
            f"encoder.name = {cfg.name!r} has no text tower; text-only training needs a CLIP encoder "
            "(open_clip or hf_clip)"
        )


# --------------------------------------------------------------------------- Hugging Face vision towers


class _HFVisionTower(nn.Module):
    """A transformers image tower -> pooler_output, or [pooler_output, patch tokens]."""

    def __init__(self, model: nn.Module, tokens: bool, patch_size: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.model, self.tokens, self.patch_size, self.norm = model, tokens, patch_size, norm

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if not self.tokens:
            return out.pooler_output
        states = self.norm(out.last_hidden_state) if self.norm is not None else out.last_hidden_state
        grid = (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)
        # the positions before the patch grid are class / register tokens
        return torch.cat([out.pooler_output.unsqueeze(1), states[:, states.shape[1] - grid :]], dim=1)


@ENCODERS.register(
    "hf_vision",
    help="transformers image tower (SigLIP, DINOv2, CLIP vision) by AutoModel: hub id or local "
    "save_pretrained folder; its pooled output",
)
def load_hf_vision(cfg: EncoderConfig, *, text: bool = False) -> Encoder:
    """A transformers vision model's pooled output (pooler_output: SigLIP's attention-pool head, DINOv2's
    and CLIP's normed class token), in the tower's hidden size, without any projection into a text space
    (for CLIP's projected embeddings use hf_clip). A folder of a two-tower model (SiglipModel,
    CLIPModel) gives its image tower."""
    from transformers import AutoImageProcessor, AutoModel

    _no_text_tower(cfg, text)
    ref = resolve(cfg.model, "encoder.model")
    _check_processor_file(cfg, ref, "image processor")
    try:
        processor = AutoImageProcessor.from_pretrained(ref.target, local_files_only=ref.local)
        model = AutoModel.from_pretrained(ref.target, local_files_only=ref.local, dtype=torch.float32)
    except Exception as e:
        raise hf_load_error(ref, "Hugging Face vision model", e) from e
    vision_cfg = getattr(model.config, "vision_config", model.config)
    if hasattr(model, "text_model"):  # two towers (SiglipModel, CLIPModel): keep the image one
        model = model.vision_model
    model.requires_grad_(False).eval()
    # CLIP's last_hidden_state precedes the final norm its pooled class token passes through; SigLIP's
    # and DINOv2's are normed already.
    clip = vision_cfg.model_type in ("clip_vision_model", "clip")
    norm = getattr(getattr(model, "vision_model", model), "post_layernorm", None) if clip else None
    extra = sorted(set(processor(images=_gray_image(), return_tensors="pt")) - {"pixel_values"})
    if extra:  # SigLIP2's NaFlex variable patches, ...: vicap stores one (3, H, W) image per row
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r}: its image processor gives {', '.join(extra)} beside pixel_values; "
            "vicap's hf_vision encoder takes fixed-size images only (SigLIP2: use a FixRes checkpoint)"
        )

    preprocess, identity = _processor_identity("hf_vision", processor, ref, cfg)
    tower = _HFVisionTower(model, cfg.patch_tokens, int(vision_cfg.patch_size), norm)
    try:
        with torch.no_grad():
            pooled = tower.model(pixel_values=_blank_pixels(preprocess)).pooler_output
    except Exception as e:  # a text model, a processor that does not fit the model, ...
        raise ModelLoadError(
            f"encoder.model = {cfg.model!r}: {type(model).__name__} does not encode its processor's images "
            f"({type(e).__name__}: {str(e)[:200]}); hf_vision takes image models (SigLIP, DINOv2, CLIP vision)"
        ) from None
    if pooled is None:  # SigLIP built with vision_use_head = false
        raise ModelLoadError(f"encoder.model = {cfg.model!r}: {type(model).__name__} gives no pooled output")
    embed_dim = int(pooled.shape[-1])
    encoder = _finish(cfg, tower, preprocess, embed_dim, identity)
    log.info("encoder %s (hf_vision): embed_dim=%d, store key %s", cfg.model, embed_dim, encoder.key)
    return encoder


def load_encoder(cfg: EncoderConfig, *, text: bool = False) -> Encoder:
    """The recipe's encoder; with `text=True` also its text tower (vicap.features embeds sentences)."""
    return ENCODERS.get(cfg.name)(cfg, text=True) if text else ENCODERS.get(cfg.name)(cfg)


# --------------------------------------------------------------------------- writing the local-dir format


def clip_preprocess_cfg(size: int) -> dict:
    """open_clip's preprocessing record for a square input of `size` pixels, with OpenAI's mean and std."""
    import open_clip

    return {
        "size": [size, size],
        "mode": "RGB",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_open_clip(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out: Path) -> Path:
    """Write an open_clip model as a `local-dir:` folder: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return out
