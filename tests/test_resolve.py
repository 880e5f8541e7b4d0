"""Model names -> what they point at (vicap.resolve), and the messages for names that point nowhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vicap.errors import ModelLoadError
from vicap.resolve import display_name, file_identity, folder_identity, resolve


@pytest.fixture
def here(tmp_path: Path, monkeypatch) -> Path:
    """A working directory with an LM folder, an open_clip folder, a weights file and a home folder."""
    for folder in ("lm", "clip", "ViT-B-32", "home/lm"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "lm.gguf").write_bytes(b"GGUF")
    (tmp_path / "home/w.safetensors").write_bytes(b"weights at home")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# (case, name, family, pretrained) -> (kind, target, local, weights file); {here} is the working directory
RESOLVED = [
    ("folder by absolute path", "{here}/lm", "transformers", "", ("folder", "{here}/lm", True, None)),
    ("folder by relative path", "./lm", "transformers", "", ("folder", "lm", True, None)),
    ("folder by bare name (transformers' rule)", "lm", "transformers", "", ("folder", "lm", True, None)),
    ("~ is expanded", "~/lm", "transformers", "", ("folder", "{here}/home/lm", True, None)),
    ("local-dir: for transformers", "local-dir:lm", "transformers", "", ("folder", "lm", True, None)),
    (
        "local-dir: for open_clip",
        "local-dir:{here}/clip",
        "open_clip",
        "",
        ("folder", "local-dir:{here}/clip", True, None),
    ),
    (
        "local-dir: with ~",
        "local-dir:~/lm",
        "open_clip",
        "",
        ("folder", "local-dir:{here}/home/lm", True, None),
    ),
    (
        "a path is a folder for open_clip too",
        "./clip",
        "open_clip",
        "",
        ("folder", "local-dir:clip", True, None),
    ),
    ("hf-hub: for transformers: the repo id", "hf-hub:x/y", "transformers", "", ("hub", "x/y", False, None)),
    (
        "hf-hub: for open_clip keeps its prefix",
        "hf-hub:x/y",
        "open_clip",
        "",
        ("hub", "hf-hub:x/y", False, None),
    ),
    (
        "org/name hub id",
        "NlpHUST/gpt2-vietnamese",
        "transformers",
        "",
        ("hub", "NlpHUST/gpt2-vietnamese", False, None),
    ),
    ("bare hub id", "gpt2", "transformers", "", ("hub", "gpt2", False, None)),
    ("a .gguf file", "./lm.gguf", "transformers", "", ("gguf", "lm.gguf", True, None)),
    ("a .gguf file by bare name", "lm.gguf", "transformers", "", ("gguf", "lm.gguf", True, None)),
    ("open_clip name + tag", "ViT-B-32", "open_clip", "openai", ("open_clip", "ViT-B-32", False, None)),
    # a folder named like an open_clip model does not shadow the model
    ("open_clip name, no tag", "ViT-B-32", "open_clip", "", ("open_clip", "ViT-B-32", False, None)),
    (
        "open_clip name + local weights file",
        "ViT-B-32",
        "open_clip",
        "{here}/w.safetensors",
        ("open_clip", "ViT-B-32", False, "{here}/w.safetensors"),
    ),
    (
        "open_clip weights file with ~",
        "ViT-B-32",
        "open_clip",
        "~/w.safetensors",
        ("open_clip", "ViT-B-32", False, "{here}/home/w.safetensors"),
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "family", "pretrained", "expected"), RESOLVED, ids=[r[0] for r in RESOLVED]
)
def test_names_resolve(here: Path, case, name, family, pretrained, expected) -> None:
    fill = str(here)
    ref = resolve(name.format(here=fill), "decoder.model", family, pretrained.format(here=fill))
    kind, target, local, weights_file = expected
    assert (ref.kind, ref.target, ref.local) == (kind, target.format(here=fill), local)
    assert ref.weights_file == (Path(weights_file.format(here=fill)) if weights_file else None)
    assert (ref.path is not None) == local


# (case, name, family, pretrained) -> what the error says
ERRORS = [
    (
        "path with nothing there",
        "./missing",
        "transformers",
        "",
        r"'./missing': directory not found \(looked for .*/missing\)",
    ),
    ("deep path with nothing there", "a/b/c", "transformers", "", r"'a/b/c': directory not found"),
    (
        "local-dir: with nothing there",
        "local-dir:gone",
        "open_clip",
        "",
        r"'local-dir:gone': directory not found",
    ),
    (
        "~ path with nothing there",
        "~/gone",
        "transformers",
        "",
        r"directory not found \(looked for .*/home/gone\)",
    ),
    (
        "a file is no model folder",
        "./w.safetensors",
        "transformers",
        "",
        r"is a file, not a folder .* save_pretrained",
    ),
    (
        "a file is no open_clip folder",
        "local-dir:w.safetensors",
        "open_clip",
        "",
        r"is a file.*encoder\.pretrained",
    ),
    (
        "open_clip path with nothing there",
        "/nope/clip",
        "open_clip",
        "",
        r"directory not found.*open_clip_config\.json",
    ),
    ("hf-hub: without a repo", "hf-hub:", "transformers", "", r"'hf-hub:' names no repository"),
    (
        "unknown open_clip name",
        "ViT-Nope-99",
        "open_clip",
        "",
        r"'ViT-Nope-99' is not an open_clip model; known.*'local-dir:PATH'",
    ),
    (
        "missing weights file",
        "ViT-B-32",
        "open_clip",
        "./gone.pt",
        r"encoder\.pretrained = './gone\.pt': file not found",
    ),
    (
        "missing weights path",
        "ViT-B-32",
        "open_clip",
        "./gone",
        r"encoder\.pretrained = './gone': file not found",
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "family", "pretrained", "match"), ERRORS, ids=[e[0] for e in ERRORS]
)
def test_names_that_point_nowhere(here: Path, case, name, family, pretrained, match) -> None:
    key = "encoder.model" if family == "open_clip" else "decoder.model"
    with pytest.raises(ModelLoadError, match=match) as err:
        resolve(name, key, family, pretrained)
    if not pretrained:
        assert str(err.value).startswith(f"{key} = {name!r}")  # names the setting and the value


# (case, name, family, pretrained) -> the how-to that ends a failed load's message
HOW_TO = [
    (
        "hub id",
        "org/name",
        "transformers",
        "",
        "looked for a folder of that name, then in the Hugging Face cache, then on the hub. Offline, run "
        "`huggingface-cli download org/name --local-dir DIR` on a connected machine, copy DIR here and set "
        "decoder.model = DIR.",
    ),
    (
        "hf-hub: for open_clip",
        "hf-hub:x/y",
        "open_clip",
        "",
        "looked in the Hugging Face cache, then on the hub. Offline, run `huggingface-cli download x/y "
        "--local-dir DIR` on a connected machine, copy DIR here and set decoder.model = 'local-dir:DIR'.",
    ),
    (
        "open_clip name + tag",
        "RN50",
        "open_clip",
        "yfcc15m",
        "open_clip.create_model('RN50', pretrained='yfcc15m')",
    ),
    (
        "local folder",
        "./lm",
        "transformers",
        "",
        "/lm (local files only); decoder.model names a folder written by save_pretrained",
    ),
]


@pytest.mark.parametrize(("case", "name", "family", "pretrained", "hint"), HOW_TO, ids=[h[0] for h in HOW_TO])
def test_how_to_provide(here: Path, case, name, family, pretrained, hint) -> None:
    ref = resolve(name, "decoder.model", family, pretrained)
    assert hint in ref.how_to_provide()
    error = str(ref.load_error("decoder", OSError("not in the cache")))
    assert error.startswith(f"could not load decoder {name!r}") and "OSError: not in the cache" in error
    assert error.endswith(ref.how_to_provide())


def _old_folder_weights(folder: Path, suffixes: tuple[str, ...]) -> str:
    """A folder's identity as vicap wrote it before vicap.resolve existed (stores keyed by it are reused)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
    return ",".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for p in files)


