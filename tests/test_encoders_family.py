"""Encoder families through the real loaders: open_clip ViT / ResNet / ConvNeXt and Hugging Face CLIP
vision models, pooled vectors and patch tokens, and feature stores that keep the tokens."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CLIP_CFG
from vicap.encoders import clip_preprocess_cfg, load_encoder, save_open_clip
from vicap.errors import ModelLoadError
from vicap.features import extract_features
from vicap.images import load_image
from vicap.recipe import EncoderConfig

TEXT_CFG = TINY_CLIP_CFG["text_cfg"]
PATCHES = (32 // 8) ** 2  # tiny ViT: 32 px images, 8 px patches


def _save_open_clip(folder: Path, vision_cfg: dict, embed_dim: int = 24) -> Path:
    import open_clip

    cfg = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG}
    torch.manual_seed(0)
    return save_open_clip(open_clip.CLIP(**cfg), cfg, clip_preprocess_cfg(32), folder)


@pytest.fixture(scope="module")
def images(ktvic_dir: Path) -> list[Path]:
    return sorted((ktvic_dir / "train-images").glob("*.jpg"))[:3]


def _pixels(encoder, images: list[Path]) -> torch.Tensor:
    return torch.stack([encoder.preprocess(load_image(p)) for p in images])


# --------------------------------------------------------------------------- open_clip families


@pytest.mark.parametrize(
    ("family", "vision_cfg"),
    [
        ("ModifiedResNet", {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}),
        (
            "TimmModel",  # ConvNeXt through timm, as open_clip's convnext_* configs build it
            {
                "image_size": 32,
                "timm_model_name": "convnext_atto",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
            },
        ),
    ],
)
def test_open_clip_conv_towers_give_pooled_vectors(
    tmp_path: Path, images, family: str, vision_cfg: dict
) -> None:
    folder = _save_open_clip(tmp_path / family, vision_cfg)
    encoder = load_encoder(EncoderConfig(model=f"local-dir:{folder}"))
    assert type(encoder.model).__name__ == family
    assert encoder.embed_dim == 24 and encoder.patch_tokens == 0 and encoder.feature_shape == (24,)
    out = encoder.encode(_pixels(encoder, images))
    assert tuple(out.shape) == (3, 24) and torch.isfinite(out).all()
    with pytest.raises(ModelLoadError, match=f"patch_tokens = true needs a ViT image tower; .* {family}"):
        load_encoder(EncoderConfig(model=f"local-dir:{folder}", patch_tokens=True))


def test_open_clip_vit_patch_tokens(tiny_clip_dir: Path, images) -> None:
    pooled = load_encoder(EncoderConfig(model=f"local-dir:{tiny_clip_dir}"))
    tokens = load_encoder(EncoderConfig(model=f"local-dir:{tiny_clip_dir}", patch_tokens=True))
    assert tokens.patch_tokens == PATCHES and tokens.feature_shape == (1 + PATCHES, 24)
    assert tokens.key != pooled.key and tokens.identity["patch_tokens"] is True
    assert "patch_tokens" not in pooled.identity  # pooled-only stores keep the keys they always had
    px = _pixels(pooled, images)
    out = tokens.encode(px)
    assert tuple(out.shape) == (3, 1 + PATCHES, 24)
    torch.testing.assert_close(out[:, 0], pooled.encode(px))  # row 0 is the pooled embedding
    # The tokens are the tower's final token states through its final norm and projection.
    visual = pooled.model
    x = visual.transformer(visual._embeds(px))
    torch.testing.assert_close(out[:, 1:], visual.ln_post(x)[:, 1:] @ visual.proj, rtol=1e-5, atol=1e-5)
    normed = load_encoder(
        EncoderConfig(model=f"local-dir:{tiny_clip_dir}", patch_tokens=True, normalize=True)
    )
    torch.testing.assert_close(normed.encode(px).norm(dim=-1), torch.ones(3, 1 + PATCHES))


# --------------------------------------------------------------------------- Hugging Face CLIP


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIPVisionModelWithProjection and its CLIPImageProcessor, saved with save_pretrained."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out = tmp_path_factory.mktemp("hfclip") / "tiny-hf-clip"
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_hf_clip_pooled_and_tokens(hf_clip_dir: Path, images) -> None:
    from transformers import CLIPVisionModelWithProjection

    enc = load_encoder(EncoderConfig(name="hf_clip", model=str(hf_clip_dir)))
    assert enc.embed_dim == 24 and enc.identity["encoder"] == "hf_clip"
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    px = _pixels(enc, images)
    assert tuple(px.shape) == (3, 3, 32, 32)
    ref = CLIPVisionModelWithProjection.from_pretrained(hf_clip_dir).eval()
    with torch.no_grad():
        expected = ref(pixel_values=px).image_embeds
    torch.testing.assert_close(enc.encode(px), expected)

    tok = load_encoder(EncoderConfig(name="hf_clip", model=str(hf_clip_dir), patch_tokens=True))
    out = tok.encode(px)
    assert tok.patch_tokens == PATCHES and tuple(out.shape) == (3, 1 + PATCHES, 24)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert tok.key != enc.key
    assert load_encoder(EncoderConfig(name="hf_clip", model=str(hf_clip_dir))).key == enc.key


def test_hf_clip_errors(tmp_path: Path, hf_clip_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-clip.*directory not found"):
        load_encoder(EncoderConfig(name="hf_clip", model=str(tmp_path / "no-such-clip")))
    bare = shutil.copytree(hf_clip_dir, tmp_path / "no-processor")
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no preprocessor_config\.json in .*no-processor"):
        load_encoder(EncoderConfig(name="hf_clip", model=str(bare)))


# --------------------------------------------------------------------------- store keys


def _old_identity(encoder, folder: Path, suffixes: tuple[str, ...]) -> dict:
    """The identity vicap gave a local-folder encoder before vicap.resolve existed: the folder's files with
    these suffixes, each by name and the first 16 hex digits of its sha256; the rest as the model has it."""
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
    weights = ",".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for p in files)
    return {**encoder.identity, "model": "local-dir", "weights": weights}


@pytest.mark.parametrize("kind", ["open_clip", "hf_clip"])
def test_store_key_is_unchanged(kind: str, tmp_path: Path, tiny_clip_dir: Path, hf_clip_dir: Path) -> None:
    folder = tiny_clip_dir if kind == "open_clip" else hf_clip_dir
    model = f"local-dir:{folder}" if kind == "open_clip" else str(folder)
    encoder = load_encoder(EncoderConfig(name=kind, model=model))
    suffixes = (
        (".safetensors", ".bin", ".pth", ".json")
        if kind == "open_clip"
        else (".safetensors", ".bin", ".json")
    )
    old = _old_identity(encoder, folder, suffixes)
    assert set(old) == {"encoder", "model", "weights", "preprocess", "normalize"}
    assert encoder.identity == old
    assert encoder.key == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert old["weights"].count(":") == len(list(folder.glob("*.*")))  # every file of the folder counted


@pytest.mark.parametrize(
    ("kind", "written"),
    [
        ("open_clip", "{folder}"),  # a plain path means the same folder as local-dir:PATH
        ("open_clip", "local-dir:~/{name}"),
        ("hf_clip", "~/{name}"),
        ("hf_clip", "local-dir:{folder}"),
    ],
)
def test_every_way_of_naming_a_folder_gives_its_store(
    kind: str, written: str, tmp_path: Path, monkeypatch, tiny_clip_dir: Path, hf_clip_dir: Path
) -> None:
    folder = tiny_clip_dir if kind == "open_clip" else hf_clip_dir
    monkeypatch.setenv("HOME", str(folder.parent))
    canonical = f"local-dir:{folder}" if kind == "open_clip" else str(folder)
    expected = load_encoder(EncoderConfig(name=kind, model=canonical)).key
    model = written.format(folder=folder, name=folder.name)
    assert load_encoder(EncoderConfig(name=kind, model=model)).key == expected


# --------------------------------------------------------------------------- stores with tokens


@pytest.mark.parametrize("kind", ["open_clip", "hf_clip"])
def test_store_keeps_patch_tokens(kind: str, tmp_path: Path, images, tiny_clip_dir, hf_clip_dir) -> None:
    model = f"local-dir:{tiny_clip_dir}" if kind == "open_clip" else str(hf_clip_dir)
    enc = load_encoder(EncoderConfig(name=kind, model=model, patch_tokens=True))
    store = extract_features(enc, images, tmp_path / "store", progress=False)
    assert store.has_tokens and store.dim == 24
    assert store.features.shape == (3, 1 + PATCHES, 24) and isinstance(store.features._arrays[0], np.memmap)
    torch.testing.assert_close(store.get(images[1:2])[0], enc.encode(_pixels(enc, images[1:2]))[0])
    meta = json.loads((store.root / "meta.json").read_text())
    assert meta["row_shape"] == [1 + PATCHES, 24] and meta["identity"]["patch_tokens"] is True
    empty = extract_features(enc, [], tmp_path / "other", progress=False)
    assert empty.features.shape == (0, 1 + PATCHES, 24)
