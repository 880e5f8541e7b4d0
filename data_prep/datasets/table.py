"""Generic inputs: a CSV/TSV/JSONL table of image,caption rows, and a folder of images with a captions file.

Table rows name an image (a path relative to ``--images``, default the table's
folder) and a caption; several rows may name the same image. A JSONL row may
hold a list of captions. Optional columns: a split (default "train") and a
caption id (default ``<file>:<line>``). Split names are canonical (dev -> val). A TSV, or a ``.txt`` file with tabs,
without a header row is read as ``image<TAB>caption``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage, canonical_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_FILES = ("captions.csv", "captions.tsv", "captions.jsonl", "captions.txt")


def _rows(
    path: Path, image_column: str, caption_column: str, out: AdapterOutput
) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for each row; unparseable rows become problems."""
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                out.problem("bad_entry", path.name, f"line {n}", f"invalid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                out.problem("bad_entry", path.name, f"line {n}", "expected a JSON object")
                continue
            yield n, row
        return
    first = text.split("\n", 1)[0]
    delimiter = "\t" if suffix == ".tsv" or (suffix == ".txt" and "\t" in first) else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    if image_column not in header:
        if len(header) == 2:  # headerless image,caption
            yield reader.line_num, {image_column: header[0], caption_column: header[1]}
            header = [image_column, caption_column]
        else:
            raise ValueError(f"{path}:1: no column {image_column!r} in header {header}")
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            out.problem(
                "bad_entry",
                path.name,
                f"line {reader.line_num}",
                f"{len(row)} fields, header has {len(header)}",
            )
            continue
        yield reader.line_num, dict(zip(header, row, strict=True))


def read_table_into(
    path: Path,
    images: Path,
    out: AdapterOutput,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str = "split",
    id_column: str | None = None,
) -> dict[str, RawImage]:
    """Read a caption table into `out`; returns the images it named, by image id."""
    by_image: dict[str, RawImage] = {}
    for n, row in _rows(path, image_column, caption_column, out):
        where = f"line {n}"
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            out.problem("bad_entry", path.name, where, f"no {image_column!r} value")
            continue
        image_id = image.strip()
        split = canonical_split(str(row.get(split_column) or "train"))
        if image_id not in by_image:
            by_image[image_id] = RawImage(image_id, images / image_id, split, path.name, where)
            out.images.append(by_image[image_id])
        elif by_image[image_id].split != split:
            out.problem(
                "split_conflict",
                path.name,
                where,
                f"{image_id} already in split {by_image[image_id].split!r}; kept there",
                "fixed",
            )
        caps = row.get(caption_column)
        caps = caps if isinstance(caps, list) else [caps]
        base_id = (
            str(row[id_column]) if id_column and row.get(id_column) not in (None, "") else f"{path.name}:{n}"
        )
        for k, cap in enumerate(caps):
            cap_id = base_id if len(caps) == 1 else f"{base_id}#{k}"
            out.captions.append(RawCaption(cap_id, image_id, cap, path.name, where))
    return by_image


@register_adapter("table", language="generic")
def read_table(
    source: Path,
    *,
    images: Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str = "split",
    id_column: str | None = None,
) -> AdapterOutput:
    """A CSV/TSV/JSONL file of image,caption rows (optional split and id columns); images under --images."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"caption table not found: {source}")
    out = AdapterOutput(meta={"source_files": [source.name]})
    read_table_into(
        source,
        Path(images) if images else source.parent,
        out,
        image_column=image_column,
        caption_column=caption_column,
        split_column=split_column,
        id_column=id_column,
    )
    return out


@register_adapter("folder", language="generic")
def read_folder(
    source: Path,
    *,
    images: Path | None = None,
    captions_file: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str = "split",
    id_column: str | None = None,
) -> AdapterOutput:
    """A folder of images with a captions file (captions.csv/.tsv/.jsonl/.txt); uncaptioned images are reported."""
    folder = Path(source)
    if captions_file:
        table = folder / captions_file
    else:
        table = next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), folder / CAPTION_FILES[0])
    if not table.is_file():
        raise FileNotFoundError(
            f"no captions file in {folder} (looked for {', '.join(CAPTION_FILES)}; or pass captions_file)"
        )
    # Images beside the captions file, or in its images/ sub-folder.
    image_root = Path(images) if images else (folder / "images" if (folder / "images").is_dir() else folder)
    out = AdapterOutput(meta={"source_files": [table.name]})
    named = read_table_into(
        table,
        image_root,
        out,
        image_column=image_column,
        caption_column=caption_column,
        split_column=split_column,
        id_column=id_column,
    )
    # Every image file in the folder is data; one without a caption is reported, not ignored.
    named_paths = {im.path for im in named.values()}
    for path in sorted(image_root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path not in named_paths:
            rel = path.relative_to(image_root).as_posix()
            if rel not in named:
                out.images.append(RawImage(rel, path, "train", rel, "-"))
    return out
