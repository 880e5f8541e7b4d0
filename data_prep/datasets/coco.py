"""COCO caption format, and UIT-ViIC which is published in it.

A COCO caption file is ``{"images": [{"id", "file_name", "coco_url"?}],
"annotations": [{"id", "image_id", "caption"}]}``; images live in a COCO image
folder the user names (``--images``), either directly or in the sub-folder that
``coco_url`` names (``train2017/``).

- UIT-ViIC: ``uitviic_captions_{train,val,test}2017.json`` (its images are COCO train2017 images).
- MS COCO: ``captions_{train,val}{2014,2017}.json`` (or any single COCO caption file).
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput
from data_prep.datasets.jsonio import read_images_annotations
from data_prep.errors import SourceNotFoundError

_UITVIIC = {
    "train": "uitviic_captions_train2017.json",
    "val": "uitviic_captions_val2017.json",
    "test": "uitviic_captions_test2017.json",
}
_COCO_FILE = re.compile(r"captions_(train|val|test)(\d{4})\.json$")


def _image_path(images: Path, entry: dict, subdirs: dict[str, bool]) -> Path:
    """`images/file_name`, or `images/<folder from coco_url>/file_name` when that folder exists."""
    name = entry["file_name"]
    url = entry.get("coco_url") or ""
    folder = url.rstrip("/").split("/")[-2] if url.count("/") >= 2 else ""
    if folder:
        if folder not in subdirs:
            subdirs[folder] = (images / folder).is_dir()
        if subdirs[folder]:
            return images / folder / name
    return images / name


def read_coco_files(files: dict[str, Path], images: Path, out: AdapterOutput) -> AdapterOutput:
    """Read COCO caption files (split -> file) into `out`. Ids are COCO ids (unique across COCO splits)."""
    subdirs: dict[str, bool] = {}
    for split, path in files.items():
        ims, caps = read_images_annotations(path, split, out, lambda e: _image_path(images, e, subdirs))
        out.images += ims
        out.captions += caps
    return out


def _split_files(source: Path, names: dict[str, str], out: AdapterOutput) -> dict[str, Path]:
    found = {split: source / n for split, n in names.items() if (source / n).is_file()}
    if not found:
        raise SourceNotFoundError(f"none of {', '.join(names.values())} in {source}")
    for split, n in names.items():
        if split not in found:
            out.problem("missing_file", n, "-", f"no {n} in {source}; split {split!r} is empty")
    out.meta["source_files"] = [p.name for p in found.values()]
    return found


@register_adapter("uitviic", language="vi")
def read_uitviic(source: Path, *, images: Path | None = None) -> AdapterOutput:
    """UIT-ViIC: uitviic_captions_{train,val,test}2017.json; images from a COCO image folder (--images)."""
    source = Path(source)
    out = AdapterOutput()
    files = _split_files(source, _UITVIIC, out)
    return read_coco_files(files, Path(images) if images else source / "images", out)


@register_adapter("coco", language="en")
def read_coco(source: Path, *, images: Path | None = None) -> AdapterOutput:
    """MS COCO captions: a captions_<split><year>.json file, or a folder of them; images from --images."""
    source = Path(source)
    out = AdapterOutput()
    if source.is_file():
        m = _COCO_FILE.search(source.name)
        files = {m.group(1) if m else "train": source}
        root = source.parent
    else:
        files = {}
        for path in sorted(source.glob("captions_*.json")):
            m = _COCO_FILE.search(path.name)
            if m:
                files[m.group(1) if m.group(1) not in files else f"{m.group(1)}{m.group(2)}"] = path
        if not files:
            raise SourceNotFoundError(f"no captions_<split><year>.json in {source}")
        root = source
    out.meta["source_files"] = [p.name for p in files.values()]
    return read_coco_files(files, Path(images) if images else root, out)
