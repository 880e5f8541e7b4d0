"""No weights file a user hands vicap can run code: every place that takes one refuses a pickle
whose payload would execute (the payload here touches a marker file), and plain state dicts in
.pth / .pt / .bin files still load through torch.load(weights_only=True)."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CLIP_CFG
from vicap.baseline.model import build_cnn
from vicap.baseline.recipe import CNNConfig
from vicap.decoders import load_decoder
from vicap.encoders import (
    ModelLoadError,
    clip_preprocess_cfg,
    load_encoder,
    load_weights_file,
    save_open_clip,
)
from vicap.recipe import DecoderConfig, EncoderConfig

RESNET18_CACHE_NAME = "resnet18-f37072fd.pth"  # torchvision's file name: <model>-<sha256 prefix>.pth
TINY_OPEN_CLIP = "vicap-test-tiny"  # TINY_CLIP_CFG registered as an open_clip model name


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious weights file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _payload(marker: Path) -> dict:
    return {"weight": torch.zeros(2), "extra": _RunsCode(f"touch {shlex.quote(str(marker))}")}


def plant(path: Path, marker: Path, fmt: str = "zip") -> Path:
    """Write a weights file at `path` whose unpickling touches `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":  # torch.save's format since torch 1.6
        torch.save(_payload(marker), path)
    elif fmt == "legacy":  # torch.save's older, non-zip format
        torch.save(_payload(marker), path, _use_new_zipfile_serialization=False)
    elif fmt == "raw":  # a bare pickle, no torch.save framing
        path.write_bytes(pickle.dumps({"extra": _payload(marker)["extra"]}, protocol=2))
    elif fmt == "torchscript":  # torch.load would hand this to torch.jit.load
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


@pytest.fixture
def tiny_open_clip(monkeypatch) -> str:
    """TINY_CLIP_CFG under a model name, as if it were one of open_clip's built-in configs."""
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_OPEN_CLIP, dict(TINY_CLIP_CFG))
    return TINY_OPEN_CLIP


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """torch's hub cache moved to a temp dir."""
    hub = tmp_path / "torch-hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def _open_clip_folder(folder: Path, weights: Path | None = None) -> Path:
    """An open_clip local-dir folder: open_clip_config.json, plus `weights` when given."""
    import open_clip

    save_open_clip(open_clip.CLIP(**TINY_CLIP_CFG), TINY_CLIP_CFG, clip_preprocess_cfg(32), folder)
    (folder / "open_clip_model.safetensors").unlink()
    if weights is not None:
        shutil.move(weights, folder / weights.name)
    return folder


def _hf_folder_without_weights(src: Path, out: Path) -> Path:
    """A copy of a Hugging Face model folder without its safetensors weights."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def _tiny_hf_clip_folder(out: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    ).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


# Each place a user can hand vicap a weights file: plant a poisoned file there, then load.
def _baseline_weights(tmp, marker, **_):
    build_cnn(CNNConfig(cnn="resnet18", weights=str(plant(tmp / "x" / "evil.pth", marker))))


def _imagenet_hub_cache(tmp, marker, hub_dir, **_):
    plant(hub_dir / "checkpoints" / RESNET18_CACHE_NAME, marker)
    build_cnn(CNNConfig(cnn="resnet18", weights="imagenet"))


def _imagenet_download(tmp, marker, monkeypatch, **_):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VICAP_OFFLINE", raising=False)
    evil = plant(tmp / "served.pth", marker)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **kw: shutil.copy(evil, dst))
    build_cnn(CNNConfig(cnn="resnet18", weights="imagenet"))


def _open_clip_pretrained(tmp, marker, tiny_open_clip, **_):
    evil = plant(tmp / "x" / "evil.pt", marker)
    load_encoder(EncoderConfig(model=tiny_open_clip, pretrained=str(evil)))


def _open_clip_local_dir(tmp, marker, **_):
    folder = _open_clip_folder(tmp / "clip", plant(tmp / "open_clip_pytorch_model.bin", marker))
    load_encoder(EncoderConfig(model=f"local-dir:{folder}"))


def _hf_lm_folder(tmp, marker, tiny_lm_dir, **_):
    folder = _hf_folder_without_weights(tiny_lm_dir, tmp / "lm")
    plant(folder / "pytorch_model.bin", marker)
    load_decoder(DecoderConfig(model=str(folder)))


def _hf_clip_folder(tmp, marker, **_):
    folder = _tiny_hf_clip_folder(tmp / "hf-clip")
    plant(folder / "pytorch_model.bin", marker)
    load_encoder(EncoderConfig(name="hf_clip", model=str(folder)))


def _timm_pretrained(tmp, marker, **_):
    load_encoder(
        EncoderConfig(name="timm", model="test_vit", pretrained=str(plant(tmp / "evil.pth", marker)))
    )


def _timm_local_dir(tmp, marker, **_):
    import timm
    from timm.models import save_for_hf

    folder = tmp / "timm"
    save_for_hf(timm.create_model("test_vit"), folder, safe_serialization=True)
    (folder / "model.safetensors").unlink()
    plant(folder / "pytorch_model.bin", marker)
    load_encoder(EncoderConfig(name="timm", model=f"local-dir:{folder}"))


PLACES = [
    # (case, load, the file the error names, the setting it names)
    ("baseline encoder.weights = evil.pth", _baseline_weights, "evil.pth", "encoder.weights"),
    ("baseline 'imagenet', poisoned hub cache", _imagenet_hub_cache, RESNET18_CACHE_NAME, "encoder.weights"),
    ("baseline 'imagenet', poisoned download", _imagenet_download, RESNET18_CACHE_NAME, "encoder.weights"),
    ("open_clip encoder.pretrained = evil.pt", _open_clip_pretrained, "evil.pt", "encoder.pretrained"),
    ("open_clip local-dir with a .bin", _open_clip_local_dir, "open_clip_pytorch_model.bin", "encoder.model"),
    ("Hugging Face LM folder", _hf_lm_folder, "pytorch_model.bin", "decoder.model"),
    ("Hugging Face CLIP folder", _hf_clip_folder, "pytorch_model.bin", "encoder.model"),
    ("timm encoder.pretrained = evil.pth", _timm_pretrained, "evil.pth", "encoder.pretrained"),
    ("timm local-dir with a .bin", _timm_local_dir, "pytorch_model.bin", "encoder.model"),
]


@pytest.mark.parametrize(("case", "load", "file", "setting"), PLACES, ids=[p[0] for p in PLACES])
def test_code_in_a_weights_file_never_runs(
    case, load, file, setting, tmp_path, monkeypatch, hub_dir, tiny_open_clip, tiny_lm_dir
) -> None:
    marker = tmp_path / "code-ran"
    with pytest.raises(ModelLoadError) as err:
        load(
            tmp_path,
            marker,
            hub_dir=hub_dir,
            monkeypatch=monkeypatch,
            tiny_open_clip=tiny_open_clip,
            tiny_lm_dir=tiny_lm_dir,
        )
    assert file in str(err.value) and setting in str(err.value), str(err.value)
    assert "refused" in str(err.value) and "it asks to import posix.system" in str(err.value), str(err.value)
    assert not marker.exists(), f"{case}: the file's code ran"


def test_the_planted_payload_runs_when_unpickled(tmp_path) -> None:
    """The poisoned files above are live: unpickled without weights_only, they run their code."""
    marker = tmp_path / "code-ran"
    torch.load(plant(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("zip", "it asks to import posix.system"),
        ("legacy", "it asks to import posix.system"),
        ("raw", "it asks to import posix.system"),
        ("torchscript", "a TorchScript archive"),
    ],
)
def test_every_pickle_format_is_refused(fmt, expected, tmp_path) -> None:
    marker = tmp_path / "code-ran"
    path = plant(tmp_path / "evil.pt", marker, fmt)
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_weights_file(path, f"encoder.pretrained = {str(path)!r}")
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("case", "content", "expected"),
    [
        ("not a dict", [torch.zeros(1)], "expected a state dict"),
        ("an empty dict", {}, "expected a state dict"),
        ("a non-tensor entry", {"w": torch.zeros(1), "step": 3}, "entry 'step' is a int"),
    ],
)
def test_a_pth_that_is_no_state_dict(case, content, expected, tmp_path) -> None:
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(ModelLoadError, match=expected):
        load_weights_file(path, f"encoder.weights = {str(path)!r}")


# --------------------------------------------------------------------------- plain state dicts load


def _resnet18_state() -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def _assert_cnn_has(body: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = body.state_dict()
    assert torch.equal(got["0.weight"], state["conv1.weight"])  # body = resnet without avgpool/fc
    assert torch.equal(got["7.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_baseline_loads_a_local_state_dict(suffix, tmp_path) -> None:
    from safetensors.torch import save_file

    state = _resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    body, channels = build_cnn(CNNConfig(cnn="resnet18", weights=str(path)))
    assert channels == 512
    _assert_cnn_has(body, state)


def test_baseline_imagenet_from_the_hub_cache(hub_dir) -> None:
    state = _resnet18_state()
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, hub_dir / "checkpoints" / RESNET18_CACHE_NAME)
    body, _ = build_cnn(CNNConfig(cnn="resnet18", weights="imagenet"))
    _assert_cnn_has(body, state)


def test_baseline_imagenet_download_is_hash_checked(hub_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VICAP_OFFLINE", raising=False)
    state = _resnet18_state()
    torch.save(state, tmp_path / "served.pth")
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst), hash_prefix))
        shutil.copy(tmp_path / "served.pth", dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    body, _ = build_cnn(CNNConfig(cnn="resnet18", weights="imagenet"))
    _assert_cnn_has(body, state)
    assert calls == [
        (
            f"https://download.pytorch.org/models/{RESNET18_CACHE_NAME}",
            hub_dir / "checkpoints" / RESNET18_CACHE_NAME,
            "f37072fd",
        )
    ]


def test_baseline_imagenet_offline_and_not_cached(hub_dir, monkeypatch) -> None:
    monkeypatch.setenv("VICAP_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded offline"))
    with pytest.raises(ModelLoadError, match="offline mode is on.*copy resnet18-f37072fd.pth to"):
        build_cnn(CNNConfig(cnn="resnet18", weights="imagenet"))


def test_every_imagenet_file_name_carries_its_hash() -> None:
    """Downloads are checked against the sha256 prefix in the file name: every CNN has one."""
    import torchvision

    from vicap.baseline.model import _HASH_IN_NAME
    from vicap.baseline.recipe import CNNS

    for cnn in CNNS:
        if cnn not in ("tiny", "timm"):  # no ImageNet download: random, or the timm file the recipe names
            url = torchvision.models.get_model_weights(cnn).DEFAULT.url
            assert _HASH_IN_NAME.search(url), url


def _tiny_clip_model() -> torch.nn.Module:
    import open_clip

    torch.manual_seed(1)
    return open_clip.CLIP(**TINY_CLIP_CFG)


@pytest.mark.parametrize(
    ("case", "wrap"),
    [
        ("state dict", lambda s: s),
        (
            "training checkpoint, DDP prefix",
            lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        ),
    ],
)
def test_open_clip_pretrained_pth_loads(case, wrap, tiny_open_clip, tmp_path) -> None:
    model = _tiny_clip_model()
    path = tmp_path / "clip.pt"
    torch.save(wrap(model.state_dict()), path)
    encoder = load_encoder(EncoderConfig(model=tiny_open_clip, pretrained=str(path)))
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.allclose(encoder.encode(pixels), model.visual.eval()(pixels))
    assert encoder.identity["weights"].startswith("file:")


def test_open_clip_local_dir_with_a_bin_loads(tmp_path) -> None:
    model = _tiny_clip_model()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    folder = _open_clip_folder(tmp_path / "clip", tmp_path / "open_clip_pytorch_model.bin")
    encoder = load_encoder(EncoderConfig(model=f"local-dir:{folder}"))
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.allclose(encoder.encode(pixels), model.visual.eval()(pixels))


@pytest.mark.parametrize(
    ("case", "state", "expected"),
    [
        ("no image tower", {"text_projection": torch.zeros(32, 24)}, "no image-tower tensors"),
        ("another model's tower", {"visual.proj": torch.zeros(3, 3)}, "does not fit the model's image tower"),
    ],
)
def test_open_clip_pretrained_of_another_model(case, state, expected, tiny_open_clip, tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=expected):
        load_encoder(EncoderConfig(model=tiny_open_clip, pretrained=str(path)))
