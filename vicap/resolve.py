"""Model names: what `encoder.model`, `decoder.model` and open_clip's `encoder.pretrained` point at.

`resolve(name, key, family)` decides it once, before anything loads. `family` is the library whose
loader reads the model: "transformers" (Hugging Face vision models, causal LMs), "open_clip" or "timm".

| written                                    | resolves to                                           |
|--------------------------------------------|-------------------------------------------------------|
| `local-dir:PATH`                           | the folder PATH                                       |
| a path: `./x`, `../x`, `/x`, `~/x`, `a/b/c` | that folder                                           |
| `hf-hub:org/repo`                          | a hub model: the Hugging Face cache, else the hub     |
| `org/name`, `gpt2` (transformers)          | a folder of that name here if there is one (transformers' own rule), else a hub model |
| `ViT-B-32` (open_clip)                     | an open_clip model name; its weights are `encoder.pretrained`: a tag (`openai`) or a local weights file |
| `efficientnet_lite0` (timm)                | a timm model name; its weights are `encoder.pretrained`, a local weights file |
| `PATH.gguf` (transformers)                 | a GGUF file (an LM in llama.cpp's format; `vicap.gguf_files`) |
| a folder + `gguf_file = NAME.gguf`         | the GGUF file NAME inside that folder                 |

`~` is expanded; relative paths are relative to the directory vicap runs from. A path with nothing
there, or a file where a folder belongs, is an error naming it. Every failure to load says what was
looked for and how to provide it (`ModelRef.how_to_provide`).

A local folder enters the feature-store key by the content of its weight and config files
(`folder_identity`), not its location: a copied or moved folder keeps its store, changed weights get
a new one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vicap.errors import ModelLoadError

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"

# The weight files a user can hand vicap. safetensors holds only tensors; the others are torch.save
# pickles, read only through torch.load(weights_only=True) (vicap.encoders.load_weights_file).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
GGUF_SUFFIX = ".gguf"  # llama.cpp's single-file LM format; transformers reads it (vicap.gguf_files)


@dataclass(frozen=True)
class Family:
    """How one library's loader reads a model: what its folders hold, what its other names are."""

    # suffixes of the files its loader reads from a folder: their content is the folder's identity
    folder_files: tuple[str, ...]
    layout: str  # what a local folder must hold
    other_names: str  # the names that are not folders
    bare_folders: bool  # a name that is no path still means a folder of that name when one is here


