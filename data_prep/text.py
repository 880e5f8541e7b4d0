"""Language-independent text pieces: pure functions that language entries compose.

Nothing here knows a language. Each function does one thing and never changes
the letters of a word; a language's normalizer is a chain of these (see
`data_prep.languages`).
"""

from __future__ import annotations

import re
import unicodedata

# Unicode format characters that carry no meaning in captions. ZWJ/ZWNJ
# (U+200C/U+200D) are deliberately absent: Persian and Indic scripts need them.
_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u2060\u00ad"), None)

_WS = re.compile(r"\s+")
# A space before closing punctuation, or after an opening bracket, is a typo.
_SPACE_BEFORE_CLOSE = re.compile(r"\s+([,.!?;:%)\]}»…])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[{«])\s+")
# "triệu(rẻ)" -> "triệu (rẻ)"
_NO_SPACE_BEFORE_OPEN = re.compile(r"(?<=[^\W_])([(\[{«])")
# "a,b" -> "a, b", but not between digits: "2,5" is a Vietnamese/European decimal.
_NO_SPACE_AFTER = re.compile(r"([,;:])(?=[^\W\d_])")
# Punctuation between two digits belongs to a number ("2,5", "10.000", "3/4").
_NUMBER_PUNCT = re.compile(r"(?<=\d)[.,/:](?=\d)")


def nfc(text: str) -> str:
    """Compose to Unicode NFC (decomposed input, e.g. from macOS or some IMEs, is common)."""
    return unicodedata.normalize("NFC", text)


def is_nfc(text: str) -> bool:
    """True when `text` is already NFC."""
    return unicodedata.is_normalized("NFC", text)


def clean_whitespace(text: str) -> str:
    """Drop invisible format characters and control characters, collapse all Unicode whitespace."""
    text = text.translate(_INVISIBLE)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return _WS.sub(" ", text).strip()


def tidy_punctuation(text: str) -> str:
    """Fix punctuation spacing the way Latin-script languages write it (no space before `,.!?;:`)."""
    text = _SPACE_BEFORE_CLOSE.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    text = _NO_SPACE_BEFORE_OPEN.sub(r" \1", text)
    return _NO_SPACE_AFTER.sub(r"\1 ", text)


def strip_punctuation(text: str, keep: str = "") -> str:
    """Replace every Unicode punctuation character by a space, except those in `keep`.

    Punctuation inside a number ("2,5", "10.000") is kept so numbers stay one token.
    """
    protected = _NUMBER_PUNCT.sub(lambda m: "\x00" + str(ord(m.group())) + "\x00", text)
    out = []
    for ch in protected:
        cat = unicodedata.category(ch)
        out.append(" " if (cat.startswith("P") or cat.startswith("S")) and ch not in keep else ch)
    joined = "".join(out)
    return re.sub(r"\x00(\d+)\x00", lambda m: chr(int(m.group(1))), joined)


def whitespace_tokens(text: str, keep: str = "") -> list[str]:
    """Lowercase, drop punctuation, split on whitespace: the default metric tokenization."""
    return strip_punctuation(text.lower(), keep=keep).split()


def scripts(text: str) -> set[str]:
    """The scripts of the letters in `text`, from Unicode names ("LATIN", "CJK", "CYRILLIC" ...)."""
    found = set()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "UNKNOWN")
            found.add(name.split(" ", 1)[0])
    return found
