"""What a user meets beyond the happy path: vicap's own messages on the console, and every stage on the
device the user chose (`--device`, the recipe's train.device, generate.precision)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import REPO
from vicap import device as vdev
from vicap.cli import app
from vicap.train import train

# --------------------------------------------------------------------------- messages people see


def _manifest_with_a_broken_image(tmp_path: Path, ktvic_dir: Path) -> Path:
    """The tiny KTVIC set as a manifest (prepared through the real command), then one image broken."""
    data = tmp_path / "data"
    shutil.copytree(ktvic_dir, data)
    manifest = tmp_path / "m.jsonl"
    res = CliRunner().invoke(
        app, ["prepare", "ktvic", str(data), "--out", str(manifest), "--val-fraction", "0.2"]
    )
    assert res.exit_code == 0, res.output
    broken = sorted((data / "train-images").glob("*.jpg"))[3]
    broken.write_bytes(broken.read_bytes()[:200])
    return broken, manifest


def test_train_names_unreadable_images_and_prints_validation_loss(tiny_recipe, tmp_path, ktvic_dir) -> None:
    broken, manifest = _manifest_with_a_broken_image(tmp_path, ktvic_dir)
    recipe = tiny_recipe(
        **{
            "data.adapter": "manifest",
            "data.source": str(manifest),
            "data.val_fraction": "0",
            "train.epochs": "2",
        }
    )
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 0, res.output
    assert "warning: 1 of 30 images could not be read and are skipped" in res.stderr
    assert str(broken) in res.stderr  # by name
    assert "left out of training" in res.stderr
    assert re.search(r"epoch 0, step \d+: val loss \d+\.\d+, CIDEr-D\+BLEU-4 \d+\.\d+ \(best", res.stderr)
    assert re.search(r"epoch 1, step \d+: val loss \d+\.\d+", res.stderr)
    assert "training " in res.stderr and "trainable parameters" in res.stderr  # the INFO summary
    # -v adds vicap's DEBUG lines; third-party libraries stay at warnings and above.
    res = CliRunner().invoke(app, ["features", str(path), "-v"])
    assert res.exit_code == 0 and str(broken) in res.stderr


def test_log_lines_are_formatted_for_people(capfd) -> None:
    import logging

    from vicap.log import configure

    configure()
    logging.getLogger("vicap.x").info("encoding 3 images")
    logging.getLogger("data_prep.y").warning("2 captions empty")
    logging.getLogger("open_clip.z").warning("noise")
    logging.getLogger("vicap.x").debug("details")
    err = capfd.readouterr().err
    assert err.splitlines() == ["encoding 3 images", "warning: 2 captions empty"]
    configure(verbose=True)
    logging.getLogger("vicap.x").debug("details")
    logging.getLogger("open_clip.z").warning("a library warning")
    err = capfd.readouterr().err.splitlines()
    assert err == ["debug vicap.x: details", "warning: a library warning"]
    configure()


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    ("setting", "accelerator", "expected"),
    [
        ("auto", None, "cpu"),
        ("", None, "cpu"),
        ("cpu", "cuda", "cpu"),
        ("auto", "cuda", "cuda"),
        ("auto", "mps", "mps"),
        ("cuda:1", "cuda", "cuda:1"),
        ("cuda", None, "--device = 'cuda': this machine has no accelerator; use auto or cpu"),
        ("mps", "cuda", "--device = 'mps': this machine has cuda; use auto or cpu"),
        ("cuda:7", "cuda", "there are 2 cuda device(s) (0..1)"),
        ("gpu", None, "--device = 'gpu': not a device name"),
    ],
)
def test_resolve_device(monkeypatch, setting: str, accelerator, expected: str) -> None:
    monkeypatch.setattr(vdev, "_best_accelerator", lambda: torch.device(accelerator) if accelerator else None)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    if expected in ("cpu", "cuda", "cuda:1", "mps"):
        assert vdev.resolve_device(setting) == torch.device(expected)
    else:
        with pytest.raises(vdev.DeviceError, match=re.escape(expected)):
            vdev.resolve_device(setting)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ktvic_dir, tiny_lm_dir, tiny_clip_dir) -> Path:
    from tests.conftest import tiny_recipe_overrides
    from vicap.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("devrun")
    recipe = load_recipe(
        "demo_vi_synthetic",
        tiny_recipe_overrides(tmp, ktvic_dir, tiny_lm_dir, tiny_clip_dir, **{"train.epochs": "1"}),
    )
    return train(recipe, progress=False)


class _Reached(Exception):
    pass


@pytest.fixture
def fake_gpu(monkeypatch):
    """'auto' resolves to a CUDA device; every place a device is handed to records it. Moving a module
    records the device and (on this CPU machine) leaves the module where it is; the caption model's
    move stops the command, so the test sees how far the device got."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(vdev, "_best_accelerator", lambda: torch.device("cuda"))
    from vicap import features, model
    from vicap.baseline import model as bmodel
    from vicap.encoders import Encoder

    extract = features.extract_features

    def spy_extract(*args, device="cpu", **kw):
        seen.append(("features", str(device)))
        return extract(*args, device="cpu", **kw)

    def spy_encoder_to(self, device):
        seen.append(("encoder", str(device)))
        return self

    def stop_at(name):
        def to(self, *args, **kwargs):
            seen.append((name, str(args[0] if args else kwargs.get("device"))))
            raise _Reached

        return to

    monkeypatch.setattr(features, "extract_features", spy_extract)
    monkeypatch.setattr("vicap.pipeline.extract_features", spy_extract)
    monkeypatch.setattr(Encoder, "to", spy_encoder_to)
    monkeypatch.setattr(model.CaptionModel, "to", stop_at("caption model"), raising=False)
    monkeypatch.setattr(bmodel.CNNLSTM, "to", stop_at("baseline model"), raising=False)
    return seen


