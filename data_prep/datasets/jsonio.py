"""Reading dataset files with errors that name the file and position."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.errors import SourceError  # noqa: F401  (raised here; importable from here too)
from data_prep.textio import text_lines


def load_json(path: Path) -> object:
    """Parse a JSON file (UTF-8, BOM tolerated; a file that is not UTF-8 is named with line and byte)."""
    try:
        return json.loads("".join(text_lines(path, SourceError)))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def read_images_annotations(
    path: Path,
    split: str,
    out: AdapterOutput,
    image_path: Callable[[dict], Path],
    filename_key: str = "file_name",
) -> tuple[list[RawImage], list[RawCaption]]:
    """Read a COCO-style ``{"images": [{id, <filename_key>}], "annotations": [{id, image_id, caption}]}`` file.

    Malformed entries become `bad_entry` problems in `out`; `image_path(entry)` places each image.
    """
    name = path.name
    data = load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        out.problem("bad_entry", name, "-", "expected an object with 'images' and 'annotations' lists")
        return [], []
    images, captions = [], []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get(filename_key), str):
            out.problem("bad_entry", name, f"images[{i}]", f"needs 'id' and '{filename_key}': {img!r}")
            continue
        images.append(RawImage(str(img["id"]), image_path(img), split, name, f"image {img['id']}"))
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
            out.problem("bad_entry", name, f"annotations[{i}]", f"needs 'id' and 'image_id': {ann!r}")
            continue
        captions.append(
            RawCaption(
                str(ann["id"]), str(ann["image_id"]), ann.get("caption"), name, f"annotation {ann['id']}"
            )
        )
    return images, captions
