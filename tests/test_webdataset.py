"""WebDataset (img2dataset) shards: prepare reads them with the webdataset package, the manifest points
at (shard, member), and every stage reads images from the shards in place."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from data_prep.datasets import prepare
from data_prep.errors import SourceNotFoundError
from data_prep.images import TarMember, check_image, file_problem, image_key
from data_prep.manifest import ManifestError, read_manifest
from tests.builders import ktvic_samples, write_shards
from vicap.cli import app
from vicap.encoders import load_encoder
from vicap.features import extract_features
from vicap.images import ImageError, load_image
from vicap.recipe import EncoderConfig


def _jpeg(colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format=fmt)
    return out.getvalue()


def _samples(n: int = 4) -> list[dict]:
    return [
        {"__key__": f"{k:09d}", "jpg": _jpeg((40 * k, 100, 200)), "txt": f"A red bus number {k} ."}
        for k in range(n)
    ]


# ----------------------------------------------------------------------------------------- bad members


def _gzip_second_shard(folder: Path) -> None:
    shard = folder / "00001.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes()))


def _cut_second_shard(folder: Path) -> None:
    """Cut the shard inside its last image (as a download that stopped)."""
    shard = folder / "00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: data.rindex(b"\xff\xd9") - 100])


def _mutate(k: int, **changes):
    def apply(samples: list[dict]) -> None:
        for name, value in changes.items():
            if value is None:
                del samples[k][name]
            else:
                samples[k][name] = value

    return apply


# (case, change to the samples, change to the shard files, options, problems, kept image keys)
BAD = [
    ("clean", None, None, {}, {}, [0, 1, 2, 3]),
    ("corrupt image", _mutate(1, jpg=b"not an image"), None, {}, {"unreadable_image": 1}, [0, 2, 3]),
    ("truncated image", _mutate(1, jpg=_jpeg((1, 2, 3))[:200]), None, {}, {"truncated_image": 1}, [0, 2, 3]),
    ("no caption member", _mutate(1, txt=None), None, {}, {"no_captions": 1}, [0, 2, 3]),
    ("empty caption", _mutate(1, txt="  "), None, {}, {"empty_caption": 1, "no_captions": 1}, [0, 2, 3]),
    ("caption not UTF-8", _mutate(1, txt=b"caf\xe9"), None, {}, {"invalid_text": 1, "no_captions": 1}, [0, 2, 3]),
    ("no image member", _mutate(1, jpg=None), None, {}, {"missing_image": 1}, [0, 2, 3]),
    ("png image", _mutate(1, jpg=None, png=_jpeg((9, 9, 9), "PNG")), None, {}, {}, [0, 1, 2, 3]),
    ("duplicate key", _mutate(2, __key__="000000000"), None, {}, {"duplicate_image_id": 1, "duplicate_caption_id": 1}, [0, 1, 3]),
    ("json caption", _mutate(1, json={"caption": "From the JSON ."}), None, {"caption_key": "caption"}, {"no_captions": 3}, [1]),
    ("json without the key", _mutate(1, json={"text": "x"}), None, {"caption_key": "caption"}, {"bad_entry": 1, "no_captions": 4}, []),
    ("json caption list", _mutate(1, json={"caption": ["One .", "", "Two ."]}), None, {"caption_key": "caption"}, {"empty_caption": 1, "no_captions": 3}, [1]),
    ("json not JSON", _mutate(1, json=b"{"), None, {"caption_key": "caption"}, {"bad_entry": 1, "no_captions": 4}, []),
    ("compressed shard", None, _gzip_second_shard, {}, {"unreadable_shard": 1}, [0, 1]),
    ("shard cut short", None, _cut_second_shard, {}, {"unreadable_shard": 1}, [0, 1, 2]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "damage", "options", "problems", "kept"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_bad_members_are_counted_and_named(tmp_path, change, damage, options, problems, kept) -> None:
    samples = _samples()
    if change:
        change(samples)
    folder = tmp_path / "shards"
    write_shards(folder, samples, per_shard=2)
    if damage:
        damage(folder)
    out = tmp_path / "m.jsonl"
    report = prepare("webdataset", folder / "{00000..00001}.tar", out, **options)
    assert report.problem_counts() == problems, report.format()
    c = report.counts
    assert c["images_read"] == c["images"] + c["images_skipped"], report.format()
    assert c["captions_read"] == c["captions"] + c["captions_skipped"], report.format()
    for p in report.problems:
        assert p.file.endswith(".tar") and p.line_or_id  # named by shard and sample key
    m = read_manifest(out)
    assert [r.image_id for r in m.records] == [f"{k:09d}" for k in kept]
    for r in m.records:
        ref = m.resolve_image(r)
        assert isinstance(ref, TarMember) and ref.shard.suffix == ".tar" and r.member.startswith(r.image_id)
        assert file_problem(ref) is None and check_image(ref) is None


def test_json_caption_and_split_options(tmp_path) -> None:
    samples = [s | {"json": {"caption": f"JSON caption {s['__key__']} ."}} for s in _samples(2)]
    samples[1]["json"]["caption"] = ["JSON caption 000000001 .", "A second caption ."]
    write_shards(tmp_path / "s", samples, per_shard=2)
    prepare(
        "webdataset", tmp_path / "s" / "00000.tar", tmp_path / "m.jsonl", caption_key="caption", split="dev"
    )
    m = read_manifest(tmp_path / "m.jsonl")
    assert [r.captions for r in m.records] == [
        ("JSON caption 000000000 .",),
        ("JSON caption 000000001 .", "A second caption ."),
    ]
    assert m.records[1].caption_ids == ("000000001#0", "000000001#1")
    assert m.splits == {"val": 2}


@pytest.mark.parametrize(
    ("case", "source", "expected"),
    [
        ("one shard", "shards/00001.tar", 2),
        ("a folder of shards", "shards", 4),
        ("a brace pattern", "shards/{00000..00001}.tar", 4),
        ("a pattern with a missing shard", "shards/{00000..00002}.tar", 4),
    ],
)
def test_sources(tmp_path, case, source, expected) -> None:
    write_shards(tmp_path / "shards", _samples(), per_shard=2)
    report = prepare("webdataset", tmp_path / source, tmp_path / "m.jsonl")
    assert report.counts["images"] == expected, case
    if "missing" in case:
        assert [p.kind for p in report.problems] == ["missing_file"]
        assert "00002.tar" in report.problems[0].message


@pytest.mark.parametrize(
    ("case", "source", "message"),
    [
        (
            "no shard exists",
            "nowhere/{00000..00003}.tar",
            r"no shard of .*nowhere/\{00000\.\.00003\}\.tar exists",
        ),
        ("a folder without shards", "empty", "no .tar shards in"),
    ],
)
def test_a_source_without_shards_is_an_error(tmp_path, case, source, message) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match=message):
        prepare("webdataset", tmp_path / source, tmp_path / "m.jsonl")
    res = CliRunner().invoke(
        app, ["prepare", "webdataset", str(tmp_path / source), "-o", str(tmp_path / "m.jsonl")]
    )
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------- reading in place


def test_members_read_like_files(tmp_path) -> None:
    samples = _samples(3)
    (shard,) = write_shards(tmp_path, samples, per_shard=3)
    for s in samples:
        file = tmp_path / f"{s['__key__']}.jpg"
        file.write_bytes(s["jpg"])
        member = TarMember(shard, f"{s['__key__']}.jpg")
        assert np.array_equal(np.asarray(load_image(member)), np.asarray(load_image(file)))
    assert image_key(TarMember(shard, "a.jpg")) == f"{shard.resolve()}/a.jpg"


@pytest.mark.parametrize(
    ("case", "member", "damage", "message"),
    [
        ("no such member", "nope.jpg", None, "no member 'nope.jpg' in tar shard"),
        ("no such shard", "000000000.jpg", "delete", "tar shard .* file not found"),
        ("compressed shard", "000000000.jpg", "gzip", "is not an uncompressed tar file"),
        ("member cut short", "000000001.jpg", "cut", "truncated|cut short"),
        ("not an image", "000000000.txt", None, "unreadable image"),
    ],
)
def test_unreadable_members_are_image_errors_naming_them(tmp_path, case, member, damage, message) -> None:
    (shard,) = write_shards(tmp_path, _samples(2), per_shard=2)
    if damage == "delete":
        shard.unlink()
    elif damage == "gzip":
        shard.write_bytes(gzip.compress(shard.read_bytes()))
    elif damage == "cut":
        data = shard.read_bytes()
        shard.write_bytes(data[: data.rindex(b"\xff\xd9") - 100])
    with pytest.raises(ImageError, match=message) as err:
        load_image(TarMember(shard, member))
    assert str(shard) in str(err.value), case


@pytest.mark.parametrize(
    ("case", "member", "error"),
    [("a number", 3, "'member' must be a member's name"), ("empty", "", "'member' must be a member's name")],
)
def test_manifest_member_must_be_a_name(tmp_path, case, member, error) -> None:
    path = tmp_path / "m.jsonl"
    row = {
        "image_id": "1",
        "image": "a.tar",
        "member": member,
        "split": "train",
        "captions": [],
        "caption_ids": [],
    }
    path.write_text(
        json.dumps({"vicap_manifest": 1, "dataset": "x", "language": "en"}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(ManifestError, match=rf"{path}:2: {error}"):
        read_manifest(path)


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path):
    return load_encoder(EncoderConfig(model=f"local-dir:{tiny_clip_dir}"))


def test_features_of_members(encoder, tmp_path) -> None:
    """Rows equal the same images' rows as files; a member's key is its own in every shard; a rewritten
    shard re-encodes its members only; nothing is unpacked."""
    samples = _samples(4)
    shards = write_shards(tmp_path / "shards", samples, per_shard=2)
    members = [TarMember(shards[k // 2], f"{s['__key__']}.jpg") for k, s in enumerate(samples)]
    files = []
    for s in samples:
        files.append(tmp_path / f"{s['__key__']}.jpg")
        files[-1].write_bytes(s["jpg"])
    store = extract_features(encoder, members + files, tmp_path / "features", batch_size=3, progress=False)
    assert len(store.rows) == 8 and not store.failures
    torch.testing.assert_close(store.get(members), store.get(files))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]

    calls = []
    encode = encoder.encode
    encoder.encode = lambda x: calls.append(len(x)) or encode(x)
    try:
        extract_features(encoder, members, tmp_path / "features", progress=False)
        assert calls == []  # unchanged: reused
        write_shards(tmp_path / "new", samples[2:], per_shard=2)[0].replace(shards[1])  # rewritten shard
        store = extract_features(encoder, members, tmp_path / "features", progress=False)
        assert calls == [2]
    finally:
        del encoder.encode
    torch.testing.assert_close(store.get(members), store.get(files))


def test_a_bad_member_is_a_named_feature_failure(encoder, tmp_path) -> None:
    samples = _samples(2)
    samples[1]["jpg"] = b"broken"
    (shard,) = write_shards(tmp_path, samples, per_shard=2)
    refs = [TarMember(shard, "000000000.jpg"), TarMember(shard, "000000001.jpg")]
    store = extract_features(encoder, refs, tmp_path / "features", progress=False)
    assert store.has(refs[0]) and not store.has(refs[1])
    assert list(store.failures) == [image_key(refs[1])]
    assert f"{shard}/000000001.jpg: unreadable image" in store.failures[image_key(refs[1])]


# ----------------------------------------------------------------------------------------- end to end


def test_shards_to_run_evaluation_and_captions(tiny_recipe, tmp_path, ktvic_dir) -> None:
    """An img2dataset download trains, evaluates and captions without a file being unpacked."""
    from vicap.evaluate import evaluate_run
    from vicap.train import train

    shards = tmp_path / "shards"
    write_shards(shards, ktvic_samples(ktvic_dir), per_shard=10)
    recipe = tiny_recipe(
        **{
            "data.adapter": "webdataset",
            "data.source": f"{shards}/{{00000..00002}}.tar",
            "data.val_fraction": "0.25",
            "eval.split": "val",
            "train.epochs": "1",
            "train.batch_size": "6",
        }
    )
    run = train(recipe, progress=False)
    manifest = read_manifest(run / "manifest.jsonl")
    assert len(manifest.records) == 24 and all(r.member for r in manifest.records)
    report = evaluate_run(run, progress=False)
    assert report["images"] == 6 and report["skipped"] == 0
    rows = [json.loads(line) for line in (run / "captions_val.jsonl").read_text().splitlines()]
    assert all(r["member"] and r["path"].endswith(f".tar/{r['member']}") for r in rows)
    res = CliRunner().invoke(app, ["caption", str(run), str(run / "manifest.jsonl")])
    assert res.exit_code == 0, res.output
    captioned = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(captioned) == 24 and all(".tar/" in r["image"] and "caption" in r for r in captioned)
    res = CliRunner().invoke(app, ["compare", str(run), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cmp" / "gallery.html").read_text().count("data:image/jpeg;base64,") == 6
    assert sorted(p.name for p in shards.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
