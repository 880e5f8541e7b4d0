"""Generic inputs: a CSV/TSV/JSONL table of image,caption rows, and a folder of images with a captions file.

Table rows name an image (a path relative to ``--images``, default the table's
folder) and a caption; several rows may name the same image. A JSONL row may
hold a list of captions. Optional columns: a split (default "train") and a
caption id (default ``<file>:<line>``). Split names are canonical (dev -> val). A TSV, or a ``.txt`` file with tabs,
without a header row is read as ``image<TAB>caption``.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage, canonical_split, source_name
from data_prep.datasets.jsonio import SourceError
from data_prep.errors import SourceNotFoundError
from data_prep.images import walk_images
from data_prep.textio import text_lines

CAPTION_FILES = ("captions.csv", "captions.tsv", "captions.jsonl", "captions.txt")


def _json_rows(path: Path, out: AdapterOutput) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(text_lines(path, SourceError), start=1):
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


def _csv_rows(
    path: Path,
    image_column: str,
    caption_column: str,
    out: AdapterOutput,
    *,
    headerless: bool = True,
    hint: str = "name the caption column with --option caption_column=NAME",
) -> Iterator[tuple[int, dict]]:
    """A CSV/TSV's rows as dicts by header. `headerless`: a two-column file without a header row is
    read as image,caption. `hint` ends the error for a header without `caption_column`."""
    lines = text_lines(path, SourceError)
    first = next(lines, "")
    suffix = path.suffix.lower()
    delimiter = "\t" if suffix == ".tsv" or (suffix == ".txt" and "\t" in first) else ","
    # strict: a stray quote is an error for its row instead of gluing the rows after it into one field
    reader = csv.reader(itertools.chain([first], lines), delimiter=delimiter, strict=True)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    if image_column not in header:
        if headerless and len(header) == 2:  # headerless image,caption
            yield 1, {image_column: header[0], caption_column: header[1]}
            header = [image_column, caption_column]
        else:
            raise SourceError(f"{path}:1: no column {image_column!r} in header {header}")
    if caption_column not in header:
        raise SourceError(f"{path}:1: no column {caption_column!r} in header {header}; {hint}")
    while True:
        n = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # a quote left open to the end of the file, or text after a closing quote
            why = (
                "a quote opened here is never closed"
                if "end of data" in str(err)
                else f"cannot parse the row ({err})"
            )
            out.problem("bad_entry", path.name, _lines(n, reader.line_num), f"{why}; these lines are skipped")
            continue
        if reader.line_num > n and any("\n" in cell for cell in row):
            # A quote opened in one row and closed rows later: the rows in between became one field.
            out.problem(
                "bad_entry",
                path.name,
                _lines(n, reader.line_num),
                "a quoted field runs over several lines (a quote left open?); these lines are skipped",
            )
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            out.problem("bad_entry", path.name, f"line {n}", f"{len(row)} fields, header has {len(header)}")
            continue
        yield n, dict(zip(header, row, strict=True))


def _lines(start: int, end: int) -> str:
    return f"line {start}" if end <= start else f"lines {start}-{end}"


def read_table_into(
    path: Path,
    images: Path,
    out: AdapterOutput,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str | None = None,
    id_column: str | None = None,
) -> dict[str, RawImage]:
    """Read a caption table into `out`; returns the images it named, by image id.

    `split_column` None reads a "split" column when there is one; a column named explicitly
    (caption, split, id) that no row has is an error, not a default.
    """
    by_image: dict[str, RawImage] = {}
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _json_rows(path, out)
    else:
        rows = _csv_rows(path, image_column, caption_column, out)
    keys_seen: set[str] = set()
    for n, row in rows:
        where = f"line {n}"
        keys_seen |= row.keys()
        if caption_column not in row:  # a JSONL row without it (a CSV header is checked once)
            out.problem(
                "bad_entry", path.name, where, f"no {caption_column!r} key; the row has {sorted(row)}"
            )
            continue
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            out.problem("bad_entry", path.name, where, f"no {image_column!r} value")
            continue
        image_id = image.strip()
        split = canonical_split(str(row.get(split_column or "split") or "train"))
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
    missing = [c for c in (caption_column, split_column, id_column) if c and keys_seen and c not in keys_seen]
    if missing:
        raise SourceError(
            f"{path}: no row has column(s) {', '.join(map(repr, missing))}; its columns are "
            f"{sorted(keys_seen)}; name the right ones with --option caption_column=NAME (split_column, id_column)"
        )
    return by_image


@register_adapter("table", language="generic")
def read_table(
    source: Path,
    *,
    images: Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str | None = None,
    id_column: str | None = None,
) -> AdapterOutput:
    """A CSV/TSV/JSONL file of image,caption rows (optional split and id columns); images under --images."""
    source = Path(source)
    if not source.is_file():
        raise SourceNotFoundError(f"caption table not found: {source}")
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
    split_column: str | None = None,
    id_column: str | None = None,
) -> AdapterOutput:
    """A folder of images with a captions file (captions.csv/.tsv/.jsonl/.txt); uncaptioned images are reported."""
    folder = Path(source)
    if captions_file:
        table = folder / captions_file
    else:
        table = next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), folder / CAPTION_FILES[0])
    if not table.is_file():
        raise SourceNotFoundError(
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
    # Every image file in the folder is data; one without a caption is reported, not ignored, and so
    # is what could not be walked (an unreadable sub-folder, a symbolic link loop).
    named_paths = {im.path for im in named.values()}
    scan = walk_images(image_root)
    for path in scan.images:
        rel = path.relative_to(image_root).as_posix()
        if path not in named_paths and rel not in named:
            out.images.append(RawImage(rel, path, "train", rel, "-"))
    for kind, path, reason in scan.skipped:
        out.problem(kind, source_name(path, image_root), "-", f"{path}: {reason}")
    return out
