"""WebDataset shards, as img2dataset writes them: tar files of samples, each sample the members
``<key>.jpg`` (or .png, .webp ...), ``<key>.txt`` (its caption) and ``<key>.json`` (metadata)::

    data/00000.tar      000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    data/00001.tar      ...

The source is one shard, a folder of shards (every ``*.tar`` in it) or a brace pattern
(``data/{00000..00127}.tar``). Shards are streamed with the `webdataset` package; the images stay in
them: each manifest record names its shard and the image's member, and every later stage reads that
member's bytes in place (`data_prep.images.TarMember`). Captions come from the ``.txt`` member, or with
``--option caption_key=NAME`` from that key of the ``.json`` member (a list there is several captions of the image). All samples go to split ``train``
(``--option split=test`` for a held-out set; ``--val-fraction`` carves a validation split).

Reported by name: a shard that is missing, compressed or cut short; a sample without an image; a caption
member that cannot be read. An image without a usable caption is skipped and counted (``no_captions``),
and a corrupt image is found when images are checked, as in every adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage, canonical_split
from data_prep.errors import SourceNotFoundError
from data_prep.images import IMAGE_SUFFIXES, TarMember, shard_problem

_IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


def _shards(source: Path) -> list[Path]:
    """The shard files `source` names: itself, the .tar files in a folder, or a brace pattern's expansion."""
    if source.is_dir():
        shards = sorted(p for p in source.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
        if not shards:
            raise SourceNotFoundError(f"no .tar shards in {source}")
        return shards
    from webdataset.shardlists import expand_urls

    return [Path(u) for u in expand_urls(str(source))]


def _samples(shard: Path, out: AdapterOutput) -> Iterator[dict]:
    """The shard's samples as webdataset groups them ({"__key__", suffix: bytes, ...}); what stops the
    stream (a tar cut short) is reported, and the samples read before it are kept."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    # The stream is opened here, not by webdataset's URL opener: a source is a local file, never a command.
    with open(shard, "rb") as stream:
        files = tar_file_expander([{"url": str(shard), "stream": stream}], handler=keep_going)
        yield from group_by_keys(files, lcase=False, handler=keep_going)
    # webdataset hands a tar cut short to the handler twice (reading the member, then the next header)
    messages = [str(exn.args[0] if exn.args else exn).split(" @ ")[0] for exn in errors]  # " @ <stream>"
    for message in dict.fromkeys(messages):
        out.problem(
            "unreadable_shard", shard.name, "-", f"{shard}: {message}; the samples after it are not read"
        )


def _suffix_is(suffix: str, *wanted: str) -> bool:
    return suffix.rsplit(".", 1)[-1].lower() in wanted


def _captions(sample: dict, key: str, caption_key: str | None, file: str, out: AdapterOutput) -> list:
    """The sample's captions (any JSON values: build_records judges them); none when it has none."""
    kind = "json" if caption_key else "txt"
    member = next((s for s in sample if not s.startswith("__") and s.lower() == kind), None)
    if member is None:
        return []  # the image is then skipped as no_captions
    name = f"{key}.{member}"
    try:
        text = sample[member].decode("utf-8")
    except UnicodeDecodeError as err:
        out.problem(
            "invalid_text", file, key, f"{name} is not UTF-8 text (byte {err.start + 1}: {err.reason})"
        )
        return []
    if not caption_key:
        return [text]
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        out.problem("bad_entry", file, key, f"{name}: invalid JSON ({err.msg})")
        return []
    if not isinstance(meta, dict) or caption_key not in meta:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        out.problem("bad_entry", file, key, f"{name} has no {caption_key!r} key ({keys})")
        return []
    value = meta[caption_key]
    return value if isinstance(value, list) else [value]  # a list: several captions of the image


@register_adapter("webdataset", language="generic", patterns=True)
def read_webdataset(source: Path, *, caption_key: str | None = None, split: str = "train") -> AdapterOutput:
    """WebDataset / img2dataset tar shards (a .tar, a folder of them, or data/{00000..00127}.tar); images read in place."""
    shards = _shards(Path(source))
    if not any(s.exists() for s in shards):
        raise SourceNotFoundError(
            f"no shard of {source} exists (looked for {len(shards)} file(s), the first {shards[0]})"
        )
    out = AdapterOutput(meta={"source_files": [s.name for s in shards]})
    split = canonical_split(split)
    for shard in shards:
        problem = shard_problem(shard)
        if problem is not None:
            kind = "missing_file" if problem[0] == "missing_image" else "unreadable_shard"
            out.problem(kind, shard.name, "-", f"{problem[1]}; its samples are not read")
            continue
        absolute = Path(os.path.abspath(shard))
        for sample in _samples(shard, out):
            key = sample["__key__"]
            images = sorted(s for s in sample if not s.startswith("__") and _suffix_is(s, *_IMAGE_EXTENSIONS))
            if not images:
                has = ", ".join(sorted(s for s in sample if not s.startswith("__")))
                out.problem(
                    "missing_image", shard.name, key, f"sample {key!r} has no image member (only {has})"
                )
                continue
            out.images.append(
                RawImage(key, TarMember(absolute, f"{key}.{images[0]}"), split, shard.name, key)
            )
            captions = _captions(sample, key, caption_key, shard.name, out)
            for i, text in enumerate(captions):
                caption_id = key if len(captions) == 1 else f"{key}#{i}"
                out.captions.append(RawCaption(caption_id, key, text, shard.name, key))
    return out
