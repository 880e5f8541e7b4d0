"""The Captioner object (files, PIL images, tensors; the same captions as `vicap caption`), its decoding
keywords, and `vicap export`: a folder that loads offline in a fresh process, with or without the
original model folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import REPO, tiny_recipe_overrides
from vicap import Captioner
from vicap.cli import app
from vicap.errors import ModelLoadError, RecipeError, UsageError
from vicap.export import EXPORT_FILE, export_run, model_references
from vicap.recipe import load_recipe
from vicap.train import train

GREEDY = {"strategy": "greedy"}


def _train(tmp: Path, ktvic: Path, lm: Path, clip: Path, **extra: str) -> Path:
    overrides = tiny_recipe_overrides(tmp, ktvic, lm, clip, **{"train.epochs": "1", **extra})
    return train(load_recipe("demo_vi_synthetic", overrides), progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ktvic_dir: Path, tiny_lm_dir: Path, tiny_clip_dir: Path) -> Path:
    return _train(tmp_path_factory.mktemp("captioner-run"), ktvic_dir, tiny_lm_dir, tiny_clip_dir)


@pytest.fixture(scope="module")
def images(ktvic_dir: Path) -> list[Path]:
    return sorted((ktvic_dir / "public-test-images").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def captioner(run_dir: Path) -> Captioner:
    return Captioner.from_run(run_dir)


def _cli_captions(run: Path, images: list[Path], *sets: str) -> list[dict]:
    args = ["caption", str(run), *map(str, images), "--workers", "0"]
    for s in ("generate.strategy=greedy", *sets):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _texts(rows: list[dict]) -> list[str]:
    return [r["caption"] for r in rows]


def test_paths_pil_images_and_tensors_caption_as_vicap_caption_does(
    captioner: Captioner, run_dir: Path, images: list[Path]
) -> None:
    cli = _cli_captions(run_dir, images)
    assert len(cli) == 3 and all(r["caption"] for r in cli)
    by_path = captioner(images, **GREEDY)
    assert by_path == cli  # image names, captions and scores
    pil = [Image.open(p).convert("RGB") for p in images]
    by_pil = captioner(pil, **GREEDY)
    assert _texts(by_pil) == _texts(cli)
    assert [r["image"] for r in by_pil] == ["<image 0>", "<image 1>", "<image 2>"]
    by_tensor = captioner([captioner.preprocess(im) for im in pil], **GREEDY)
    assert _texts(by_tensor) == _texts(cli) and by_tensor[0]["image"] == "<tensor 0>"
    batch = torch.stack([captioner.preprocess(im) for im in pil])  # one (B, 3, H, W) tensor: B images
    assert captioner(batch, **GREEDY) == by_tensor
    with pytest.raises(UsageError, match=r"<tensor 0>: a tensor of shape \(1, 3, 3"):
        captioner([batch[:1, :, :3]], **GREEDY)
    # one input on its own, mixed inputs in one call
    assert _texts(captioner(images[0], **GREEDY)) == _texts(cli[:1])
    assert _texts(captioner([pil[0], images[1]], **GREEDY)) == _texts(cli[:2])


def test_decoding_keywords_match_the_cli_overrides(captioner: Captioner, run_dir: Path, images) -> None:
    cli = _cli_captions(
        run_dir, images, "generate.strategy=beam", "generate.beam_size=3", "generate.n_best=2"
    )
    rows = captioner(images, strategy="beam", beam_size=3, n_best=2)
    assert rows == cli and len(rows[0]["n_best"]) == 2


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("unknown key", {"beam_sise": 3}, r"unknown key 'generate.beam_sise' \(did you mean 'beam_size'\?\)"),
        ("wrong type", {"beam_size": "3"}, r"generate.beam_size: expected an integer, got '3'"),
        ("bad value", {"beam_size": 0}, r"generate.beam_size = 0: must be >= 1"),
        ("unknown strategy", {"strategy": "beams"}, r"generate.strategy = 'beams'.*did you mean 'beam'"),
        ("key of another strategy", {"strategy": "greedy", "top_p": 0.5}, r"generate.top_p = 0.5: only"),
        ("n-best with greedy", {"strategy": "greedy", "n_best": 2}, r"generate.n_best = 2: greedy"),
    ],
)
def test_bad_decoding_keywords_name_the_key(captioner: Captioner, images, case, kwargs, message) -> None:
    with pytest.raises(RecipeError, match=message):
        captioner(images[:1], **kwargs)


def test_a_bad_file_is_a_row_or_with_strict_an_error(captioner: Captioner, images, tmp_path: Path) -> None:
    from vicap.images import ImageError

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    rows = captioner([images[0], bad], **GREEDY)
    assert "caption" in rows[0] and rows[1]["image"] == str(bad) and str(bad) in rows[1]["error"]
    with pytest.raises(ImageError, match="broken.jpg"):
        captioner([bad], strict=True, **GREEDY)


# --------------------------------------------------------------------------- export

_LOAD = """
import json, sys
from vicap import Captioner
cap = Captioner.from_pretrained(sys.argv[1])
print(json.dumps([r["caption"] for r in cap(sys.argv[2:], strategy="greedy")]))
"""


def _captions_in_fresh_process(folder: Path, images: list[Path], cwd: Path) -> list[str]:
    """Load the export in a new Python process with no network (HF_HUB_OFFLINE) from another folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(folder), *map(str, images)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_loads_in_a_fresh_offline_process_with_the_same_captions(
    captioner: Captioner, run_dir: Path, images, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", EXPORT_FILE, "model.safetensors", "recipe.toml"]
    assert not list(tmp_path.glob(".*partial"))
    card = (out / "README.md").read_text()
    assert "Captioner.from_pretrained" in card and "decoder.model" in card
    expected = _texts(captioner(images, **GREEDY))
    assert _captions_in_fresh_process(out, images, cwd=tmp_path) == expected
    # `vicap caption` reads an export as it reads a run
    assert _texts(_cli_captions(out, images)) == expected


def test_export_model_card_has_the_runs_evaluation_table(run_dir: Path, tmp_path: Path) -> None:
    from vicap.evaluate import evaluate_run

    evaluate_run(run_dir, progress=False)
    out = export_run(run_dir, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "| system | BLEU-1" in card and "| vicap |" in card and "most frequent train caption" in card


def test_export_with_copied_models_loads_after_the_originals_are_gone(
    tmp_path: Path, ktvic_dir: Path, tiny_lm_dir: Path, tiny_clip_dir: Path, images
) -> None:
    models = tmp_path / "models"
    lm, clip = models / "lm", models / "clip"
    shutil.copytree(tiny_lm_dir, lm)
    shutil.copytree(tiny_clip_dir, clip)
    lora = {"decoder.tuning": "lora", "decoder.lora_rank": "4", "train.lr": "1e-2"}
    run = _train(tmp_path, ktvic_dir, lm, clip, **lora)
    expected = _texts(Captioner.from_run(run)(images, **GREEDY))
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run), str(out), "--copy-models"])
    assert result.exit_code == 0, result.output
    assert (out / "models" / "decoder" / "config.json").is_file()
    assert (out / "models" / "encoder" / "open_clip_config.json").is_file()
    plain = export_run(run, tmp_path / "plain")  # references only
    shutil.rmtree(models)
    moved = tmp_path / "elsewhere" / "export"
    moved.parent.mkdir()
    out.rename(moved)
    assert _captions_in_fresh_process(moved, images, cwd=tmp_path / "elsewhere") == expected
    # the export without copies names what is missing
    with pytest.raises(ModelLoadError, match=str(clip)):
        Captioner.from_pretrained(plain)
    result = CliRunner().invoke(app, ["caption", str(plain), str(images[0])])
    assert result.exit_code == 2 and str(clip) in result.output and "Traceback" not in result.output
    assert "--copy-models" in result.output