def test_identity_keeps_the_keys_it_had(here: Path) -> None:
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "x.pth", "x.bin", "notes.txt"):
        (here / "clip" / name).write_text(name)
    open_clip_folder = resolve("local-dir:clip", "encoder.model", "open_clip").identity()
    assert open_clip_folder == {
        "model": "local-dir",
        "weights": _old_folder_weights(here / "clip", (".safetensors", ".bin", ".pth", ".json")),
    }
    hf_folder = resolve("./clip", "encoder.model").identity()  # transformers reads no .pth
    assert hf_folder == {
        "model": "local-dir",
        "weights": _old_folder_weights(here / "clip", (".safetensors", ".bin", ".json")),
    }
    assert "x.pth" in open_clip_folder["weights"] and "x.pth" not in hf_folder["weights"]
    assert "notes.txt" not in open_clip_folder["weights"]

    digest = hashlib.sha256(b"weights").hexdigest()[:16]
    assert file_identity(here / "w.safetensors") == f"file:{digest}"
    assert resolve("ViT-B-32", "encoder.model", "open_clip", "w.safetensors").identity() == {
        "model": "ViT-B-32",
        "weights": f"file:{digest}",
    }
    assert resolve("ViT-B-32", "encoder.model", "open_clip", "openai").identity() == {
        "model": "ViT-B-32",
        "weights": "openai",
    }
    # open_clip ignores encoder.pretrained for hf-hub: models; their key always carried it
    assert resolve("hf-hub:x/y", "encoder.model", "open_clip", "openai").identity() == {
        "model": "hf-hub:x/y",
        "weights": "openai",
    }
    assert resolve("org/clip", "encoder.model").identity() == {"model": "org/clip", "weights": "org/clip"}


def test_folder_identity_is_content_not_location(here: Path) -> None:
    (here / "lm" / "config.json").write_text("{}")
    (here / "home" / "lm" / "config.json").write_text("{}")
    suffixes = (".json",)
    assert folder_identity(here / "lm", suffixes) == folder_identity(here / "home" / "lm", suffixes)
    (here / "home" / "lm" / "config.json").write_text('{"n_layer": 2}')
    assert folder_identity(here / "lm", suffixes) != folder_identity(here / "home" / "lm", suffixes)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("local-dir:/x/y/clip", "clip"),
        ("hf-hub:org/model", "model"),
        ("NlpHUST/gpt2-vietnamese", "gpt2-vietnamese"),
        ("gpt2", "gpt2"),
        ("ViT-B-32", "ViT-B-32"),
        ("./runs/lm/", "lm"),
    ],
)
def test_display_name(name: str, shown: str) -> None:
    assert display_name(name) == shown
