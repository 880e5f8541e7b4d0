"""The feature store: one row per unique image, reused when unchanged, re-encoded when changed, never stale."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.conftest import TINY_CLIP_CFG
from vicap.encoders import clip_preprocess_cfg, load_encoder, save_open_clip
from vicap.features import extract_features, open_store
from vicap.images import load_image
from vicap.recipe import EncoderConfig


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path):
    return load_encoder(EncoderConfig(model=f"local-dir:{tiny_clip_dir}"))


@pytest.fixture
def images(tmp_path: Path, ktvic_dir: Path) -> list[Path]:
    """Four images of our own, so tests can rewrite them."""
    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted((ktvic_dir / "train-images").glob("*.jpg"))[:4]
    return [Path(shutil.copy(p, folder / p.name)) for p in src]


@pytest.fixture
def counted(encoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wraps encoder.encode; the list collects how many images each call encoded."""
    calls: list[int] = []
    encode = encoder.encode

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(int(pixels.shape[0]))
        return encode(pixels)

    monkeypatch.setattr(encoder, "encode", spy)
    return calls


def _direct(encoder, path: Path) -> torch.Tensor:
    return encoder.encode(encoder.preprocess(load_image(path)).unsqueeze(0))[0]


def _check_rows(store, encoder, paths: list[Path]) -> None:
    """Every listed image's row holds that image's own features."""
    for p in paths:
        torch.testing.assert_close(store.get([p])[0], _direct(encoder, p), rtol=1e-5, atol=1e-5)


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_one_row_per_unique_image(encoder, images, tmp_path: Path, counted) -> None:
    a, b, c, _ = images
    same_a = a.parent / "sub" / ".." / a.name  # another spelling of the same file
    (a.parent / "sub").mkdir()
    store = extract_features(encoder, [a, b, a, c, same_a, str(b)], tmp_path / "store", progress=False)
    assert store.features.shape == (3, TINY_CLIP_CFG["embed_dim"]) and store.dim == 24
    assert sum(counted) == 3
    assert sorted(store.rows.values()) == [0, 1, 2]
    assert store.row(same_a) == store.row(a) and not store.failures
    _check_rows(store, encoder, [a, b, c])
    assert not store.has(images[3])


def test_second_run_encodes_nothing(encoder, images, tmp_path: Path, counted) -> None:
    first = extract_features(encoder, images, tmp_path / "store", batch_size=3, progress=False)
    assert counted == [3, 1]
    again = extract_features(encoder, images, tmp_path / "store", batch_size=3, progress=False)
    assert counted == [3, 1]  # no new calls
    assert again.rows == first.rows
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))
    # A subset is served from the same store too, and open_store sees it without encoding.
    extract_features(encoder, images[:2], tmp_path / "store", progress=False)
    assert counted == [3, 1]
    assert open_store(encoder, tmp_path / "store").rows == first.rows


def test_changed_image_is_re_encoded_alone(encoder, images, tmp_path: Path, counted) -> None:
    root = tmp_path / "store"
    old = extract_features(encoder, images, root, progress=False)
    old_row = old.get([images[1]])[0].clone()
    counted.clear()

    _bump_mtime(images[2])  # touched, same content
    store = extract_features(encoder, images, root, progress=False)
    assert counted == [1]
    assert len(store.rows) == 4

    flipped = ImageOps.mirror(load_image(images[1])).rotate(90)
    flipped.save(images[1], quality=70)  # rewritten with new content
    _bump_mtime(images[1])
    counted.clear()
    store = extract_features(encoder, images, root, progress=False)
    assert counted == [1]
    assert store.features.shape[0] == 4 and len(store.rows) == 4
    assert not torch.allclose(store.get([images[1]])[0], old_row)
    _check_rows(store, encoder, images)  # rows still point at the right images after reshuffling


def test_unreadable_images_are_reported_and_get_no_row(encoder, images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    broken = images[0].parent / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:300])
    missing = images[0].parent / "missing.jpg"
    store = extract_features(encoder, [*images, broken, missing], root, progress=False)
    assert set(store.failures) == {str(broken.resolve()), str(missing.resolve())}
    assert "broken.jpg" in store.failures[str(broken.resolve())]
    assert not store.has(broken) and not store.has(missing)
    assert store.features.shape[0] == 4
    _check_rows(store, encoder, images)

    # An image that was fine and is now corrupt loses its row instead of serving stale features.
    images[3].write_bytes(images[3].read_bytes()[:300])
    _bump_mtime(images[3])
    store = extract_features(encoder, images, root, progress=False)
    assert set(store.failures) == {str(images[3].resolve())}
    assert not store.has(images[3]) and store.features.shape[0] == 3
    _check_rows(store, encoder, images[:3])


