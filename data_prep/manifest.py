"""The canonical manifest: one JSONL file every later stage reads.

Line 1 is a header::

    {"vicap_manifest": 1, "dataset": "ktvic", "language": "vi", ...extra meta}

every later line is one image::

    {"image_id": "42", "image": "train-images/00042.jpg", "split": "train",
     "captions": ["..."], "caption_ids": ["7"]}

A sentence pair (the `text` adapter with a source column) has no image (``"image": ""``), its
target-language sentence as its one caption, and the source-language sentence, normalized for the
CLIP text tower, under "source": ``{"image": "", "captions": ["Một con mèo."], "source": "A cat.", ...}``.

An image kept inside a tar shard (webdataset) names the shard and, under "member", its name in the
shard: ``{"image": "shards/00003.tar", "member": "000030042.jpg", ...}``.

`image` is relative to the manifest's directory (absolute when no relative path
exists, e.g. another drive), so a dataset folder can be moved with its manifest.
A file name that is not valid UTF-8 is written with `\\udcXX` JSON escapes (see
`data_prep/textio.py`), which read back as the same name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_prep.errors import (
    ManifestError,  # noqa: F401  (raised here; importable from here too)
    SourceNotFoundError,
)
from data_prep.images import TarMember
from data_prep.textio import json_text, text_lines, write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_RECORD_KEYS = ("image_id", "image", "split", "captions", "caption_ids")


@dataclass(frozen=True, slots=True)  # slots: one per image, millions of them in a large manifest
class Record:
    """One image with its captions."""

    image_id: str
    image: str
    split: str
    captions: tuple[str, ...]
    caption_ids: tuple[str, ...]
    member: str | None = None  # the image's name inside the tar shard `image`, when it is in one
    source: str | None = None  # a sentence pair's source-language sentence (its caption is the target)

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_ids):
            raise ValueError(
                f"image {self.image_id!r}: {len(self.captions)} captions but {len(self.caption_ids)} caption_ids"
            )

    def to_dict(self) -> dict:
        row = {"image_id": self.image_id, "image": self.image}
        if self.member is not None:
            row["member"] = self.member
        row |= {"split": self.split, "captions": list(self.captions), "caption_ids": list(self.caption_ids)}
        if self.source is not None:
            row["source"] = self.source
        return row


@dataclass
class Manifest:
    """A read manifest: its path, header meta and records."""

    path: Path
    meta: dict
    records: list[Record] = field(default_factory=list)
    # tar shard as named in records -> its resolved path: one Path per shard, not one per image
    _shards: dict[str, Path] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def language(self) -> str:
        return self.meta["language"]

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    def resolve_image(self, record: Record) -> Path | TarMember:
        """The record's image as an absolute path (links resolved where they resolve: a link loop is
        left for the image loader to report, not raised here), or the member of such a tar shard.
        Every stage reads images through this and `vicap.images.load_image`."""
        if record.member is None:
            return Path(os.path.realpath(self.path.parent / record.image))
        shard = self._shards.get(record.image)
        if shard is None:
            shard = self._shards[record.image] = Path(os.path.realpath(self.path.parent / record.image))
        return TarMember(shard, record.member)

    def split(self, name: str) -> list[Record]:
        """Records of split `name` (e.g. "train", "val", "test")."""
        return [r for r in self.records if r.split == name]

    @property
    def splits(self) -> dict[str, int]:
        """Image count per split, in first-seen order."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.split] = counts.get(r.split, 0) + 1
        return counts


def relative_image_path(image: str | os.PathLike, manifest_path: str | os.PathLike) -> str:
    """`image` relative to the manifest's directory, or absolute when they share no folder but the root.

    A path like "../../../data/x.jpg" would only break when the manifest moves, so it is not used.
    """
    image = Path(image).absolute()
    base = Path(manifest_path).absolute().parent
    try:
        common = Path(os.path.commonpath([image, base]))
    except ValueError:  # different drives on Windows
        return image.as_posix()
    if common == Path(common.anchor):
        return image.as_posix()
    return Path(os.path.relpath(image, base)).as_posix()


