"""The hard synthetic set (`vicap.scenes`, `vicap demo --dataset hard`): the same files from the same seed,
relation phrases true to the drawn pixels, five different captions that all name the related pair, the
`ktvic` adapter reading what was written, and the demo command's --dataset option."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_prep.datasets import prepare
from data_prep.manifest import read_manifest
from vicap import demo, scenes
from vicap.cli import app
from vicap.scenes import COLOURS, PHRASES, SHAPES, Scene, draw_scene, name, write_scenes_ktvic


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a, b, c = (
        _files(write_scenes_ktvic(tmp_path / d, 6, 2, seed=s)) for d, s in (("a", 5), ("b", 5), ("c", 6))
    )
    assert a == b
    assert len(a) == 6 + 2 + 2  # the images and the two annotation files
    assert a.keys() == c.keys()
    differ = [k for k in a if a[k] != c[k]]
    assert "train_data.json" in differ and "test_data.json" in differ
    assert len(differ) == len(a)  # every image differs too


# --------------------------------------------------------------------------- geometry, on the pixels


def _draw(scene: Scene, seed: int, without: int | None = None) -> np.ndarray:
    """The scene's image (optionally without one of its things), drawn with a fixed random stream."""
    things = tuple(t for i, t in enumerate(scene.things) if i != without)
    return np.asarray(draw_scene(dataclasses.replace(scene, things=things), random.Random(seed))).astype(int)


def _pixels(image: np.ndarray, colour: str) -> np.ndarray:
    """Where a colour is drawn: within the drawing's jitter (15 per channel) of its RGB; every thing in a
    scene has its own colour, and no two colours, backgrounds, greys or pattern inks are that close."""
    return np.abs(image - np.array(COLOURS[colour])).max(axis=-1) <= 20


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(m)
    return rows.min(), rows.max(), cols.min(), cols.max()