def test_store_files_are_plain_arrays_and_json(encoder, images, tmp_path: Path) -> None:
    store = extract_features(encoder, images, tmp_path / "store", progress=False)
    folder = tmp_path / "store" / encoder.key
    assert store.root == folder
    (index_file,) = (folder / "shards").glob("*.json")
    index = json.loads(index_file.read_text())
    array = np.load(folder / "shards" / index["npy"], allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (4, 24)
    assert [e["path"] for e in index["entries"]] == [str(p.resolve()) for p in images]
    assert [e["row"] for e in index["entries"]] == [0, 1, 2, 3] and index["failures"] == []
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["identity"] == encoder.identity and meta["embed_dim"] == 24 and meta["row_shape"] == [24]
    assert isinstance(store.features._arrays[0], np.memmap)  # read back memory-mapped
    np.testing.assert_array_equal(np.asarray(store.features), array)


def test_empty_image_list_writes_an_empty_store(encoder, tmp_path: Path) -> None:
    store = extract_features(encoder, [], tmp_path / "store", progress=False)
    assert store.features.shape == (0, 24) and store.dim == 24 and not store.rows


def test_a_different_encoder_gets_its_own_store(encoder, images, tmp_path: Path, counted) -> None:
    root = tmp_path / "store"
    extract_features(encoder, images, root, progress=False)
    torch.manual_seed(123)
    import open_clip

    other_dir = save_open_clip(
        open_clip.CLIP(**TINY_CLIP_CFG), TINY_CLIP_CFG, clip_preprocess_cfg(32), tmp_path / "other"
    )
    other = load_encoder(EncoderConfig(model=f"local-dir:{other_dir}"))
    assert other.key != encoder.key
    store = extract_features(other, images, root, progress=False)
    assert store.root == root / other.key
    assert sorted(p.name for p in root.iterdir()) == sorted([encoder.key, other.key])
    assert not np.allclose(np.asarray(store.features), np.asarray(open_store(encoder, root).features))
    _check_rows(store, other, images)


# --------------------------------------------------------------------------- shards, crashes, bad files


def _shard_files(root: Path, encoder) -> list[Path]:
    return sorted((root / encoder.key / "shards").iterdir())


def test_a_run_that_encodes_nothing_writes_nothing(encoder, images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    extract_features(encoder, images, root, progress=False)
    before = {p: p.stat().st_mtime_ns for p in (root / encoder.key).rglob("*")}
    extract_features(encoder, images[:2], root, progress=False)
    extract_features(encoder, images, root, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (root / encoder.key).rglob("*")} == before


def test_rows_are_written_in_shards_that_each_commit_alone(encoder, images, tmp_path: Path, counted) -> None:
    root = tmp_path / "store"
    store = extract_features(encoder, images, root, batch_size=1, shard_images=3, progress=False)
    assert sum(counted) == 4 and len(store.rows) == 4
    assert [p.suffix for p in _shard_files(root, encoder)] == [".json", ".npy", ".json", ".npy"]
    _check_rows(store, encoder, images)


def test_failures_are_retried_only_when_the_file_changes(encoder, images, tmp_path: Path, counted) -> None:
    root = tmp_path / "store"
    broken = images[0].parent / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:300])
    store = extract_features(encoder, [*images, broken], root, progress=False)
    assert set(store.failures) == {str(broken.resolve())}
    counted.clear()
    again = extract_features(encoder, [*images, broken], root, progress=False)
    assert counted == [] and set(again.failures) == {str(broken.resolve())}  # recorded, not retried
    shutil.copy(images[0], broken)  # repaired
    _bump_mtime(broken)
    fixed = extract_features(encoder, [*images, broken], root, progress=False)
    assert counted == [1] and not fixed.failures and fixed.has(broken)
    _check_rows(fixed, encoder, [*images, broken])