def write_manifest(path: str | os.PathLike, records: Iterable[Record], meta: dict) -> None:
    """Write header + records as JSONL (UTF-8, non-ASCII kept readable); atomic via a temp file."""
    for key in ("dataset", "language"):
        if not isinstance(meta.get(key), str):
            raise ValueError(f"manifest meta needs a string {key!r}, got {meta.get(key)!r}")
    # written_in: the folder relative image paths were written against, so a copy of the manifest
    # moved without its images (a run folder copied elsewhere) still finds them
    skip = ("vicap_manifest", "written_in")
    header = {
        "vicap_manifest": FORMAT_VERSION,
        **{k: v for k, v in meta.items() if k not in skip},
        "written_in": str(Path(path).absolute().parent),
    }
    lines = (json_text(row) + "\n" for row in [header, *(r.to_dict() for r in records)])
    write_atomic(path, lines)  # the old manifest, if any, stays as it was until the new one is complete


def _record_from(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _RECORD_KEYS if k not in obj]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
    for k in ("image_id", "image", "split"):
        if not isinstance(obj[k], str):
            raise ManifestError(f"{where}: {k!r} must be a string, got {obj[k]!r}")
    for k in ("captions", "caption_ids"):
        if not isinstance(obj[k], list) or not all(isinstance(x, str) for x in obj[k]):
            raise ManifestError(f"{where}: {k!r} must be a list of strings")
    if len(obj["captions"]) != len(obj["caption_ids"]):
        raise ManifestError(
            f"{where}: {len(obj['captions'])} captions but {len(obj['caption_ids'])} caption_ids"
        )
    member = obj.get("member")
    if member is not None and (not isinstance(member, str) or not member):
        raise ManifestError(f"{where}: 'member' must be a member's name in the tar shard, got {member!r}")
    source = obj.get("source")
    if source is not None and (not isinstance(source, str) or not source or len(obj["captions"]) != 1):
        raise ManifestError(
            f"{where}: 'source' must be a sentence pair's source sentence, with one caption (its target)"
        )
    return Record(
        obj["image_id"],
        obj["image"],
        obj["split"],
        tuple(obj["captions"]),
        tuple(obj["caption_ids"]),
        member,
        source,
    )


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"manifest not found: {path} (write one with `vicap prepare`)")
    meta: dict | None = None
    records: list[Record] = []
    for lineno, line in enumerate(text_lines(path, ManifestError), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: invalid JSON ({err.msg})") from None
        if meta is None:
            if not isinstance(obj, dict) or "vicap_manifest" not in obj:
                raise ManifestError(f"{where}: header missing (first line must hold 'vicap_manifest')")
            if obj["vicap_manifest"] != FORMAT_VERSION:
                raise ManifestError(f"{where}: unsupported manifest version {obj['vicap_manifest']!r}")
            for key in ("dataset", "language"):
                if not isinstance(obj.get(key), str):
                    raise ManifestError(f"{where}: header needs a string {key!r}")
            meta = obj
            continue
        records.append(_record_from(obj, where))
    if meta is None:
        raise ManifestError(f"{path}: empty file, header missing")
    return Manifest(path=path, meta=meta, records=_follow_images(path, meta, records))


def _follow_images(path: Path, meta: dict, records: list[Record]) -> list[Record]:
    """The records, with relative image paths made relative to where the manifest is now when it was
    moved without its images (a run folder copied elsewhere): the first relative image is missing from
    here but present where the manifest was written (`written_in`)."""
    written = meta.get("written_in")
    first = next((r.image for r in records if not Path(r.image).is_absolute()), None)
    if not isinstance(written, str) or first is None or Path(written) == path.absolute().parent:
        return records
    if (path.parent / first).exists() or not (Path(written) / first).exists():
        return records
    log.warning("%s: moved away from its images; its relative image paths are read from %s", path, written)
    return [
        r
        if Path(r.image).is_absolute()
        else replace(r, image=relative_image_path(Path(written) / r.image, path))
        for r in records
    ]
