"""What adapters produce, and the one place that turns it into manifest records.

An adapter only *reads* a dataset's own files into `RawImage`/`RawCaption`
lists (plus problems it met while parsing). Everything shared (duplicate ids,
unknown images, empty or stray captions, NFC, normalization, image checks,
the validation split) happens once, in `build_records`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_prep import text as T
from data_prep.errors import SettingError
from data_prep.images import TarMember, check_images
from data_prep.languages import Language, get_language
from data_prep.manifest import Record, relative_image_path
from data_prep.report import Problem
from data_prep.textio import SURROGATES

log = logging.getLogger(__name__)

# Longest caption kept, in characters: a one- or two-sentence caption is well under it.
MAX_CAPTION_CHARS = 500


@dataclass
class RawImage:
    image_id: str
    path: (
        Path | TarMember | None
    )  # a file, a member of a tar shard (webdataset), None: a sentence of a text corpus
    split: str | None  # None: the dataset's split files do not list it (reported, skipped)
    file: str  # the source file that named this image, for reports
    where: str  # line number or id inside that file


@dataclass
class RawCaption:
    caption_id: str
    image_id: str
    text: object  # not yet validated: may be None or a number in broken files
    file: str
    where: str
    source: object = None  # a sentence pair's source-language sentence (not yet validated); None: no pair


@dataclass
class AdapterOutput:
    images: list[RawImage] = field(default_factory=list)
    captions: list[RawCaption] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def problem(self, kind: str, file: str, where: str, message: str, action: str = "skipped") -> None:
        """Record a problem met while reading (the item is not emitted)."""
        self.problems.append(Problem(kind, file, where, message, action))


AdapterFn = Callable[..., AdapterOutput]


@dataclass(frozen=True)
class Adapter:
    """A registered dataset reader."""

    name: str
    fn: AdapterFn
    language: str  # the dataset's language when the user names none
    doc: str
    patterns: bool = False  # the source may be a brace pattern of files, which the adapter expands and checks


# Split names datasets use for the same thing; manifests use train / val / test.
SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val", "restval": "train", "training": "train"}


def canonical_split(name: str) -> str:
    """'dev' -> 'val', 'restval' -> 'train'; other names pass through (lowercased)."""
    name = name.strip().lower()
    return SPLIT_ALIASES.get(name, name)


def val_images(image_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A deterministic by-image subset: the `fraction` of ids with the smallest seeded hash.

    Hash order (not a shuffled list) keeps an image's assignment stable when others are added.
    """
    if not 0.0 <= fraction < 1.0:
        raise SettingError(f"val_fraction must be in [0, 1), got {fraction}")
    k = round(len(image_ids) * fraction)
    order = sorted(image_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(order[:k])


@dataclass
class _Tally:
    """What `build_records` skipped or fixed, and why: problems and counts, kept together."""

    problems: list[Problem]
    counts: dict[str, int]

    def skip_caption(self, kind: str, c: RawCaption, msg: str) -> None:
        self.problems.append(Problem(kind, c.file, c.where, msg))
        self.counts["captions_skipped"] += 1

    def skip_image(self, kind: str, im: RawImage, msg: str, captions: int = 0) -> None:
        self.problems.append(Problem(kind, im.file, im.where, msg))
        self.counts["images_skipped"] += 1
        self.counts["captions_skipped"] += captions


def _unique_images(raw: AdapterOutput, tally: _Tally) -> dict[str, RawImage]:
    images: dict[str, RawImage] = {}
    for im in raw.images:
        if im.image_id in images:
            tally.skip_image("duplicate_image_id", im, f"image id {im.image_id!r} seen before")
        else:
            images[im.image_id] = im
    return images


def _caption_text(
    c: RawCaption, language: Language, max_chars: int | None, tally: _Tally, what: str = "caption"
) -> str | None:
    """The caption normalized, or None (and a problem) when it cannot be used. `what` names the text
    in messages ("source sentence of" for a sentence pair's source side)."""
    name = f"{what} {c.caption_id!r}"
    if not isinstance(c.text, str) or not any(ch.isalnum() for ch in c.text):
        # Whitespace or punctuation only ("`", "]" occur in UIT-ViIC): nothing to learn from.
        tally.skip_caption("empty_caption", c, f"{name} has no words: {c.text!r}")
        return None
    if SURROGATES.search(c.text):
        # JSON allows "\ud800" escapes that stand for no character; no tokenizer can read them
        tally.skip_caption("invalid_text", c, f"{name} holds a lone surrogate: {c.text!r}")
        return None
    if not T.is_nfc(c.text):
        tally.problems.append(Problem("nfd_text", c.file, c.where, f"{name} not NFC", "fixed"))
        tally.counts["captions_fixed"] += 1
    text = language.normalize(c.text)
    stray = language.unexpected_scripts(text)
    if stray:
        letters = "/".join(sorted(stray))
        tally.skip_caption("unexpected_script", c, f"{name} has {letters} letters: {text!r}")
        return None
    if max_chars is not None and len(text) > max_chars:
        tally.skip_caption(
            "long_caption",
            c,
            f"{name} has {len(text)} characters, over the limit of {max_chars}: {text[:60]!r}...",
        )
        return None
    return text


def _captions_per_image(
    raw: AdapterOutput, images: dict[str, RawImage], language: Language, max_chars: int | None, tally: _Tally
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """image id -> [(caption id, normalized text)] of the usable captions, and a sentence pair's
    image id -> its source sentence, normalized in the pairs' source language (`raw.meta`)."""
    caps: dict[str, list[tuple[str, str]]] = {i: [] for i in images}
    sources: dict[str, str] = {}
    source_language = get_language(raw.meta["source_language"]) if "source_language" in raw.meta else None
    seen: set[str] = set()
    # a text corpus's normalized sentence, or a pair's (source, target), -> where it was first seen
    sentences: dict[str | tuple[str, str], str] = {}
    for c in raw.captions:
        if c.caption_id in seen:
            tally.skip_caption("duplicate_caption_id", c, f"caption id {c.caption_id!r} seen before")
            continue
        seen.add(c.caption_id)
        if c.image_id not in images:
            tally.skip_caption(
                "unknown_image", c, f"caption {c.caption_id!r} points at unknown image {c.image_id!r}"
            )
            continue
        text = _caption_text(c, language, max_chars, tally)
        source = None
        if text is not None and c.source is not None:  # a sentence pair: its source side is checked too
            source = _caption_text(
                replace(c, text=c.source), source_language, max_chars, tally, "source sentence of"
            )
            if source is None:
                continue
        if text is not None and images[c.image_id].path is None:  # a sentence of a text corpus
            key = text if source is None else (source, text)
            if key in sentences:
                what = "sentence" if source is None else "pair"
                tally.skip_caption("duplicate_text", c, f"the same {what} as {sentences[key]}: {text[:60]!r}")
                continue
            sentences[key] = f"{c.file} {c.where}"
        if text is not None:
            caps[c.image_id].append((c.caption_id, text))
            if source is not None:
                sources[c.image_id] = source
    return caps, sources


def _images_to_keep(
    images: dict[str, RawImage], caps: dict[str, list[tuple[str, str]]], check: bool, tally: _Tally
) -> list[RawImage]:
    """Images with a split, at least one usable caption, and (when `check`) a readable file."""
    kept = []
    for image_id, pairs in caps.items():
        im = images[image_id]
        if not pairs and im.path is None:  # a sentence whose only text was skipped, and reported so
            tally.counts["images_skipped"] += 1
        elif pairs and im.split is None:
            msg = f"image {image_id!r} is in no split; {len(pairs)} caption(s) dropped"
            tally.skip_image("no_split", im, msg, captions=len(pairs))
        elif not pairs:
            tally.skip_image("no_captions", im, f"image {image_id!r} has no usable caption")
        else:
            kept.append(im)
    if not check:
        return kept
    bad = check_images([im.path for im in kept if im.path is not None])
    for im in kept:
        if im.path in bad:
            kind, msg = bad[im.path]
            n = len(caps[im.image_id])
            tally.skip_image(kind, im, f"image {im.image_id!r}: {msg}; {n} caption(s) dropped", captions=n)
    return [im for im in kept if im.path not in bad]


def build_records(
    raw: AdapterOutput,
    language: Language,
    manifest_path: Path,
    *,
    check: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_caption_chars: int | None = MAX_CAPTION_CHARS,
) -> tuple[list[Record], list[Problem], dict[str, int]]:
    """Validate and normalize adapter output into records; every dropped item becomes a Problem.

    In order: duplicate image ids, then each caption (duplicate or dangling ids, no words, lone
    surrogates, NFD text fixed, unexpected scripts, over `max_caption_chars` characters after
    normalization, None: no limit), then images (no split, no usable caption, an unreadable file), then
    the by-image validation split. A caption over the length limit is skipped as `long_caption`: such
    text is mostly rows run together or a pasted paragraph, and training would cut it anyway.
    """
    if max_caption_chars is not None and max_caption_chars < 1:
        raise SettingError(
            f"max_caption_chars must be at least 1 (or None: no limit), got {max_caption_chars}"
        )
    counts = dict.fromkeys(("images_skipped", "captions_skipped", "captions_fixed"), 0)
    tally = _Tally(
        list(raw.problems), {"images_read": len(raw.images), "captions_read": len(raw.captions), **counts}
    )
    images = _unique_images(raw, tally)
    caps, sources = _captions_per_image(raw, images, language, max_caption_chars, tally)
    kept = _images_to_keep(images, caps, check, tally)
    train_ids = [im.image_id for im in kept if im.split == "train"]
    val = val_images(train_ids, val_fraction, seed) if val_fraction else set()
    records = [
        Record(
            image_id=im.image_id,
            image=""  # a sentence of a text corpus has no image
            if im.path is None
            else relative_image_path(
                im.path.shard if isinstance(im.path, TarMember) else im.path, manifest_path
            ),
            split="val" if im.image_id in val else im.split,
            captions=tuple(t for _, t in caps[im.image_id]),
            caption_ids=tuple(i for i, _ in caps[im.image_id]),
            member=im.path.name if isinstance(im.path, TarMember) else None,
            source=sources.get(im.image_id),
        )
        for im in kept
    ]
    tally.counts["images"] = len(records)
    tally.counts["captions"] = sum(len(r.captions) for r in records)
    return records, tally.problems, tally.counts


def source_name(path: Path, root: Path) -> str:
    """A short name for reports: `path` relative to the dataset root when inside it."""
    try:
        return Path(os.path.relpath(path, root)).as_posix() if path.is_relative_to(root) else str(path)
    except ValueError:
        return str(path)