def _damage_npy_same_size(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    data[-8:] = bytes(8)  # the last row's last values zeroed: same size, other content
    npy.write_bytes(bytes(data))


BAD_SHARDS = [
    # (case, damage to the first shard's files, images encoded again)
    ("rows file cut short", lambda npy, idx: npy.write_bytes(npy.read_bytes()[:200]), 3),
    ("rows file rewritten, same size", lambda npy, idx: _damage_npy_same_size(npy), 3),
    ("rows file missing", lambda npy, idx: npy.unlink(), 3),
    ("index cut short", lambda npy, idx: idx.write_text(idx.read_text()[:50]), 3),
    ("index of another format", lambda npy, idx: idx.write_text('{"format": "x"}'), 3),
    ("index points at another rows file", lambda npy, idx: idx.write_text(idx.read_text().replace(npy.name, "x.npy")), 3),
]  # fmt: skip


@pytest.mark.parametrize(("case", "damage", "again"), BAD_SHARDS, ids=[c[0] for c in BAD_SHARDS])
def test_a_shard_that_does_not_match_its_index_is_never_used(
    encoder, images, tmp_path: Path, counted, caplog, case, damage, again
) -> None:
    root = tmp_path / "store"
    extract_features(encoder, images, root, shard_images=3, progress=False)
    idx, npy = _shard_files(root, encoder)[:2]
    damage(npy, idx)
    counted.clear()
    store = extract_features(encoder, images, root, shard_images=3, progress=False)
    assert sum(counted) == again  # the damaged shard's images, encoded again
    _check_rows(store, encoder, images)
    # set aside, not deleted: the next run neither reads it nor warns again
    assert (root / encoder.key / "damaged" / idx.name).is_file()
    caplog.clear()
    counted.clear()
    store = extract_features(encoder, images, root, shard_images=3, progress=False)
    assert counted == [] and not [r for r in caplog.records if r.levelname == "WARNING"]
    _check_rows(store, encoder, images)


def test_a_killed_extraction_is_completed_by_the_next_run(encoder, images, tmp_path: Path, counted) -> None:
    # Killed while writing its second shard: the first shard is committed, the second left half-written.
    import vicap.features as F

    root = tmp_path / "store"
    commits = {"n": 0}
    commit = F._ShardWriter.commit

    def killed_on_second(self):
        commits["n"] += 1
        if commits["n"] == 2:
            raise KeyboardInterrupt
        commit(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F._ShardWriter, "commit", killed_on_second)
        mp.setattr(F.os, "getpid", lambda: 2**22 + 7)  # a writer pid that is not running afterwards
        with pytest.raises(KeyboardInterrupt):
            extract_features(encoder, images, root, shard_images=3, batch_size=1, progress=False)
    leftovers = [p.name for p in _shard_files(root, encoder) if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    assert len(open_store(encoder, root).rows) == 3
    counted.clear()
    store = extract_features(encoder, images, root, shard_images=3, batch_size=1, progress=False)
    assert counted == [1] and len(store.rows) == 4  # only the image of the lost shard
    assert not [p for p in _shard_files(root, encoder) if p.name.endswith(".tmp")]  # the dead writer's file
    _check_rows(store, encoder, images)


@pytest.mark.parametrize(
    ("case", "rows_order", "index_age_s", "kept"),
    [
        ("a good store", [0, 1, 2, 3], 0, 4),
        ("index longer than the rows", [0, 1, 2], 0, 0),
        # the old code's crash: new rows (reordered) beside the previous run's index, written earlier
        ("index older than its rows", [1, 0, 3, 2], -60, 0),
    ],
)
def test_a_store_in_the_old_single_file_layout_is_moved_once(
    encoder, images, tmp_path: Path, counted, case: str, rows_order: list[int], index_age_s: int, kept: int
) -> None:
    root = tmp_path / "store"
    folder = root / encoder.key
    folder.mkdir(parents=True)
    (folder / "index.json").write_text(
        json.dumps(
            [{"path": str(p.resolve()), "stat": [p.stat().st_size, p.stat().st_mtime_ns]} for p in images]
        )
    )
    rows = np.stack([_direct(encoder, images[i]).numpy() for i in rows_order])
    np.save(folder / "features.npy", rows)
    when = (folder / "features.npy").stat().st_mtime_ns + index_age_s * 10**9  # in ns: a float loses them
    os.utime(folder / "index.json", ns=(when, when))
    (folder / "meta.json").write_text(json.dumps({"identity": encoder.identity}))
    counted.clear()
    store = open_store(encoder, root)
    assert len(store.rows) == kept
    store = extract_features(encoder, images, root, progress=False)
    assert sum(counted) == 4 - kept  # what the old store could not vouch for is encoded again
    _check_rows(store, encoder, images)


def test_images_are_decoded_like_load_image(encoder, tmp_path: Path) -> None:
    # An RGBA image in the store is the white-composited image, the same as captioning sees.
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    store = extract_features(encoder, [path, white], tmp_path / "store", progress=False)
    torch.testing.assert_close(store.get([path])[0], store.get([white])[0])


def test_a_file_name_that_is_not_utf8_is_stored_and_found_again(
    encoder, images, tmp_path: Path, counted
) -> None:
    odd = Path(os.fsdecode(bytes(images[0].parent) + b"/caf\xe9.jpg"))  # holds a lone surrogate
    shutil.copy(images[1], odd)
    root = tmp_path / "store"
    store = extract_features(encoder, [images[0], odd], root, progress=False)
    assert store.has(odd) and not store.failures
    index = next((root / encoder.key / "shards").glob("*.json")).read_bytes()
    index.decode("utf-8")  # valid UTF-8, the name as JSON's \udce9 escape
    assert b"caf\\udce9.jpg" in index
    counted.clear()
    again = extract_features(encoder, [images[0], odd], root, progress=False)
    assert counted == [] and again.row(odd) == store.row(odd)  # read back as the same name
    _check_rows(again, encoder, [odd])
