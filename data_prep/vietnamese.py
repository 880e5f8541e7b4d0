"""Vietnamese text pieces: tone-mark placement, normalization, word segmentation.

Tone-mark convention
--------------------
Vietnamese writes the open-syllable vowel pairs ``oa``, ``oe`` and ``uy`` two
ways: with the tone mark on the second vowel (``hoà``, ``khoẻ``, ``thuỷ``) or
on the first (``hòa``, ``khỏe``, ``thủy``). The names "old" and "new" style
are used both ways round (Wikipedia calls ``hoà`` the new style, the project
issue calls it the old one), so vicap names them by example.

vicap writes **``hoà``, ``khoẻ``, ``thuỷ``** (mark on the second vowel) and
converts ``hòa``, ``khỏe``, ``thủy`` to it. Reasons, measured rather than
assumed:

- underthesea's word segmenter (a CRF trained on VLSP 2013) was trained on
  this form: it joins ``thuỷ_điện``, ``văn_hoá``, ``sức_khoẻ``, ``toà_án`` but
  leaves ``thủy điện``, ``văn hóa``, ``sức khỏe``, ``tòa án`` unjoined, even
  after its own token normalizer (which rewrites to ``hòa``). vicap therefore
  calls it with ``use_token_normalize=False`` on text already in this form.
- it is the majority form in the UIT-ViIC captions (27 of 31 such syllables).

Only syllables that *end* in ``oa``/``oe``/``uy`` are affected; with a final
consonant or a third vowel both styles agree (``hoàng``, ``quyết``, ``ngoài``,
``khuya``), and in ``qu`` + ``y`` the ``u`` belongs to the consonant
(``quý``). Nothing else about a word changes.

Word segmentation uses underthesea (imported lazily; its model ships in the
wheel and runs offline): ``"đàn ông"`` -> ``"đàn_ông"``.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from data_prep import text as T

# The five tone marks as combining characters: grave, acute, hook above, tilde, dot below.
_TONES = "\u0300\u0301\u0309\u0303\u0323"
_PAIRS = {"oa", "oe", "uy"}
_SYLLABLE = re.compile(r"[^\W\d_]+")
_VOWELS = set("aăâeêioôơuưy")


@functools.lru_cache(maxsize=512)
def _split_tone(ch: str) -> tuple[str, str]:
    """'à' -> ('a', '\\u0300'); 'ơ' -> ('ơ', ''). Case is kept."""
    decomposed = unicodedata.normalize("NFD", ch)
    tone = "".join(c for c in decomposed if c in _TONES)
    base = unicodedata.normalize("NFC", "".join(c for c in decomposed if c not in _TONES))
    return base, tone


def _with_tone(base: str, tone: str) -> str:
    return unicodedata.normalize("NFC", base + tone)


def _place_tone(match: re.Match[str]) -> str:
    syl = match.group()
    if len(syl) < 2:
        return syl
    (b1, t1), (b2, t2) = _split_tone(syl[-2]), _split_tone(syl[-1])
    # Only a toned final oa/oe/uy whose tone sits on the first vowel needs moving.
    if not t1 or t2 or (b1 + b2).lower() not in _PAIRS:
        return syl
    onset = syl[:-2]
    if onset and _split_tone(onset[-1])[0].lower() in _VOWELS:
        return syl  # a triphthong such as "oai"/"uya": its placement is fixed
    if (b1 + b2).lower() == "uy" and onset.lower().endswith("q"):
        return syl  # "quý": u is part of the consonant qu
    return onset + b1 + _with_tone(b2, t1)


def place_tones(text: str) -> str:
    """Move oa/oe/uy tone marks onto the second vowel: 'hòa' -> 'hoà', 'thúy' -> 'thuý'. Expects NFC."""
    return _SYLLABLE.sub(_place_tone, text)


def normalize(text: str) -> str:
    """NFC, whitespace cleanup, one tone-mark convention, punctuation spacing (no lowercasing)."""
    return T.tidy_punctuation(place_tones(T.clean_whitespace(T.nfc(text))))


def _underthesea_word_tokenize():
    try:
        from underthesea import word_tokenize
    except ImportError as err:  # pragma: no cover - underthesea is a declared dependency
        raise ImportError(
            "Vietnamese word segmentation needs underthesea: pip install 'underthesea>=6'"
        ) from err
    return word_tokenize


def segment_words(texts: Iterable[str]) -> list[str]:
    """Word-segment with underthesea; syllables of one word are joined by '_' ('đàn_ông').

    Its token normalizer is off: it would rewrite 'hoà' to 'hòa', the form its model segments worse.
    """
    word_tokenize = _underthesea_word_tokenize()
    return [
        word_tokenize(place_tones(t), format="text", use_token_normalize=False) if t.strip() else t
        for t in texts
    ]


def segmenter_version() -> str:
    """The underthesea version, recorded in metric protocols."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"underthesea {version('underthesea')}"
    except PackageNotFoundError:
        return "underthesea (not installed)"