def test_the_chosen_device_reaches_features_encoder_and_model(run_dir: Path, fake_gpu) -> None:
    from vicap.captioner import caption_images
    from vicap.evaluate import evaluate_run

    with pytest.raises(_Reached):
        evaluate_run(run_dir, ["train.device=auto"], progress=False)  # the recipe's setting -> the (fake) GPU
    assert fake_gpu == [("features", "cuda"), ("caption model", "cuda")]
    fake_gpu.clear()
    with pytest.raises(_Reached):
        next(caption_images(run_dir, [run_dir / "manifest.jsonl"], device="auto"))
    assert fake_gpu == [("encoder", "cuda"), ("caption model", "cuda")]


def test_baseline_evaluate_uses_the_chosen_device(tmp_path: Path, ktvic_dir: Path, fake_gpu) -> None:
    from tests.test_baseline import DEMO, _tiny_overrides
    from vicap.baseline.recipe import load_baseline_recipe
    from vicap.baseline.train import evaluate_baseline, train_baseline

    run = train_baseline(
        load_baseline_recipe(
            DEMO,
            _tiny_overrides(
                tmp_path, ktvic_dir, **{"train.epochs": "1", "train.device": "cpu", "data.val_fraction": "0"}
            ),
        ),
        progress=False,
    )
    fake_gpu.clear()
    with pytest.raises(_Reached):
        evaluate_baseline(run, progress=False, device="auto")
    assert fake_gpu == [("baseline model", "cuda")]


def test_cpu_and_bf16_through_the_cli(run_dir: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["evaluate", str(run_dir), "--device", "cpu", "--set", "generate.strategy=greedy"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--set",
            "generate.strategy=greedy",
            "--set",
            "generate.precision=bf16",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["precision"] == "bf16" and report["images"] == 6
    res = runner.invoke(app, ["evaluate", str(run_dir), "--device", "cuda"])
    assert res.exit_code == 2 and "--device = 'cuda': this machine has no accelerator" in res.output
    res = runner.invoke(app, ["caption", str(run_dir), str(run_dir), "--device", "gpu"])
    assert res.exit_code == 2 and "not a device name" in res.output


def test_no_device_is_hard_coded_in_the_library() -> None:
    pattern = re.compile(r"""["']cuda\b|\.cuda\(""")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted((REPO / "vicap").rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
