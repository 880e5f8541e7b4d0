"""A text corpus without images: sentences in the target language for text-only training (CapDec),
or sentence pairs (a source-language sentence and its target-language translation) for cross-lingual
training.

A ``.txt`` file holds one sentence a line (blank lines are not sentences); a ``.jsonl`` file one JSON
object a line whose ``text`` key (``--option text_column=NAME``) holds a sentence or a list of them;
a ``.csv`` / ``.tsv`` file a header row with a ``text`` column. Every sentence becomes a manifest
record of split "train" with no image (``"image": ""``) and the sentence as its one caption, id
``<file>:<line>``. Normalization, empty, over-long and wrong-script sentences, and bad lines are
handled and reported as for captions (`build_records`); a sentence seen before (after
normalization) is skipped as ``duplicate_text``, naming where it was first seen.

Sentence pairs: ``--option source_column=NAME --option source_language=CODE`` reads each row of a
``.jsonl`` / ``.csv`` / ``.tsv`` file as a pair: the ``text_column`` value is the target sentence (the
record's caption, in the manifest's language) and the ``source_column`` value the source sentence,
normalized in ``source_language`` for the CLIP text tower and kept as the record's ``source``. Both
sides are checked as captions are (a bad side skips the pair, naming which side); a pair seen before
(both sides, after normalization) is skipped as ``duplicate_text``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.datasets.jsonio import SourceError
from data_prep.datasets.table import _csv_rows, _json_rows
from data_prep.errors import SettingError, SourceNotFoundError
from data_prep.languages import get_language
from data_prep.textio import text_lines

TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".ndjson")


def _rows(path: Path, columns: tuple[str, ...], out: AdapterOutput):
    """(line number, the row's values of `columns`) of every non-blank line or row."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        for n, row in _json_rows(path, out):
            missing = [c for c in columns if c not in row]
            if missing:
                keys = " and ".join(repr(c) for c in missing)
                out.problem("bad_entry", path.name, f"line {n}", f"no {keys} key; the row has {sorted(row)}")
                continue
            yield n, [row[c] for c in columns]
    elif suffix in TABLE_SUFFIXES:
        text, source = columns[0], columns[-1]
        hint = f"name it with --option {'source_column' if len(columns) > 1 else 'text_column'}=NAME"
        for n, row in _csv_rows(path, text, source, out, headerless=False, hint=hint):
            yield n, [row[c] for c in columns]
    else:  # plain text: the line is the sentence
        for n, line in enumerate(text_lines(path, SourceError), start=1):
            if line.strip():
                yield n, [line.rstrip("\r\n")]


@register_adapter("text", language="generic")
def read_text(
    source: Path, *, text_column: str = "text", source_column: str = "", source_language: str = ""
) -> AdapterOutput:
    """A text corpus without images: one sentence a line (.txt), or a .jsonl/.csv/.tsv text column;
    with `source_column` (and `source_language`), sentence pairs: source sentence -> target sentence."""
    source = Path(source)
    if not source.is_file():
        raise SourceNotFoundError(
            f"text corpus not found: {source} (expected a .txt, .jsonl, .csv or .tsv file)"
        )
    if source.suffix.lower() not in (".txt", *TABLE_SUFFIXES, *JSON_SUFFIXES):
        raise SettingError(  # a .json list or any other format would be read as lines of text
            f"{source}: a text corpus is a .txt (one sentence a line), .jsonl/.ndjson, .csv or .tsv file"
        )
    pairs = bool(source_column)
    if pairs and source.suffix.lower() not in (*TABLE_SUFFIXES, *JSON_SUFFIXES):
        raise SettingError(
            f"source_column = {source_column!r}: sentence pairs are read from a .jsonl, .csv or .tsv file "
            f"with two named columns, not {source.name}"
        )
    if pairs != bool(source_language):
        raise SettingError(
            "source_language names the language of the source sentences of sentence pairs (source_column); "
            + (
                "give both"
                if pairs
                else f"without source_column, source_language = {source_language!r} applies to nothing"
            )
        )
    if pairs and source_column == text_column:
        raise SettingError(f"source_column and text_column are both {text_column!r}: name two columns")
    meta = {"source_files": [source.name], "text_only": True}
    if pairs:  # build_records normalizes the source side in this language; the store keys it by this
        lang = get_language(source_language)
        meta |= {"source_language": lang.code, "source_normalizer": lang.normalizer_name}
    out = AdapterOutput(meta=meta)
    columns = (text_column, source_column) if pairs else (text_column,)
    for n, values in _rows(source, columns, out):
        if pairs:
            if not all(isinstance(v, str) for v in values):  # a list or a number where a sentence goes
                out.problem(
                    "bad_entry",
                    source.name,
                    f"line {n}",
                    f"a sentence pair holds two strings, got {values!r}",
                )
                continue
            texts, src = [values[0]], values[1]
        else:
            texts, src = (values[0] if isinstance(values[0], list) else [values[0]]), None
        for k, text in enumerate(texts):
            sid = f"{source.name}:{n}" if len(texts) == 1 else f"{source.name}:{n}#{k}"
            out.images.append(RawImage(sid, None, "train", source.name, f"line {n}"))
            out.captions.append(RawCaption(sid, sid, text, source.name, f"line {n}", src))
    return out
