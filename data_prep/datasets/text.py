"""A text corpus without images: sentences in the target language for text-only training (CapDec).

A ``.txt`` file holds one sentence a line (blank lines are not sentences); a ``.jsonl`` file one JSON
object a line whose ``text`` key (``--option text_column=NAME``) holds a sentence or a list of them;
a ``.csv`` / ``.tsv`` file a header row with a ``text`` column. Every sentence becomes a manifest
record of split "train" with no image (``"image": ""``) and the sentence as its one caption, id
``<file>:<line>``. Normalization, empty, over-long and wrong-script sentences, and bad lines are
handled and reported as for captions (`build_records`); a sentence seen before (after
normalization) is skipped as ``duplicate_text``, naming where it was first seen.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.datasets.jsonio import SourceError
from data_prep.datasets.table import _csv_rows, _json_rows
from data_prep.errors import SourceNotFoundError
from data_prep.textio import text_lines

TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".ndjson")


def _rows(path: Path, column: str, out: AdapterOutput):
    """(line number, the row's text value) of every non-blank line or row."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        for n, row in _json_rows(path, out):
            if column not in row:
                out.problem(
                    "bad_entry", path.name, f"line {n}", f"no {column!r} key; the row has {sorted(row)}"
                )
                continue
            yield n, row[column]
    elif suffix in TABLE_SUFFIXES:
        for n, row in _csv_rows(path, column, column, out, headerless=False):
            yield n, row[column]
    else:  # plain text: the line is the sentence
        for n, line in enumerate(text_lines(path, SourceError), start=1):
            if line.strip():
                yield n, line.rstrip("\r\n")


@register_adapter("text", language="generic")
def read_text(source: Path, *, text_column: str = "text") -> AdapterOutput:
    """A text corpus without images: one sentence a line (.txt), or a .jsonl/.csv/.tsv text column."""
    source = Path(source)
    if not source.is_file():
        raise SourceNotFoundError(
            f"text corpus not found: {source} (expected a .txt, .jsonl, .csv or .tsv file)"
        )
    out = AdapterOutput(meta={"source_files": [source.name], "text_only": True})
    for n, value in _rows(source, text_column, out):
        values = value if isinstance(value, list) else [value]
        for k, text in enumerate(values):
            sid = f"{source.name}:{n}" if len(values) == 1 else f"{source.name}:{n}#{k}"
            out.images.append(RawImage(sid, None, "train", source.name, f"line {n}"))
            out.captions.append(RawCaption(sid, sid, text, source.name, f"line {n}"))
    return out
