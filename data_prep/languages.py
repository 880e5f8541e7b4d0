"""The language registry: one entry per language, built from small pure pieces.

A `Language` holds
- a normalizer (text -> text; NFC, whitespace, punctuation spacing, language rules),
- segmenters by mode (a batch function list[str] -> list[str]; "none" is always there),
- metric levels (level -> the segmentation mode applied before metric tokenization),
- the scripts its letters are expected in (used to flag stray captions),
- whether its captions start with a capital letter (generated captions are capitalized to match).

Adding a language is one call::

    register_language(Language(
        code="th", name="Thai",
        normalizer=my_thai_normalize,
        segmenters={"word": my_thai_word_segmenter},
        metric_levels={"syllable": "none", "word": "word", "char": "char"},
        scripts=frozenset({"THAI"}),
        capitalize_first=False,  # Thai has no letter case
    ))

Any code without an entry gets a generic, Unicode-aware fallback that carries
that code: NFC and whitespace cleanup only, whitespace tokens for metrics, no
punctuation rules (French puts a space before "!"), no script check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from data_prep import text as T
from data_prep import vietnamese
from data_prep.errors import SettingError

log = logging.getLogger(__name__)

Normalizer = Callable[[str], str]
Segmenter = Callable[[list[str]], list[str]]


def generic_normalize(text: str) -> str:
    """NFC and whitespace cleanup: safe for every script."""
    return T.clean_whitespace(T.nfc(text))


def latin_normalize(text: str) -> str:
    """Generic normalization plus Latin-script punctuation spacing."""
    return T.tidy_punctuation(generic_normalize(text))


def _no_segmentation(texts: list[str]) -> list[str]:
    return list(texts)


def _char_segmentation(texts: list[str]) -> list[str]:
    # One token per non-space character: the fallback for scripts written without spaces.
    return [" ".join(ch for ch in t if not ch.isspace()) for t in texts]


_METRIC_DEFAULT = {"syllable": "none", "word": "none", "char": "char"}


@dataclass(frozen=True)
class Language:
    """One language: how its captions are normalized, segmented and tokenized for metrics."""

    code: str
    name: str
    normalizer: Normalizer = field(default=generic_normalize, compare=False, repr=False)
    # Extra segmentation modes; "none" and "char" exist for every language.
    segmenters: Mapping[str, Segmenter] = field(default_factory=dict, compare=False, repr=False)
    # Metric level -> segmentation mode used before tokenizing ("syllable" = whitespace tokens).
    metric_levels: Mapping[str, str] = field(default_factory=lambda: dict(_METRIC_DEFAULT), compare=False)
    # Unicode script names its letters should use ("LATIN"); empty means do not check.
    scripts: frozenset[str] = frozenset()
    # What a word segmenter puts between the syllables of one word.
    joiner: str = "_"
    # Generated captions start with a capital letter (`vicap.generate.postprocess`); False keeps the
    # LM's own case, which suits scripts without case and languages the entry knows nothing about.
    capitalize_first: bool = False
    # Describes the segmenter for metric protocols, e.g. "underthesea 9.5.0".
    segmenter_version: Callable[[], str] = field(default=lambda: "", compare=False, repr=False)

    def __post_init__(self) -> None:
        modes = self.modes
        for level, mode in self.metric_levels.items():
            if mode not in modes:
                raise ValueError(f"language {self.code!r}: metric level {level!r} uses unknown mode {mode!r}")

    @property
    def modes(self) -> tuple[str, ...]:
        """Segmentation modes this language supports."""
        return ("none", "char", *(m for m in self.segmenters if m not in ("none", "char")))

    @property
    def normalizer_name(self) -> str:
        """The normalizer's dotted name, as manifests and metric protocols record it."""
        return f"{self.normalizer.__module__}.{self.normalizer.__qualname__}"

    def normalize(self, text: str, lowercase: bool = False) -> str:
        """Normalize one caption; never changes which words it has."""
        out = self.normalizer(text)
        return out.lower() if lowercase else out

    def _segmenter(self, mode: str) -> Segmenter:
        if mode in self.segmenters:
            return self.segmenters[mode]
        if mode == "none":
            return _no_segmentation
        if mode == "char":
            return _char_segmentation
        raise SettingError(
            f"language {self.code!r} has no segmentation mode {mode!r}; known: {', '.join(self.modes)}"
        )

    def segment_many(self, texts: Iterable[str], mode: str = "none") -> list[str]:
        """Segment a batch of (normalized) texts."""
        return self._segmenter(mode)(list(texts))

    def segment(self, text: str, mode: str = "none") -> str:
        """Segment one text: "none" returns it as is, "word" joins a word's syllables by the joiner."""
        return self.segment_many([text], mode)[0]

    def desegment(self, text: str) -> str:
        """Segmented text back to display text: 'đàn_ông .' -> 'đàn ông.'."""
        return self.normalize(text.replace(self.joiner, " ") if self.joiner else text)

    def metric_tokens_many(self, texts: Iterable[str], level: str = "syllable") -> list[list[str]]:
        """Metric tokens for a batch: lowercased, punctuation removed, split at `level`."""
        if level not in self.metric_levels:
            raise SettingError(
                f"language {self.code!r} has no metric level {level!r}; known: {', '.join(self.metric_levels)}"
            )
        mode = self.metric_levels[level]
        # Segment before lowercasing: segmenters use capitalization (names).
        return self.tokens_of_segmented(self.segment_many([self.normalize(t) for t in texts], mode), mode)

    def tokens_of_segmented(self, segmented: Iterable[str], mode: str) -> list[list[str]]:
        """Metric tokens of texts already segmented with `mode` (lets callers segment once)."""
        keep = self.joiner if mode not in ("none", "char") else ""
        return [T.whitespace_tokens(t, keep=keep) for t in segmented]

    def metric_tokens(self, text: str, level: str = "syllable") -> list[str]:
        """Metric tokens for one text (see `metric_tokens_many`)."""
        return self.metric_tokens_many([text], level)[0]

    def protocol(self, level: str = "syllable") -> dict[str, str]:
        """What a metric at `level` was computed on, for reports."""
        mode = self.metric_levels[level]
        return {
            "language": self.code,
            "level": level,
            "normalizer": self.normalizer_name,
            "segmentation": mode,
            "segmenter": self.segmenter_version() if mode not in ("none", "char") else "",
            "lowercase": "yes",
            "punctuation": "removed (kept inside numbers)",
        }

    def unexpected_scripts(self, text: str) -> set[str]:
        """Scripts in `text` that this language does not expect (empty when unchecked)."""
        if not self.scripts:
            return set()
        return T.scripts(text) - self.scripts