FAMILIES: dict[str, Family] = {
    "transformers": Family(
        folder_files=(".safetensors", ".bin", ".json"),
        layout="a folder written by save_pretrained (config.json, the weights, the tokenizer or image "
        "processor files)",
        other_names="a Hugging Face hub id (gpt2, org/name)",
        bare_folders=True,
    ),
    "open_clip": Family(
        folder_files=(".safetensors", ".bin", ".pth", ".json"),
        layout="a folder holding open_clip_config.json and open_clip_model.safetensors, the layout "
        "open_clip's push_to_hf_hub writes ('local-dir:PATH')",
        other_names="an open_clip model name (ViT-B-32) with its weights in encoder.pretrained (a tag or "
        "a local weights file), or 'hf-hub:org/repo'",
        bare_folders=False,  # its names are model names (ViT-B-32), never folders
    ),
    "timm": Family(
        folder_files=(".safetensors", ".bin", ".pth", ".json"),
        layout="a folder holding config.json and model.safetensors, the layout timm's save_for_hf and "
        "push_to_hf_hub write ('local-dir:PATH')",
        other_names="a timm model name (efficientnet_lite0) with its weights in encoder.pretrained (a local "
        ".safetensors, or .pth state dict in timm's key layout)",
        bare_folders=False,
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """A model name, resolved."""

    name: str  # as written, for messages
    key: str  # the setting that named it: "decoder.model"
    family: str  # "transformers", "open_clip" or "timm": whose loader reads it
    kind: str  # "folder", "hub", "open_clip" / "timm" (that library's model name) or "gguf" (a GGUF file)
    target: str  # what the loader is handed: a path, a hub id, "local-dir:PATH" / "hf-hub:ID" for open_clip
    path: Path | None = None  # the folder (~ expanded) when kind == "folder"; the file when kind == "gguf"
    pretrained: str = ""  # open_clip, timm: encoder.pretrained as written
    weights_file: Path | None = None  # open_clip, timm: encoder.pretrained when it names a local file

    @property
    def local(self) -> bool:
        """A local folder or file: read from disk only, never looked up on the hub."""
        return self.kind in ("folder", "gguf")

    def identity(self) -> dict[str, str]:
        """The model's part of its feature-store key: `model` and `weights`."""
        if self.kind == "gguf":
            return {"model": "gguf", "weights": file_identity(self.path)}
        if self.local:
            folder = folder_identity(self.path, FAMILIES[self.family].folder_files)
            return {"model": "local-dir", "weights": folder}
        if self.family in ("open_clip", "timm"):
            # encoder.pretrained for hf-hub: models too, which open_clip ignores, so their keys stay as they were
            weights = file_identity(self.weights_file) if self.weights_file else self.pretrained
            return {"model": self.target, "weights": weights}
        return {"model": self.target, "weights": self.target}

    def how_to_provide(self) -> str:
        """Where the loader looked, and how to put the model there offline."""
        if self.kind == "gguf":
            return (
                f"vicap read the GGUF file {self.path.absolute()}; {self.key} names a .gguf file, or a folder "
                "with the file's name in decoder.gguf_file."
            )
        if self.local:
            layout = FAMILIES[self.family].layout
            return (
                f"vicap read the folder {self.path.absolute()} (local files only); {self.key} names {layout}."
            )
        if self.kind == "open_clip":
            tag = self.pretrained or "openai"
            return (
                "vicap looked in the local open_clip / Hugging Face cache. Offline, download the weights on a "
                f"connected machine (`python -c \"import open_clip; open_clip.create_model('{self.target}', "
                f"pretrained='{tag}')\"`) and copy the cache, or set encoder.pretrained to a local .safetensors "
                f"file or {self.key} to 'local-dir:PATH'."
            )
        repo = self.target.removeprefix(HF_HUB)
        looked = "" if self.name.startswith(HF_HUB) else "for a folder of that name, then "
        folder = "'local-dir:DIR'" if self.family == "open_clip" else "DIR"
        return (
            f"vicap looked {looked}in the Hugging Face cache, then on the hub. Offline, run "
            f"`huggingface-cli download {repo} --local-dir DIR` on a connected machine, copy DIR here "
            f"and set {self.key} = {folder}."
        )

    def error(self, problem: str) -> ModelLoadError:
        """`problem` with this name, and what the setting should name instead."""
        return _name_error(self.key, self.name, self.family, problem)

    def load_error(self, what: str, e: Exception) -> ModelLoadError:
        """`e`, raised while loading this model as `what`, as one message that says what to do."""
        tag = f" (pretrained={self.pretrained!r})" if self.kind == "open_clip" and self.pretrained else ""
        return ModelLoadError(
            f"could not load {what} {self.name!r}{tag}: {type(e).__name__}: {e}\n{self.how_to_provide()}"
        )


def resolve(
    name: str, key: str, family: str = "transformers", pretrained: str = "", gguf_file: str = ""
) -> ModelRef:
    """What `name`, the value of setting `key`, points at (see the module's table). `pretrained` is
    open_clip's encoder.pretrained; `gguf_file` (transformers) a GGUF file inside the folder `name`.
    Raises ModelLoadError for a path with nothing there, or a file where a folder belongs (a GGUF file
    is named by its .gguf suffix; what is inside is checked when it loads)."""
    fam = FAMILIES[family]
    if gguf_file:
        return _gguf_in_folder(name, key, family, gguf_file)
    if family == "transformers" and name.lower().endswith(GGUF_SUFFIX):
        return _gguf(name, key, Path(name.removeprefix(LOCAL_DIR)).expanduser())
    if name.startswith(LOCAL_DIR):
        return _folder(name, key, family, name[len(LOCAL_DIR) :])
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB) :]
        if not repo:
            raise ModelLoadError(f"{key} = {name!r} names no repository; write hf-hub:org/repo")
        # open_clip takes hub models with their prefix; transformers takes the bare repo id
        target = name if family == "open_clip" else repo
        return ModelRef(name, key, family, "hub", target, pretrained=pretrained)
    if looks_like_path(name) or (fam.bare_folders and Path(name).is_dir()):
        return _folder(name, key, family, name)
    if family == "open_clip":
        return _open_clip_name(name, key, pretrained)
    if family == "timm":
        return _timm_name(name, key, pretrained)
    return ModelRef(name, key, family, "hub", name)


