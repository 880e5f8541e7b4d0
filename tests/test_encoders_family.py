"""Encoder families through the real loaders: open_clip ViT / ResNet / ConvNeXt and Hugging Face CLIP
vision models, pooled vectors and patch tokens, and feature stores that keep the tokens."""

from __future__ import annotations

import hashlib
import json
import logging
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


def test_open_clip_resnet_gives_pooled_vectors_and_refuses_tokens(tmp_path: Path, images) -> None:
    vision_cfg = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    folder = _save_open_clip(tmp_path / "rn", vision_cfg)
    encoder = load_encoder(EncoderConfig(model=f"local-dir:{folder}"))
    assert type(encoder.model).__name__ == "ModifiedResNet"
    assert encoder.embed_dim == 24 and encoder.patch_tokens == 0 and encoder.feature_shape == (24,)
    out = encoder.encode(_pixels(encoder, images))
    assert tuple(out.shape) == (3, 24) and torch.isfinite(out).all()
    with pytest.raises(ModelLoadError, match="needs a ViT or timm image tower; .* ModifiedResNet"):
        load_encoder(EncoderConfig(model=f"local-dir:{folder}", patch_tokens=True))


def _timm_tower(name: str, size: int, pool: str, proj: str) -> dict:
    return {
        "image_size": size,
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": proj,
    }


@pytest.mark.parametrize(
    ("case", "vision_cfg", "embed_dim", "tokens"),
    [
        # SigLIP as open_clip builds it (ViT-B-16-SigLIP: a timm ViT, attention-pool head, no projection)
        ("siglip-style ViT", _timm_tower("test_vit", 160, "map", "none"), 64, 100),
        ("ViT, linear projection", _timm_tower("test_vit", 160, "token", "linear"), 24, 100),
        ("ConvNeXt, linear projection", _timm_tower("convnext_atto", 32, "", "linear"), 24, 1),
    ],
)
def test_open_clip_timm_towers_give_projected_tokens(
    tmp_path: Path, images, case: str, vision_cfg: dict, embed_dim: int, tokens: int
) -> None:
    folder = _save_open_clip(tmp_path / "t", vision_cfg, embed_dim)
    pooled = load_encoder(EncoderConfig(model=f"local-dir:{folder}"))
    assert type(pooled.model).__name__ == "TimmModel" and pooled.embed_dim == embed_dim
    enc = load_encoder(EncoderConfig(model=f"local-dir:{folder}", patch_tokens=True))
    assert enc.patch_tokens == tokens and enc.feature_shape == (1 + tokens, embed_dim)
    px = _pixels(pooled, images)
    out = enc.encode(px)
    torch.testing.assert_close(out[:, 0], pooled.encode(px))  # row 0: the tower's own image embedding
    # The tokens are the trunk's final states (after its final norm, prefix tokens dropped) through
    # the same head that projects the pooled vector.
    visual = pooled.model
    states = visual.trunk.forward_features(px)
    states = states[:, visual.trunk.num_prefix_tokens :] if states.dim() == 3 else states.flatten(2).mT
    torch.testing.assert_close(out[:, 1:], visual.head(states), rtol=1e-5, atol=1e-5)


def test_a_local_folder_loads_without_a_random_weights_warning(tiny_clip_dir: Path, caplog) -> None:
    # open_clip builds the model empty and warns it is "initialized randomly"; vicap then reads the
    # folder's weights itself, so the warning would be false (the features tests check the weights).
    with caplog.at_level(logging.WARNING):
        load_encoder(EncoderConfig(model=f"local-dir:{tiny_clip_dir}"))
    assert not [r.getMessage() for r in caplog.records if "randomly" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter goes with the load


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


# --------------------------------------------------------------------------- timm

TIMM_MODELS = ["test_efficientnet", "test_vit"]  # timm's own tiny test models: a CNN and a ViT


def _timm_model(name: str, seed: int = 0, **kw):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, **kw).eval()


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each tiny timm model's full state dict (classifier included, as ImageNet weights come) saved as
    .safetensors and as a plain .pth state dict."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("timm")
    files = {}
    for name in TIMM_MODELS:
        state = {k: v.contiguous() for k, v in _timm_model(name).state_dict().items()}
        files[name, ".safetensors"] = out / f"{name}.safetensors"
        save_file(state, files[name, ".safetensors"])
        files[name, ".pth"] = out / f"{name}.pth"
        torch.save(state, files[name, ".pth"])
    return files


