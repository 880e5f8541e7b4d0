"""Caption pairs at scale: token ids in a memory-mapped cache beside the features, built once per
(captions, tokenizer, segmentation, max_tokens), the same ids as tokenizing in place."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.images import image_key
from data_prep.manifest import Record, read_manifest, write_manifest
from vicap import data
from vicap.data import build_pairs, encode_captions, lm_text
from vicap.decoders import load_decoder
from vicap.features import FeatureStore
from vicap.recipe import DecoderConfig

CAPTIONS = {
    "a": ("Một con mèo đang ngủ.", "Con mèo nằm trên ghế."),
    "b": ("Hai con chó chạy trên bãi cỏ xanh.",),
    "c": ("Bức ảnh có một hình tròn màu đỏ.", "Hình vuông xanh ở giữa.", "Nền trắng."),
    "d": ("Ảnh không có đặc trưng.",),
    "e": ("Một chiếc xe buýt màu vàng.",),
}
SPLITS = {"a": "train", "b": "val", "c": "train", "d": "train", "e": "train"}


@pytest.fixture(scope="module")
def decoder(tiny_lm_dir: Path):
    return load_decoder(DecoderConfig(model=str(tiny_lm_dir)))


def _manifest(folder: Path, captions: dict = CAPTIONS):
    records = [
        Record(k, f"{k}.jpg", SPLITS[k], caps, tuple(f"{k}{i}" for i in range(len(caps))))
        for k, caps in captions.items()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / "m.jsonl", records, {"dataset": "t", "language": "vi"})
    return read_manifest(folder / "m.jsonl")


def _store(tmp_path: Path, manifest) -> FeatureStore:
    """A store with rows for every image but d (as if d could not be read), in another order."""
    keys = [image_key(manifest.resolve_image(r)) for r in manifest.records if r.image_id != "d"]
    return FeatureStore(
        tmp_path / "features" / "enc", None, {k: 10 + i for i, k in enumerate(reversed(keys))}
    )


def _expected(manifest, store, records, decoder, segment, max_tokens):
    """What build_pairs gave before the cache: every caption tokenized in place, in record order."""
    rows, texts = [], []
    for r in records:
        if store.has(manifest.resolve_image(r)):
            rows += [store.row(manifest.resolve_image(r))] * len(r.captions)
            texts += [lm_text(c, manifest.language, segment) for c in r.captions]
    return rows, encode_captions(texts, decoder, max_tokens)


@pytest.mark.parametrize(("segment", "max_tokens"), [("none", 40), ("word", 40), ("none", 4)])
def test_pairs_hold_the_ids_of_tokenizing_in_place(tmp_path, decoder, segment, max_tokens) -> None:
    manifest = _manifest(tmp_path)
    store = _store(tmp_path, manifest)
    for split in ("train", "val"):
        records = manifest.split(split)
        pairs = build_pairs(manifest, records, store, decoder, segment=segment, max_tokens=max_tokens)
        rows, ids = _expected(manifest, store, records, decoder, segment, max_tokens)
        assert [pairs[i] for i in range(len(pairs))] == list(zip(rows, ids, strict=True))
        assert pairs.skipped_images == (1 if split == "train" else 0)
    # per pair two integers in numpy arrays; the ids themselves are memory-mapped
    assert pairs.rows.dtype == pairs.captions.dtype == np.int64 and isinstance(pairs.tokens.ids, np.memmap)
    assert pairs.tokens.folder.parent == tmp_path / "features" / "captions"


def test_the_cache_is_built_once(tmp_path, decoder, monkeypatch) -> None:
    manifest = _manifest(tmp_path)
    store = _store(tmp_path, manifest)
    calls = []
    encode = data.encode_captions
    monkeypatch.setattr(data, "encode_captions", lambda t, *a: calls.append(len(t)) or encode(t, *a))
    first = build_pairs(manifest, manifest.split("train"), store, decoder, segment="none", max_tokens=40)
    assert calls == [8]  # every caption of the manifest, all splits, in one chunk
    again = build_pairs(manifest, manifest.split("val"), store, decoder, segment="none", max_tokens=40)
    moved = _manifest(tmp_path / "elsewhere")
    build_pairs(moved, moved.split("train"), _store(tmp_path, moved), decoder, segment="none", max_tokens=40)
    assert calls == [8]  # the same captions (images elsewhere): reused
    assert again.tokens.folder == first.tokens.folder


def _add_token(decoder):
    tok = decoder.tokenizer.__class__.from_pretrained(decoder.tokenizer.name_or_path)
    tok.add_tokens(["xyzzy"])
    return dataclasses.replace(decoder, tokenizer=tok)


@pytest.mark.parametrize(
    ("case", "captions", "change", "segment", "max_tokens"),
    [
        ("a caption changed", {**CAPTIONS, "b": ("Hai con chó.",)}, None, "none", 40),
        ("a caption moved to another image", {**CAPTIONS, "a": CAPTIONS["a"][:1], "e": (*CAPTIONS["e"], CAPTIONS["a"][1])}, None, "none", 40),
        ("segmentation", CAPTIONS, None, "word", 40),
        ("max_tokens", CAPTIONS, None, "none", 5),
        ("tokenizer", CAPTIONS, _add_token, "none", 40),
        ("eos", CAPTIONS, lambda d: dataclasses.replace(d, eos_token_id=1), "none", 40),
    ],
)  # fmt: skip
def test_any_change_to_the_ids_builds_a_new_cache(
    tmp_path, decoder, case, captions, change, segment, max_tokens
):
    manifest = _manifest(tmp_path)
    store = _store(tmp_path, manifest)
    old = build_pairs(manifest, manifest.records, store, decoder, segment="none", max_tokens=40)
    changed = _manifest(tmp_path / "new", captions)
    dec = change(decoder) if change else decoder
    store = _store(tmp_path, changed)
    new = build_pairs(changed, changed.records, store, dec, segment=segment, max_tokens=max_tokens)
    assert new.tokens.folder != old.tokens.folder, case
    rows, ids = _expected(changed, store, changed.records, dec, segment, max_tokens)
    assert [new[i] for i in range(len(new))] == list(zip(rows, ids, strict=True)), case


def _truncate_ids(folder: Path) -> None:
    ids = folder / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-4])


@pytest.mark.parametrize(
    ("case", "damage", "warned"),
    [
        ("ids cut short", _truncate_ids, True),
        ("meta.json missing (a build killed before its rename)", lambda f: (f / "meta.json").unlink(), False),
        ("meta.json not JSON", lambda f: (f / "meta.json").write_text("{"), True),
        ("offsets missing", lambda f: (f / "offsets.npy").unlink(), True),
        ("another format", lambda f: (f / "meta.json").write_text(json.dumps({"format": "x"})), True),
    ],
)
def test_a_damaged_cache_is_built_again(tmp_path, decoder, caplog, case, damage, warned) -> None:
    manifest = _manifest(tmp_path)
    store = _store(tmp_path, manifest)
    good = build_pairs(manifest, manifest.records, store, decoder, segment="none", max_tokens=40)
    expected = [good[i] for i in range(len(good))]
    damage(good.tokens.folder)
    again = build_pairs(manifest, manifest.records, store, decoder, segment="none", max_tokens=40)
    assert [again[i] for i in range(len(again))] == expected, case
    assert ("tokenizing again" in caplog.text) == warned, case
    assert sorted(p.name for p in good.tokens.folder.parent.iterdir()) == [good.tokens.folder.name]


def test_a_manifest_without_captions(tmp_path, decoder) -> None:
    manifest = _manifest(tmp_path, {"a": ()})
    pairs = build_pairs(
        manifest, manifest.records, _store(tmp_path, manifest), decoder, segment="none", max_tokens=8
    )
    assert len(pairs) == 0 and len(pairs.tokens.ids) == 0


def test_records_from_another_manifest_are_refused(tmp_path, decoder) -> None:
    manifest = _manifest(tmp_path)
    stranger = Record("a", "a.jpg", "train", ("x",), ("x",))
    with pytest.raises(ValueError, match="record 'a' is not one of"):
        build_pairs(manifest, [stranger], _store(tmp_path, manifest), decoder, segment="none", max_tokens=8)