def looks_like_path(name: str) -> bool:
    """A path, not a name: hub ids are `name` or `org/name`, open_clip names hold no `/`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _folder(name: str, key: str, family: str, written: str) -> ModelRef:
    path = Path(written).expanduser()
    if path.is_dir():
        target = f"{LOCAL_DIR}{path}" if family == "open_clip" else str(path)
        return ModelRef(name, key, family, "folder", target, path=path)
    found = "is a file, not a folder" if path.exists() else "directory not found"
    raise _name_error(key, name, family, f"{found} (looked for {path.absolute()})")


def _gguf(name: str, key: str, file: Path, where: str = "") -> ModelRef:
    if not file.is_file():
        found = "is a folder, not a file" if file.is_dir() else "file not found"
        where = where or f"{key} = {name!r}"
        raise ModelLoadError(f"{where}: GGUF {found} (looked for {file.absolute()})")
    return ModelRef(name, key, "transformers", "gguf", str(file), path=file)


def _gguf_in_folder(name: str, key: str, family: str, gguf_file: str) -> ModelRef:
    """`gguf_file` inside the local folder `name` (a GGUF repo holds several quantizations); named by
    its path in later messages."""
    folder = resolve(name, key, family)
    if not folder.local:
        raise ModelLoadError(
            f"decoder.gguf_file = {gguf_file!r} needs {key} to be a local folder, and {name!r} is a hub id. "
            f"Offline, run `huggingface-cli download {folder.target} {gguf_file} --local-dir DIR` on a "
            f"connected machine, copy DIR here and set {key} = DIR."
        )
    file = folder.path / gguf_file
    return _gguf(str(file), key, file, f"{key} = {name!r} with decoder.gguf_file = {gguf_file!r}")


def _name_error(key: str, name: str, family: str, problem: str) -> ModelLoadError:
    fam = FAMILIES[family]
    return ModelLoadError(f"{key} = {name!r}: {problem}. {key} names {fam.layout}, or {fam.other_names}.")


def _open_clip_name(name: str, key: str, pretrained: str) -> ModelRef:
    """An open_clip model name, and encoder.pretrained as a tag or a local weights file."""
    import open_clip  # after vicap's torchvision guard (vicap/__init__.py)

    known = open_clip.list_models()
    if name not in known:
        raise ModelLoadError(
            f"{key} = {name!r} is not an open_clip model; known include {', '.join(known[:8])}, ... "
            "(open_clip.list_models()). A local folder is written 'local-dir:PATH' or as a path (./PATH)."
        )
    weights_file = None
    if pretrained and not open_clip.get_pretrained_cfg(name, pretrained):  # not one of the model's tags
        file = Path(pretrained).expanduser()
        if pretrained.endswith(WEIGHT_SUFFIXES) or looks_like_path(pretrained) or file.is_file():
            if not file.is_file():
                raise ModelLoadError(f"encoder.pretrained = {pretrained!r}: file not found")
            weights_file = file
    return ModelRef(
        name, key, "open_clip", "open_clip", name, pretrained=pretrained, weights_file=weights_file
    )


def _timm_name(name: str, key: str, pretrained: str) -> ModelRef:
    """A timm model name, and encoder.pretrained as the local weights file it is built with. vicap never
    asks timm for its own pretrained weights: they would come from the hub."""
    import timm  # after vicap's torchvision guard (vicap/__init__.py)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:8]
        raise ModelLoadError(
            f"{key} = {name!r} is not a timm model{'; similar: ' + ', '.join(close) if close else ''} "
            "(timm.list_models()). A local folder is written 'local-dir:PATH' or as a path (./PATH)."
        )
    file = Path(pretrained).expanduser()  # its suffix: EncoderConfig.validate
    if not file.is_file():
        raise ModelLoadError(
            f"encoder.pretrained = {pretrained!r}: file not found (looked for {file.absolute()})"
        )
    return ModelRef(name, key, "timm", "timm", name, pretrained=pretrained, weights_file=file)


def display_name(name: str) -> str:
    """A model name without its prefix and folders, for display: 'local-dir:/x/y/clip' -> 'clip'."""
    bare = name.removeprefix(LOCAL_DIR).removeprefix(HF_HUB)
    return Path(bare).name or bare


# --------------------------------------------------------------------------- content identity


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """A weights file in a feature-store key: 'file:' and the first 16 hex digits of its sha256."""
    return f"file:{file_digest(path)[:16]}"


def folder_identity(folder: Path, suffixes: tuple[str, ...]) -> str:
    """A folder in a feature-store key: 'name:<16 hex digits of its sha256>' for each of its files with
    one of `suffixes`, by name, joined with ','."""
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
    return ",".join(f"{p.name}:{file_digest(p)[:16]}" for p in files)
