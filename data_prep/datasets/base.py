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
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import text as T
from data_prep.errors import SettingError
from data_prep.images import check_images
from data_prep.languages import Language
from data_prep.manifest import Record, relative_image_path
from data_prep.report import Problem
from data_prep.textio import SURROGATES

log = logging.getLogger(__name__)

# Longest caption kept, in characters: a one- or two-sentence caption is well under it.
MAX_CAPTION_CHARS = 500


@dataclass
class RawImage:
    image_id: str
    path: Path
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

    A caption longer than `max_caption_chars` characters (after normalization; None: no limit) is
    skipped as `long_caption`: such text is mostly rows run together or a pasted paragraph, and
    training would cut it at the LM's length limit anyway.
    """
    if max_caption_chars is not None and max_caption_chars < 1:
        raise SettingError(
            f"max_caption_chars must be at least 1 (or None: no limit), got {max_caption_chars}"
        )
    problems = list(raw.problems)
    counts = {
        "images_read": len(raw.images),
        "captions_read": len(raw.captions),
        "images_skipped": 0,
        "captions_skipped": 0,
        "captions_fixed": 0,
    }

    def skip_caption(kind: str, c: RawCaption, msg: str) -> None:
        problems.append(Problem(kind, c.file, c.where, msg))
        counts["captions_skipped"] += 1

    images: dict[str, RawImage] = {}
    for im in raw.images:
        if im.image_id in images:
            problems.append(
                Problem("duplicate_image_id", im.file, im.where, f"image id {im.image_id!r} seen before")
            )
            counts["images_skipped"] += 1
            continue
        images[im.image_id] = im

    caps: dict[str, list[tuple[str, str]]] = {i: [] for i in images}
    seen_caption_ids: set[str] = set()
    for c in raw.captions:
        if c.caption_id in seen_caption_ids:
            skip_caption("duplicate_caption_id", c, f"caption id {c.caption_id!r} seen before")
            continue
        seen_caption_ids.add(c.caption_id)
        if c.image_id not in images:
            skip_caption(
                "unknown_image", c, f"caption {c.caption_id!r} points at unknown image {c.image_id!r}"
            )
            continue
        if not isinstance(c.text, str) or not any(ch.isalnum() for ch in c.text):
            # Whitespace or punctuation only ("`", "]" occur in UIT-ViIC): nothing to learn from.
            skip_caption("empty_caption", c, f"caption {c.caption_id!r} has no words: {c.text!r}")
            continue
        if SURROGATES.search(c.text):
            # JSON allows "\ud800" escapes that stand for no character; no tokenizer can read them
            skip_caption("invalid_text", c, f"caption {c.caption_id!r} holds a lone surrogate: {c.text!r}")
            continue
        if not T.is_nfc(c.text):
            problems.append(
                Problem("nfd_text", c.file, c.where, f"caption {c.caption_id!r} not NFC", "fixed")
            )
            counts["captions_fixed"] += 1
        text = language.normalize(c.text)
        stray = language.unexpected_scripts(text)
        if stray:
            skip_caption(
                "unexpected_script",
                c,
                f"caption {c.caption_id!r} has {'/'.join(sorted(stray))} letters: {text!r}",
            )
            continue
        if max_caption_chars is not None and len(text) > max_caption_chars:
            skip_caption(
                "long_caption",
                c,
                f"caption {c.caption_id!r} has {len(text)} characters, over the limit of "
                f"{max_caption_chars}: {text[:60]!r}...",
            )
            continue
        caps[c.image_id].append((c.caption_id, text))

    for image_id, pairs in caps.items():
        im = images[image_id]
        if pairs and im.split is None:
            problems.append(
                Problem(
                    "no_split",
                    im.file,
                    im.where,
                    f"image {image_id!r} is in no split; {len(pairs)} caption(s) dropped",
                )
            )
            counts["images_skipped"] += 1
            counts["captions_skipped"] += len(pairs)
            pairs.clear()
        elif not pairs:
            problems.append(
                Problem("no_captions", im.file, im.where, f"image {image_id!r} has no usable caption")
            )
            counts["images_skipped"] += 1
    kept = [images[i] for i, pairs in caps.items() if pairs]

    if check:
        bad = check_images([im.path for im in kept])
        survivors = []
        for im in kept:
            if im.path in bad:
                kind, msg = bad[im.path]
                n = len(caps[im.image_id])
                problems.append(
                    Problem(kind, im.file, im.where, f"image {im.image_id!r}: {msg}; {n} caption(s) dropped")
                )
                counts["images_skipped"] += 1
                counts["captions_skipped"] += n
            else:
                survivors.append(im)
        kept = survivors

    val = (
        val_images([im.image_id for im in kept if im.split == "train"], val_fraction, seed)
        if val_fraction
        else set()
    )
    records = []
    for im in kept:
        pairs = caps[im.image_id]
        records.append(
            Record(
                image_id=im.image_id,
                image=relative_image_path(im.path, manifest_path),
                split="val" if im.image_id in val else im.split,
                captions=tuple(t for _, t in pairs),
                caption_ids=tuple(i for i, _ in pairs),
            )
        )
    counts["images"] = len(records)
    counts["captions"] = sum(len(r.captions) for r in records)
    return records, problems, counts


def source_name(path: Path, root: Path) -> str:
    """A short name for reports: `path` relative to the dataset root when inside it."""
    try:
        return Path(os.path.relpath(path, root)).as_posix() if path.is_relative_to(root) else str(path)
    except ValueError:
        return str(path)