def _enclosed(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether q's pixels lie on both sides of p on every row and every column that p is on."""
    for a, b in ((p, q), (p.T, q.T)):
        for line in np.nonzero(a.any(axis=1))[0]:
            cols, around = np.nonzero(a[line])[0], np.nonzero(b[line])[0]
            if not ((around < cols.min()).any() and (around > cols.max()).any()):
                return False
    return True


def _holds(relation: str, scene: Scene, i: int, j: int, seed: int) -> bool:
    """Whether things[i] <relation> things[j] is what the drawn image shows."""
    image = _draw(scene, seed)
    p, q = (_pixels(image, scene.things[k].colour) for k in (i, j))
    if not (p.any() and q.any()):
        return False  # one is hidden whole
    (pr0, pr1, pc0, pc1), (qr0, qr1, qc0, qc1) = _bbox(p), _bbox(q)
    if relation == "left":
        return pc1 < qc0
    if relation == "above":
        return pr1 < qr0
    if relation == "bigger":  # bounding boxes: the pattern inks take pixels from inside a shape
        return (pr1 - pr0 + 1) * (pc1 - pc0 + 1) > 1.5 * (qr1 - qr0 + 1) * (qc1 - qc0 + 1)
    if relation == "inside":
        return _enclosed(p, q)
    assert relation == "covers"
    q_whole = _pixels(_draw(scene, seed, without=i), scene.things[j].colour).sum()
    p_whole = _pixels(_draw(scene, seed, without=j), scene.things[i].colour).sum()
    # p hides a part of q (at least a tenth of the smaller one, at most six tenths of q) and q hides
    # nothing of p
    hidden = q_whole - q.sum()
    return 0.1 * min(p_whole, q_whole) <= hidden <= 0.6 * q_whole and p.sum() == p_whole


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    for k in range(n):
        scene = scenes.random_scene(rng)
        yield k, scene, scenes.captions_for(scene, rng)


def test_every_relation_phrase_agrees_with_the_drawn_geometry() -> None:
    """Every phrase of every relation, said of any two things of a scene, is checked against the pixels
    wherever a caption contains it."""
    checked: dict[tuple[str, str], int] = {}
    for k, scene, captions in _scenes(250):
        for caption in captions:
            for relation, phrases in PHRASES.items():
                for phrase in phrases:
                    for i, p in enumerate(scene.things):
                        for j, q in enumerate(scene.things):
                            if i != j and phrase.format(x=name(p), y=name(q)) in caption.lower():
                                assert _holds(relation, scene, i, j, seed=k), (caption, scene)
                                checked[relation, phrase] = checked.get((relation, phrase), 0) + 1
    # every phrase was met and checked, a few times over
    assert {rp: n for rp, n in checked.items() if n >= 3}.keys() == {
        (r, p) for r, phrases in PHRASES.items() for p in phrases
    }


@pytest.mark.parametrize(
    ("case", "relation", "things", "holds"),
    [
        ("left of", "left", [(20, 48, 10), (70, 48, 10)], True),
        ("right of is not left of", "left", [(70, 48, 10), (20, 48, 10)], False),
        ("touching is not left of", "left", [(40, 48, 10), (58, 48, 10)], False),
        ("above", "above", [(48, 20, 10), (48, 70, 10)], True),
        ("below is not above", "above", [(48, 70, 10), (48, 20, 10)], False),
        ("bigger", "bigger", [(25, 48, 16), (75, 48, 8)], True),
        ("smaller is not bigger", "bigger", [(25, 48, 8), (75, 48, 16)], False),
        ("inside", "inside", [(48, 48, 7), (48, 48, 24)], True),
        ("outside is not inside", "inside", [(15, 15, 7), (60, 60, 24)], False),
        ("on the rim is not inside", "inside", [(48, 28, 7), (48, 48, 24)], False),
        ("covers a part", "covers", [(56, 48, 12), (40, 48, 12)], True),
        ("apart does not cover", "covers", [(80, 48, 12), (20, 48, 12)], False),
        ("hides it whole: not a part", "covers", [(48, 48, 20), (48, 48, 8)], False),
    ],
)
def test_the_geometry_check_itself(case: str, relation: str, things: list, holds: bool) -> None:
    """The pixel checks above tell a true relation from a false one (things[0] <relation> things[1],
    two circles, the first drawn last)."""
    p, q = (
        scenes.Thing("hình tròn", colour, "trơn", "lớn", cx, cy, r)
        for (cx, cy, r), colour in zip(things, ("đỏ", "xanh dương"), strict=True)
    )
    scene = Scene((q, p), relation, 1, 0, "trắng", False)
    assert bool(_holds(relation, scene, 1, 0, seed=0)) is holds


def _named(t: scenes.Thing, caption: str) -> bool:
    caption = caption.lower()
    return name(t) in caption or f"{t.shape} {t.size} màu {t.colour}" in caption


def test_five_different_captions_each_naming_the_pair_and_only_what_is_drawn() -> None:
    for k, scene, captions in _scenes(200, seed=1):
        x, y = scene.things[scene.a], scene.things[scene.b]
        assert len(set(captions)) == 5
        # by name ("hình tròn đỏ") or with the size between ("hình tròn lớn màu đỏ")
        assert all(_named(x, c) and _named(y, c) for c in captions), captions
        # exactly one caption says the relation
        said = [
            c
            for c in captions
            if any(p.format(x=name(x), y=name(y)) in c.lower() for p in PHRASES[scene.relation])
        ]
        assert len(said) == 1, captions
        # every shape-and-colour a caption names is one of the scene's things, and in sight
        image = _draw(scene, seed=k)
        names = {f"{s} {c}" for s in SHAPES for c in COLOURS}
        for caption in captions:
            for n in (n for n in names if n in caption):
                thing = next(t for t in scene.things if name(t) == n)
                assert _pixels(image, thing.colour).sum() > 20, (caption, n)
        # every thing keeps at least half its outline in sight; counts say how many there are
        assert min(scenes.visible(scene.things)) >= 0.5
        counted = scenes.NUMBERS[len(scene.things)]
        for caption in captions:
            if " hình màu " in caption or "hai hình" in caption.lower():
                assert f"{counted} hình" in caption.lower(), caption


def test_ktvic_adapter_reads_the_written_set(tmp_path: Path) -> None:
    root = write_scenes_ktvic(tmp_path / "scenes", 6, 2, seed=3)
    report = prepare("ktvic", root, tmp_path / "m.jsonl", strict=True)
    assert report.ok, report.format()
    assert report.splits == {"train": {"images": 6, "captions": 30}, "test": {"images": 2, "captions": 10}}
    written = json.loads((root / "train_data.json").read_text(encoding="utf-8"))
    manifest = read_manifest(tmp_path / "m.jsonl")
    first = manifest.split("train")[0]
    # normalization leaves the captions as written: they are already in the canonical form
    assert list(first.captions) == [a["caption"] for a in written["annotations"] if a["image_id"] == 0]
    for a in written["annotations"]:  # KTVIC's word segmentation beside each caption: compounds joined
        assert a["segment_caption"].replace("_", " ") == a["caption"].replace(".", " .")
        assert not [c for c in scenes.COMPOUNDS if c in a["segment_caption"].lower()], a


# --------------------------------------------------------------------------- the demo command


@pytest.fixture
def tiny_hard(monkeypatch):
    """`vicap demo --dataset hard` at a few images and steps: the same code at a test's size."""
    spec = dataclasses.replace(demo.DEMO_SETS["hard"], n_train=20, n_test=4, clip_steps=3)
    monkeypatch.setitem(demo.DEMO_SETS, "hard", spec)


def test_demo_dataset_hard_runs_end_to_end(tmp_path: Path, tiny_hard) -> None:
    out = tmp_path / "out"
    sets = ["train.epochs=1", "train.warmup_steps=2", "generate.max_new_tokens=8", 'eval.levels=["syllable"]']
    res = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--dataset", "hard", *[a for s in sets for a in ("--set", s)]]
    )
    assert res.exit_code == 0, res.output
    assert "scenes of 2-4 shapes" in res.output and "human leave-one-out" in res.output
    assert "checkpoint: " in res.output
    report = json.loads((out / "runs" / "hard" / "report.json").read_text(encoding="utf-8"))
    assert report["images"] == 4 and report["references"] == 20
    assert Path(report["run"]) == out / "runs" / "hard"
    assert (out / "data" / "ktvic-scenes" / "train-images" / "000019.jpg").is_file()
    assert (out / "models" / "scenes" / "tiny-clip" / "open_clip_model.safetensors").is_file()
    assert not (out / "data" / "ktvic-synthetic").exists()  # the shapes demo's data was not drawn


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        (
            "unknown set",
            ["--dataset", "harder"],
            "--dataset 'harder': no such demo set; choose one of shapes, hard",
        ),
        ("empty name", ["--dataset", ""], "--dataset '': no such demo set"),
    ],
)
def test_demo_dataset_bad_names(tmp_path: Path, case: str, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert f"error: {message}" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing was built or printed before the check
    assert "vicap demo:" not in res.stdout


def test_demo_inputs_of_other_sizes_are_an_error(tmp_path: Path, tiny_hard) -> None:
    """A folder whose hard-set inputs were built at other sizes is not reused for this run's sizes."""
    out = tmp_path / "out"
    record = out / "data" / "ktvic-scenes.settings.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"dataset": "hard", "n_train": 3000, "n_test": 300, "clip_steps": 300}))
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--dataset", "hard"])
    assert res.exit_code == 2, res.output
    assert (
        f"error: {record}: the demo inputs there were built with n_train=3000, n_test=300, clip_steps=300, "
        "not n_train=20, n_test=4, clip_steps=3" in res.stderr
    )
    assert "Traceback" not in res.output
    assert sorted(p.name for p in out.rglob("*")) == ["data", "ktvic-scenes.settings.json"]  # nothing built
