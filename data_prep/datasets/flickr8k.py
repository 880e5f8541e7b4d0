"""Flickr8k as published (Flickr8k_text.zip)::

    Flickr8k.token.txt            <image>#<n>\\t<caption>      (5 per image)
    Flickr_8k.trainImages.txt     one image file name per line (6000)
    Flickr_8k.devImages.txt       (1000) -> split "val"
    Flickr_8k.testImages.txt      (1000)

Images (Flickr8k_Dataset.zip unpacks to ``Flicker8k_Dataset/``, sic) come from
``--images``. Images in the token file but in no split file (the release has
some, e.g. ``2258277193_586949ec62.jpg.1``) are reported as ``no_split``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.datasets.jsonio import SourceError
from data_prep.errors import SourceNotFoundError
from data_prep.textio import text_lines

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _default_images(root: Path) -> Path:
    for cand in (root / "Flicker8k_Dataset", root.parent / "Flicker8k_Dataset", root / "Flickr8k_Dataset"):
        if cand.is_dir():
            return cand
    return root


def _lines(path: Path) -> list[tuple[int, str]]:
    lines = enumerate(text_lines(path, SourceError), start=1)
    return [(n, line.rstrip("\r\n")) for n, line in lines if line.strip()]


@register_adapter("flickr8k", language="en")
def read_flickr8k(source: Path, *, images: Path | None = None) -> AdapterOutput:
    """Flickr8k: Flickr8k.token.txt with Flickr_8k.{train,dev,test}Images.txt; images from --images."""
    source = Path(source)
    root = source.parent if source.is_file() else source
    token_path = source if source.is_file() else root / TOKEN_FILE
    if not token_path.is_file():
        raise SourceNotFoundError(f"no {TOKEN_FILE} in {root}")
    image_root = Path(images) if images else _default_images(root)
    out = AdapterOutput(meta={"source_files": [token_path.name]})

    split_of: dict[str, str] = {}
    listed: dict[str, tuple[str, int]] = {}  # image -> (split file, line), first listing
    present = [s for s, n in SPLIT_FILES.items() if (root / n).is_file()]
    for split, name in SPLIT_FILES.items():
        if split not in present:
            out.problem("missing_file", name, "-", f"no {name} in {root}; split {split!r} is empty")
            continue
        out.meta["source_files"].append(name)
        for n, line in _lines(root / name):
            fname = line.strip()
            if fname in split_of and split_of[fname] != split:
                out.problem(
                    "split_conflict",
                    name,
                    f"line {n}",
                    f"{fname} already in split {split_of[fname]!r}; kept there",
                    "fixed",
                )
                continue
            split_of[fname] = split
            listed.setdefault(fname, (name, n))

    seen: dict[str, None] = {}
    for n, line in _lines(token_path):
        key, sep, caption = line.partition("\t")
        fname, hash_, num = key.partition("#")
        if not sep or not hash_ or not fname:
            out.problem(
                "bad_entry",
                token_path.name,
                f"line {n}",
                f"expected '<image>#<n>\\t<caption>': {line[:80]!r}",
            )
            continue
        if fname not in seen:
            seen[fname] = None
            # No split files at all: everything is training data.
            split = split_of.get(fname) if present else "train"
            out.images.append(
                RawImage(Path(fname).stem, image_root / fname, split, token_path.name, f"line {n}")
            )
        out.captions.append(RawCaption(key, Path(fname).stem, caption, token_path.name, f"line {n}"))
    # Split-file images without any caption: counted (as no_captions), not silently ignored.
    for fname, (name, n) in listed.items():
        if fname not in seen:
            out.images.append(
                RawImage(Path(fname).stem, image_root / fname, split_of[fname], name, f"line {n}")
            )
    return out