def _no_checkpoints(tmp: Path, run_dir: Path) -> Path:
    (tmp / "empty-run").mkdir()
    shutil.copy(run_dir / "recipe.toml", tmp / "empty-run" / "recipe.toml")
    return tmp / "empty-run"


def _full_folder(tmp: Path, run_dir: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tmp / "out"


def _a_file(tmp: Path, run_dir: Path) -> Path:
    (tmp / "out.txt").write_text("mine")
    return tmp / "out.txt"


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("missing run", lambda t, r: [t / "nope", t / "out"], "nope: not a vicap run directory"),
        ("no checkpoint", lambda t, r: [_no_checkpoints(t, r), t / "out"], "empty-run: no checkpoints yet"),
        ("out not empty", lambda t, r: [r, _full_folder(t, r)], "out: already exists and is not an empty"),
        ("out is a file", lambda t, r: [r, _a_file(t, r)], "out.txt: already exists"),
        ("no such step", lambda t, r: [r, t / "out", "--checkpoint", "7777"], "no checkpoint at step 7777"),
        ("bad checkpoint", lambda t, r: [r, t / "out", "--checkpoint", "worst"], "checkpoint 'worst'"),
    ],
)
def test_bad_export_input_is_one_error_line(run_dir: Path, tmp_path: Path, case, args, message) -> None:
    argv = ["export", *map(str, args(tmp_path, run_dir))]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
    assert not list(tmp_path.glob(".*partial"))


def test_copy_models_refuses_a_hub_name(run_dir: Path, tmp_path: Path) -> None:
    recipe = load_recipe(run_dir / "recipe.toml").replace(**{"decoder.model": "gpt2"})
    (ref,) = [r for r in model_references(recipe) if r.key == "decoder.model"]
    assert ref.cached and ref.path is None
    # a run whose recipe names a hub LM: its recipe and checkpoint say so alike
    from vicap import export

    hub = tmp_path / "hub-run"
    shutil.copytree(run_dir, hub)
    original = export.model_references
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "model_references", lambda r: original(recipe))
        with pytest.raises(UsageError, match="decoder.model = 'gpt2' is a hub or open_clip name"):
            export_run(hub, tmp_path / "out", copy_models=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_from_pretrained_on_a_folder_that_is_no_export(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=f"{tmp_path}: not a vicap export"):
        Captioner.from_pretrained(tmp_path)
    with pytest.raises(RecipeError, match="not a vicap export"):
        Captioner.from_pretrained(run_dir)


def test_a_timm_encoders_weights_file_is_a_model_reference(tmp_path: Path) -> None:
    # the timm model name ships with timm; its weights file is what an export must carry
    weights = tmp_path / "lite0.safetensors"
    weights.write_bytes(b"")
    recipe = load_recipe(
        "demo_vi_synthetic",
        [
            "encoder.name=timm",
            "encoder.model=efficientnet_lite0",
            f"encoder.pretrained={weights}",
            "decoder.model=gpt2",
        ],
    )
    refs = {r.key: r for r in model_references(recipe)}
    assert refs["encoder.pretrained"].path == weights and not refs["encoder.model"].cached