def _timm(name: str, file: Path, **kw) -> EncoderConfig:
    return EncoderConfig(name="timm", model=name, pretrained=str(file), **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_weights_file_gives_the_models_pooled_features(name, suffix, timm_files, images) -> None:
    from timm.data import create_transform, resolve_data_config

    enc = load_encoder(_timm(name, timm_files[name, suffix]))
    # the same weights loaded without vicap: all but the classifier, which num_classes=0 leaves out
    direct = _timm_model(name, num_classes=0)
    full = _timm_model(name).state_dict()
    direct.load_state_dict({k: v for k, v in full.items() if k in direct.state_dict()})
    assert enc.embed_dim == direct.num_features and enc.feature_shape == (direct.num_features,)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    # preprocessing is timm's eval transform for the model's data config
    transform = create_transform(**resolve_data_config({}, model=direct), is_training=False)
    px = _pixels(enc, images)
    torch.testing.assert_close(px, torch.stack([transform(load_image(p)) for p in images]))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(px), direct(px))
    assert enc.identity["model"] == name and enc.identity["preprocess"]["input_size"] == [3, 160, 160]


@pytest.mark.parametrize(("name", "tokens"), [("test_efficientnet", 5 * 5), ("test_vit", 10 * 10)])
def test_timm_patch_tokens(name: str, tokens: int, timm_files, images) -> None:
    pooled = load_encoder(_timm(name, timm_files[name, ".safetensors"]))
    enc = load_encoder(_timm(name, timm_files[name, ".safetensors"], patch_tokens=True))
    assert enc.patch_tokens == tokens and enc.key != pooled.key
    px = _pixels(enc, images)
    out = enc.encode(px)
    assert tuple(out.shape) == (3, 1 + tokens, pooled.embed_dim)
    torch.testing.assert_close(out[:, 0], pooled.encode(px))  # row 0: the pooled features
    with torch.no_grad():
        fmap = pooled.model.forward_features(px)
    # a CNN's last feature map cell by cell; a ViT's patch tokens after its final norm, class token dropped
    expected = fmap.flatten(2).transpose(1, 2) if fmap.dim() == 4 else fmap[:, 1:]
    torch.testing.assert_close(out[:, 1:], expected)


def test_timm_local_dir_and_store_keys(tmp_path: Path, timm_files, images) -> None:
    from timm.models import save_for_hf

    folder = tmp_path / "effnet"
    save_for_hf(_timm_model("test_efficientnet"), folder, safe_serialization=True)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    enc = load_encoder(EncoderConfig(name="timm", model=f"local-dir:{folder}"))
    by_file = load_encoder(_timm("test_efficientnet", timm_files["test_efficientnet", ".safetensors"]))
    px = _pixels(enc, images)
    torch.testing.assert_close(enc.encode(px), by_file.encode(px))
    moved = shutil.copytree(folder, tmp_path / "moved")
    assert load_encoder(EncoderConfig(name="timm", model=str(moved))).key == enc.key
    # the store key follows the weights' content, not the file's name
    copy = shutil.copy(timm_files["test_efficientnet", ".safetensors"], tmp_path / "copy.safetensors")
    assert load_encoder(_timm("test_efficientnet", copy)).key == by_file.key
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file(_timm_model("test_efficientnet", seed=1).state_dict(), other)
    assert load_encoder(_timm("test_efficientnet", other)).key != by_file.key


def _wrong_model(tmp: Path, files) -> EncoderConfig:
    return _timm("test_efficientnet", files["test_vit", ".safetensors"])


def _no_config(tmp: Path, files) -> EncoderConfig:
    (tmp / "bare").mkdir()
    shutil.copy(files["test_vit", ".safetensors"], tmp / "bare" / "model.safetensors")
    return EncoderConfig(name="timm", model=f"local-dir:{tmp / 'bare'}")


@pytest.mark.parametrize(
    ("case", "make", "expected"),
    [
        (
            "another model's weights",
            _wrong_model,
            r"encoder\.pretrained = '.*test_vit\.safetensors': does not fit timm's test_efficientnet "
            r"\(missing conv_stem\.weight, bn1\.weight, bn1\.bias \.\.\. \(86 in all\); unexpected blocks\.0\.",
        ),
        (
            "unknown model",
            lambda t, f: _timm("efficientnet_lite9", t / "x.pth"),
            "'efficientnet_lite9' is not a timm",
        ),
        ("missing file", lambda t, f: _timm("test_vit", t / "nope.pth"), r"nope\.pth'.*file not found"),
        ("folder without config.json", _no_config, r"no config\.json and model\.safetensors .* in .*bare"),
        (
            "hub model",
            lambda t, f: EncoderConfig(name="timm", model="hf-hub:timm/x"),
            "reads local files only",
        ),
    ],
)
def test_timm_errors(case: str, make, expected: str, tmp_path: Path, timm_files) -> None:
    with pytest.raises(ModelLoadError, match=expected):
        load_encoder(make(tmp_path, timm_files))


