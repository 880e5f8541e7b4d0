"""Reading and writing the text files vicap handles: UTF-8 only, lines end at "\\n", any file name fits.

File names that are not valid UTF-8 reach Python as text holding lone surrogates (PEP 383: the
stray byte 0xE9 becomes U+DCE9), and such text cannot be written as UTF-8. vicap writes that
character as `\\udce9` everywhere: in JSON (manifests, caption JSONL) it is JSON's own escape, so
`json.loads` gives back the very same name and `os.fsencode(name)` the original bytes; in CSV, in
reports and on the terminal it is the six characters `\\udce9`. Every output stays valid UTF-8.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# Lone surrogates: what a str holds for bytes that were not UTF-8 (or a JSON "\udXXX" escape).
SURROGATES = re.compile("[\ud800-\udfff]")


def json_text(obj: object, **kw) -> str:
    """`json.dumps` with non-ASCII text kept readable and lone surrogates written as `\\udcXX` escapes.

    `ensure_ascii=False` would otherwise emit the surrogate itself, which no UTF-8 file can hold.
    """
    text = json.dumps(obj, ensure_ascii=False, **kw)
    # A raw surrogate can only stand inside a JSON string, where its \\u escape means the same.
    return SURROGATES.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def write_atomic(path: str | os.PathLike, chunks, *, durable: bool = False) -> Path:
    """Write text (a str, or an iterable of str written one by one) to `path` as UTF-8 through a
    temporary file renamed into place: readers see the old file or the new one, never a part. A write
    that fails leaves the old file as it was. `durable` also flushes the data to disk before the
    rename (for files that commit other files' contents, like a feature shard's index)."""
    with atomic_writer(path, durable=durable) as f:
        for chunk in [chunks] if isinstance(chunks, str) else chunks:
            f.write(chunk)
    return Path(path)


@contextmanager
def atomic_writer(
    path: str | os.PathLike, *, durable: bool = False, partial: Path | None = None
) -> Iterator[TextIO]:
    """A UTF-8 text file that replaces `path` only when the block ends without an error (see
    write_atomic). If the block fails, the old `path` is left as it was and what was written is
    deleted, or kept as `partial` when one is named (rows already computed are not thrown away)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        if partial is not None and tmp.exists():
            os.replace(tmp, partial)
        else:
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def safe_text(text: str) -> str:
    """`text` with lone surrogates written as the characters `\\udcXX`: printable, valid UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[str]:
    """The lines of a UTF-8 text file, each with its "\n"; a BOM before line 1 is dropped.

    Lines end at "\n", "\r\n" or "\r" (as in any text file) and nowhere else: `str.splitlines` also
    splits at U+2028, U+0085, form feeds and other characters that are legal inside a JSON string or
    a caption. A file that cannot be opened or is not UTF-8 raises `error` naming the file (and the
    line and byte).
    """
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as err:
        raise error(f"{safe_text(str(path))}: cannot read ({err.strerror})") from None
    with f:
        try:
            yield from f
        except UnicodeDecodeError:
            raise error(f"{safe_text(str(path))}:{_not_utf8(path)}; save the file as UTF-8") from None


def _not_utf8(path: str | os.PathLike) -> str:
    """Where the first byte that is not UTF-8 is: "LINE: ... byte N of the line" (the file is read again)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        ends = list(re.finditer(rb"\r\n|\r|\n", data[: err.start]))
        line_start = ends[-1].end() if ends else 0
        return (
            f"{len(ends) + 1}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte "
            f"{err.start - line_start + 1} of the line: {err.reason})"
        )
    return " not UTF-8 text"