LANGUAGES: dict[str, Language] = {}


def register_language(lang: Language, *, overwrite: bool = False) -> Language:
    """Add `lang` to the registry under its code."""
    if lang.code in LANGUAGES and not overwrite:
        raise ValueError(f"language {lang.code!r} is already registered")
    LANGUAGES[lang.code] = lang
    return lang


def get_language(code: str) -> Language:
    """The registered language, or a generic Unicode-aware entry carrying `code`."""
    if code in LANGUAGES:
        return LANGUAGES[code]
    log.info("no language entry for %r; using the generic fallback", code)
    return Language(code=code, name=f"generic ({code})")


def normalize(text: str, lang: str, lowercase: bool = False) -> str:
    """Normalize `text` with language `lang`'s normalizer."""
    return get_language(lang).normalize(text, lowercase=lowercase)


def segment(text: str, lang: str, mode: str = "none") -> str:
    """Segment `text` with language `lang`'s segmenter for `mode`."""
    return get_language(lang).segment(text, mode)


def segment_many(texts: Iterable[str], lang: str, mode: str = "none") -> list[str]:
    """Segment a batch of texts with language `lang`."""
    return get_language(lang).segment_many(texts, mode)


register_language(
    Language(
        code="vi",
        name="Vietnamese",
        normalizer=vietnamese.normalize,
        segmenters={"word": vietnamese.segment_words},
        metric_levels={"syllable": "none", "word": "word", "char": "char"},
        scripts=frozenset({"LATIN"}),
        capitalize_first=True,
        segmenter_version=vietnamese.segmenter_version,
    )
)
register_language(
    Language(
        code="en",
        name="English",
        normalizer=latin_normalize,
        segmenters={"word": _no_segmentation},  # English words are already space-separated
        scripts=frozenset({"LATIN"}),
        capitalize_first=True,
    )
)
register_language(Language(code="generic", name="generic (any language)"))