@pytest.mark.parametrize("name", ["timm", "hf_vision"])
def test_towers_without_text_refuse_text_only_training(name: str, tmp_path: Path, timm_files) -> None:
    cfg = (
        _timm("test_vit", timm_files["test_vit", ".pth"])
        if name == "timm"
        else EncoderConfig(name=name, model=str(tmp_path))
    )
    with pytest.raises(ModelLoadError, match=f"encoder.name = '{name}' has no text tower"):
        load_encoder(cfg, text=True)


@pytest.mark.parametrize("patch_tokens", [False, True])
def test_timm_encoder_trains_and_captions(patch_tokens: bool, tiny_recipe, timm_files, ktvic_dir) -> None:
    from vicap.captioner import caption_images
    from vicap.train import read_log, train

    extra = {
        "encoder.name": "timm",
        "encoder.model": "test_efficientnet",
        "encoder.pretrained": str(timm_files["test_efficientnet", ".pth"]),
        "train.epochs": "1",
    }
    if patch_tokens:
        extra.update({"encoder.patch_tokens": "true", "mapper.type": "attention", "mapper.num_heads": "4"})
    run = train(tiny_recipe(**extra), progress=False)
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert losses and losses[-1] < losses[0]
    image = next((ktvic_dir / "public-test-images").glob("*.jpg"))
    rows = list(caption_images(run, [image], ["generate.strategy=greedy"]))  # the encoder runs live here
    assert isinstance(rows[0]["caption"], str) and rows[0]["caption"]


# --------------------------------------------------------------------------- Hugging Face vision towers


def _save_hf_vision(kind: str, out: Path) -> Path:
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    if kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **small))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **{**small, "mlp_ratio": 2}))
        del model.config.intermediate_size
        processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **small))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_vision_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hfvision")
    return {k: _save_hf_vision(k, base / k) for k in ("siglip", "dinov2", "clip")}


@pytest.mark.parametrize("kind", ["siglip", "dinov2", "clip"])
def test_hf_vision_pooled_and_tokens(kind: str, hf_vision_dirs, images) -> None:
    from transformers import AutoModel

    folder = hf_vision_dirs[kind]
    enc = load_encoder(EncoderConfig(name="hf_vision", model=str(folder)))
    assert enc.embed_dim == 32 and enc.identity["encoder"] == "hf_vision"  # the tower's hidden size
    px = _pixels(enc, images)
    assert tuple(px.shape) == (3, 3, 32, 32)
    direct = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = direct(pixel_values=px)
    torch.testing.assert_close(enc.encode(px), out.pooler_output)
    tok = load_encoder(EncoderConfig(name="hf_vision", model=str(folder), patch_tokens=True))
    rows = tok.encode(px)
    assert tok.patch_tokens == PATCHES and tuple(rows.shape) == (3, 1 + PATCHES, 32) and tok.key != enc.key
    torch.testing.assert_close(rows[:, 0], out.pooler_output)
    states = out.last_hidden_state
    if kind == "clip":  # CLIP's pooled class token passes its final norm; its tokens get it too
        states = getattr(direct, "vision_model", direct).post_layernorm(states)
    torch.testing.assert_close(rows[:, 1:], states[:, -PATCHES:], rtol=1e-5, atol=1e-5)


def test_hf_vision_errors(tmp_path: Path, hf_vision_dirs, tiny_lm_dir: Path) -> None:
    bare = shutil.copytree(hf_vision_dirs["siglip"], tmp_path / "no-processor")
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no preprocessor_config\.json in .*no-processor"):
        load_encoder(EncoderConfig(name="hf_vision", model=str(bare)))
    with pytest.raises(ModelLoadError, match="no-such-model.*directory not found"):
        load_encoder(EncoderConfig(name="hf_vision", model=str(tmp_path / "no-such-model")))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_vision_two_tower_folder_gives_its_image_tower(kind: str, tmp_path: Path, images) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {**small, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    if kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=small, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        model = CLIPModel(CLIPConfig(text_config=small, vision_config=vision, projection_dim=24))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    enc = load_encoder(EncoderConfig(name="hf_vision", model=str(tmp_path), patch_tokens=True))
    px = _pixels(enc, images)
    with torch.no_grad():
        out = model.eval().vision_model(pixel_values=px)
    rows = enc.encode(px)
    assert enc.embed_dim == 32 and tuple(rows.shape) == (3, 1 + PATCHES, 32)  # hidden size, not projected
    torch.testing.assert_close(rows[:, 0], out.pooler_output)
