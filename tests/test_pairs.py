"""Cross-lingual sentence pairs and mixing ratios: the `text` adapter reading pairs, the [pairs] and
[mix] recipe keys, mixed global batches on 1 and 2 processes, and runs trained on pairs alone and on
images + text + pairs that caption images end to end."""

from __future__ import annotations

import json
import math
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_prep.datasets import prepare
from data_prep.errors import DataPrepError
from tests import builders
from tests.conftest import as_sets, tiny_recipe_overrides
from vicap.checkpoint import list_checkpoints, read_checkpoint
from vicap.cli import app
from vicap.data import GlobalBatches
from vicap.recipe import RecipeError, load_recipe
from vicap.train import read_log, train

PAIRS = {"text_column": "vi", "source_column": "en", "source_language": "en"}


def _ascii(text: str) -> str:
    """A stand-in 'English' source sentence: the Vietnamese caption without its diacritics."""
    plain = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return plain.replace("đ", "d").replace("Đ", "D")


def _pairs_file(path: Path, captions: list[str]) -> Path:
    lines = ["en\tvi", *(f"{_ascii(c)}\t{c}" for c in captions)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the `text` adapter, pairs


@pytest.mark.parametrize(
    ("case", "name", "content", "options", "expected"),
    [
        ("two good pairs", "p.tsv", "en\tvi\nA cat.\tMột con mèo.\nA dog.\tMột con chó.\n", {}, {"pairs": 2}),
        (
            "the same pair after normalization",
            "p.tsv",
            "en\tvi\nA cat.\tMột con mèo.\nA  cat.\tMột  con mèo.\n",
            {},
            {"duplicate_text": ["line 3"], "pairs": 1},
        ),
        (
            "one source, two translations",
            "p.tsv",
            "en\tvi\nA cat.\tMột con mèo.\nA cat.\tMột chú mèo.\n",
            {},
            {"pairs": 2},
        ),
        ("source without words", "p.tsv", "en\tvi\n!!!\tMột con mèo.\n", {}, {"empty_caption": ["line 2"]}),
        ("target without words", "p.tsv", "en\tvi\nA cat.\t\n", {}, {"empty_caption": ["line 2"]}),
        (
            "NFD source is fixed",
            "p.tsv",
            "en\tvi\nCafe\u0301 cat.\tMột con mèo.\n",
            {},
            {"nfd_text": ["line 2"], "pairs": 1},
        ),
        (
            "over-long source",
            "p.tsv",
            "en\tvi\n" + "a " * 400 + "\tMột con mèo.\n",
            {},
            {"long_caption": ["line 2"]},
        ),
        (
            "source in another script",
            "p.tsv",
            "en\tvi\nКошка.\tMột con mèo.\nA dog.\tMột con chó.\n",
            {},
            {"unexpected_script": ["line 2"], "pairs": 1},
        ),
        ("TSV wrong field count", "p.tsv", "en\tvi\nA cat.\tMột\tcon\n", {}, {"bad_entry": ["line 2"]}),
        (
            "CSV quote left open",
            "p.csv",
            'en,vi\nA cat.,Một con mèo.\n"A dog.,x\n',
            {},
            {"bad_entry": ["line 3"]},
        ),
        (
            "JSON row without the source key",
            "p.jsonl",
            '{"vi": "Một con mèo."}\n{"en": "A dog.", "vi": "Một con chó."}\n',
            {},
            {"bad_entry": ["line 1"], "pairs": 1},
        ),
        (
            "JSON list where a sentence goes",
            "p.jsonl",
            '{"en": "A cat.", "vi": ["Một.", "Hai."]}\n',
            {},
            {"bad_entry": ["line 1"]},
        ),
        (
            "JSON lone surrogate in the source",
            "p.jsonl",
            '{"en": "a\\ud800b", "vi": "Một."}\n',
            {},
            {"invalid_text": ["line 1"]},
        ),
        ("header without the source column", "p.tsv", "eng\tvi\nA cat.\tMột.\n", {}, "no column 'en'"),
        ("header without the target column", "p.tsv", "en\tvie\nA cat.\tMột.\n", {}, "no column 'vi'"),
        ("pairs from a .txt", "p.txt", "A cat.\n", {}, "two named columns"),
        ("no source language", "p.tsv", "en\tvi\n", {"source_language": None}, "source_language"),
        (
            "a source language without pairs",
            "p.tsv",
            "en\tvi\n",
            {"source_column": None},
            "applies to nothing",
        ),
        ("one column for both sides", "p.tsv", "en\tvi\n", {"source_column": "vi"}, "name two columns"),
    ],
)
def test_pairs_adapter_bad_input(tmp_path, case, name, content, options, expected) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "m.jsonl"
    opts = {k: v for k, v in (PAIRS | options).items() if v is not None}
    if isinstance(expected, str):
        with pytest.raises(DataPrepError, match=expected):
            prepare("text", path, out, language="vi", stats=False, **opts)
        assert not out.exists()
        return
    report = prepare("text", path, out, language="vi", stats=False, **opts)
    kinds = {k: [p.line_or_id for p in report.problems if p.kind == k] for k in expected if k != "pairs"}
    assert kinds == {k: v for k, v in expected.items() if k != "pairs"}
    c = report.counts
    assert c["captions_read"] == c["captions"] + c["captions_skipped"]
    assert c["images_read"] == c["images"] + c["images_skipped"]
    if "pairs" in expected:
        assert c["captions"] == expected["pairs"]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["source_language"] == "en" and rows[0]["source_normalizer"].endswith("latin_normalize")
    assert all(r["image"] == "" and len(r["captions"]) == 1 and r["source"] for r in rows[1:])


def test_pairs_are_normalized_each_in_its_language(tmp_path) -> None:
    from data_prep.manifest import read_manifest

    path = tmp_path / "p.jsonl"
    path.write_text('{"en": " A  cat , on a mat .", "vi": "Mo\u0323\u0302t  con mèo ."}\n', encoding="utf-8")
    prepare("text", path, tmp_path / "m.jsonl", language="vi", stats=False, **PAIRS)
    (rec,) = read_manifest(tmp_path / "m.jsonl").records
    assert rec.source == "A cat, on a mat." and rec.captions == ("Một con mèo.",)


# --------------------------------------------------------------------------- recipe keys

PAIRS_ON = {"pairs.source": "p.tsv", "encoder.normalize": True}


@pytest.mark.parametrize(
    ("case", "overrides", "key"),
    [
        ("pairs without normalized features", {"pairs.source": "p.tsv"}, "encoder.normalize"),
        ("pairs with patch tokens", {**PAIRS_ON, "encoder.patch_tokens": True}, "encoder.patch_tokens"),
        ("pairs from a .txt", {**PAIRS_ON, "pairs.source": "p.txt"}, "pairs.source"),
        ("a pairs column without pairs", {"pairs.source_column": "en"}, "pairs.source_column"),
        ("a source language without pairs", {"pairs.source_language": "de"}, "pairs.source_language"),
        ("not a language code", {**PAIRS_ON, "pairs.source_language": "English"}, "pairs.source_language"),
        ("one column for both sides", {**PAIRS_ON, "pairs.target_column": "source"}, "pairs.target_column"),
        ("an empty column name", {**PAIRS_ON, "pairs.source_column": ""}, "pairs.source_column"),
        ("pairs with per-image grouping", {**PAIRS_ON, "train.group_by_image": True}, "train.group_by_image"),
        ("self-critical with pairs", {**PAIRS_ON, "scst.init_from": "runs/x"}, "pairs.source"),
        ("a share of no pairs", {"mix.images": 0.5, "mix.pairs": 0.5}, "mix.pairs"),
        ("a share of no text", {"mix.images": 0.5, "mix.text": 0.5}, "mix.text"),
        (
            "a share of no images",
            {**PAIRS_ON, "data.image_fraction": 0, "mix.images": 0.5, "mix.pairs": 0.5},
            "mix.images",
        ),
        ("pairs given no share", {**PAIRS_ON, "mix.images": 1.0}, "mix.pairs"),
        ("images given no share", {**PAIRS_ON, "mix.pairs": 1.0}, "mix.images"),
        (
            "shares short of 1",
            {**PAIRS_ON, "mix.images": 0.5, "mix.pairs": 0.4},
            "mix.images + mix.text + mix.pairs",
        ),
        ("a share above 1", {"mix.images": 1.5}, "mix.images"),
        ("a negative share", {"mix.images": 1.0, "mix.text": -0.5}, "mix.text"),
        (
            "a share of no item of the batch",
            {**PAIRS_ON, "train.batch_size": 8, "mix.images": 0.05, "mix.pairs": 0.95},
            "mix.images",
        ),
        (
            "shares with length grouping",
            {**PAIRS_ON, "mix.images": 0.5, "mix.pairs": 0.5, "train.group_by_length": True},
            "train.group_by_length",
        ),
        ("unknown mix key", {"mix.image": 1.0}, "mix.image"),
        (
            "pairs with an encoder without a text tower",
            {**PAIRS_ON, "encoder.name": "timm", "encoder.model": "m", "encoder.pretrained": "w.safetensors"},
            "encoder.name",
        ),
        ("self-critical with shares", {"scst.init_from": "runs/x", "mix.images": 1.0}, "mix.images"),
        (
            "a text corpus in a .json list",
            {"text.source": "c.json", "encoder.normalize": True},
            "text.source",
        ),
        ("unknown pairs key", {"pairs.file": "p.tsv"}, "pairs.file"),
    ],
)
def test_recipe_rejects(case, overrides, key) -> None:
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    with pytest.raises(RecipeError, match=key.replace(".", r"\.").replace("+", r"\+")):
        load_recipe("demo_vi_synthetic", ["data.source=d", *sets])


@pytest.mark.parametrize(
    ("shares", "batch", "counts"),
    [
        ({"images": 0.5, "pairs": 0.5}, 8, {"images": 4, "text": 0, "pairs": 4}),
        ({"images": 0.5, "text": 0.25, "pairs": 0.25}, 10, {"images": 5, "text": 3, "pairs": 2}),
        ({"images": 0.3, "pairs": 0.7}, 10, {"images": 3, "text": 0, "pairs": 7}),
        ({"images": 0.01, "pairs": 0.99}, 64, {"images": 1, "text": 0, "pairs": 63}),
    ],
)
def test_mix_counts_add_up_to_the_global_batch(shares, batch, counts) -> None:
    given = {**PAIRS_ON, **({"text.source": "t.txt"} if "text" in shares else {})}
    sets = [f"{k}={json.dumps(v)}" for k, v in given.items()]
    sets += [f"mix.{k}={v}" for k, v in shares.items()] + [f"train.batch_size={batch}"]
    recipe = load_recipe("demo_vi_synthetic", ["data.source=d", *sets])
    assert recipe.mix.counts(batch) == counts and sum(counts.values()) == batch


def test_old_recipes_mix_by_size() -> None:
    recipe = load_recipe("vi_ktvic_text_only")
    assert recipe.mix.shares == {} and not recipe.pairs.source


# --------------------------------------------------------------------------- mixed global batches


def _mixed(world: int, rank: int = 0, seed: int = 3, sizes=(20, 7, 11), counts=(3, 1, 2)) -> GlobalBatches:
    return GlobalBatches(
        sum(sizes),
        sum(counts),
        shuffle=True,
        seed=seed,
        rank=rank,
        world=world,
        parts=(list(sizes), list(counts)),
    )


def _source(i: int, sizes=(20, 7, 11)) -> int:
    return int(np.searchsorted(np.cumsum(sizes), i, side="right"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mixed_batches_hold_each_source_share_on_any_process_count(world: int) -> None:
    one = _mixed(1)
    assert len(one) == max(math.ceil(20 / 3), math.ceil(7 / 1), math.ceil(11 / 2)) == 7
    for epoch in (0, 1, 2):
        one.set_epoch(epoch)
        batches = list(one)
        for b in batches:  # the mix holds in every global batch
            assert [sum(_source(i) == s for i in b) for s in range(3)] == [3, 1, 2]
        seen = [i for b in batches for i in b]
        # the source that needs the most batches (7 sentences at 1 a batch) is seen exactly once
        assert sorted(i for i in seen if _source(i) == 1) == list(range(20, 27))
        shards = []
        for rank in range(world):
            s = _mixed(world, rank)
            s.set_epoch(epoch)
            shards.append(list(s))
        for b, batch in enumerate(batches):  # the processes' slices make up the one-process batch
            assert [i for s in shards for i in s[b]] == batch and all(s[b] for s in shards)
        resumed = _mixed(world, world - 1)
        resumed.set_epoch(epoch, start=4)
        assert list(resumed) == shards[-1][4:]
    # the images run on across epochs as passes over them: 3 epochs x 7 batches x 3 = 3 passes and 3
    # items of a 4th; within a pass (the first 6 batches: 18 items) none repeats
    stream = []
    for epoch in range(3):
        one.set_epoch(epoch)
        stream += [[i for i in b if _source(i) == 0] for b in one]
    counts = Counter(i for b in stream for i in b)
    assert sorted(counts) == list(range(20)) and sorted(counts.values()) == [3] * 17 + [4] * 3
    assert len({i for b in stream[:6] for i in b}) == 18
    other = _mixed(1, seed=4)
    other.set_epoch(0)
    one.set_epoch(0)
    assert list(other) != list(one)


def test_mixed_batches_refuse_parts_that_do_not_add_up() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        GlobalBatches(10, 4, shuffle=True, parts=([5, 5], [2, 1]))


# --------------------------------------------------------------------------- end to end


def _overrides(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra) -> list[str]:
    return tiny_recipe_overrides(
        tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **{"encoder.normalize": "true", **extra}
    )


def test_pairs_only_run_captions_images(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir) -> None:
    from vicap.encoders import load_encoder
    from vicap.evaluate import evaluate_run
    from vicap.features import open_store, text_key

    captions = list(dict.fromkeys(builders.ktvic_captions(ktvic_dir)))
    pairs = _pairs_file(tmp_path / "pairs.tsv", captions)
    extra = {
        "pairs.source": str(pairs),
        "pairs.source_column": "en",
        "pairs.target_column": "vi",
        "data.image_fraction": "0",
        "train.feature_noise": "0.126",
    }
    recipe = load_recipe(
        "demo_vi_synthetic", _overrides(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra)
    )
    assert recipe.text_only
    run_dir = train(recipe, progress=False)
    sources = json.loads(read_checkpoint(list_checkpoints(run_dir)[-1]).meta["sources"])
    assert sources == {
        "image_captions": 0,
        "sentences": 0,
        "sentence_pairs": len(captions),
        "text_only": True,
    }
    # the rows the mapper read are the source sentences', under the English normalizer
    rows = open_store(load_encoder(recipe.encoder), recipe.data.features_dir).rows
    assert not any("train-images" in key for key in rows)
    normalizer = "data_prep.languages.latin_normalize"
    assert all(text_key(_ascii(c), normalizer) in rows for c in captions)
    assert (run_dir / "pairs_manifest.jsonl").is_file() and (run_dir / "pairs_manifest.report.json").is_file()

    report = evaluate_run(run_dir, progress=False)
    assert report["training"]["pairs_source"] == str(pairs)
    assert "sentence pairs of" in (run_dir / "report.md").read_text(encoding="utf-8")
    photo = sorted((ktvic_dir / "public-test-images").glob("*.jpg"))[0]
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(photo), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert photo.name in res.stdout


MIX = {
    "data.image_fraction": "0.5",  # 12 of 24 images, 60 captions: 15 batches of 4
    "mix.images": "0.5",
    "mix.text": "0.25",
    "mix.pairs": "0.25",
    "train.batch_size": "8",
    "decoder.tuning": "frozen",
}


def _mixed_sources(tmp_path: Path, ktvic_dir: Path) -> dict[str, str]:
    captions = list(dict.fromkeys(builders.ktvic_captions(ktvic_dir)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(captions[:20]) + "\n", encoding="utf-8")  # 10 batches of 2
    pairs = _pairs_file(tmp_path / "pairs.tsv", captions[20:36])  # 8 batches of 2
    return {
        **MIX,
        "text.source": str(corpus),
        "pairs.source": str(pairs),
        "pairs.source_column": "en",
        "pairs.target_column": "vi",
    }


def test_mixed_run_trains_resumes_exactly_and_captions(
    tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir
) -> None:
    from safetensors.torch import load_file

    from vicap.evaluate import evaluate_run

    extra = {**_mixed_sources(tmp_path, ktvic_dir), "train.save_every": "4", "train.keep_checkpoints": "20"}

    def recipe(out: Path):
        return load_recipe(
            "demo_vi_synthetic",
            _overrides(
                tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra, **{"train.output_dir": str(out)}
            ),
        )

    full = train(recipe(tmp_path / "full"), progress=False)
    sources = json.loads(read_checkpoint(list_checkpoints(full)[-1]).meta["sources"])
    assert sources == {"image_captions": 60, "sentences": 20, "sentence_pairs": 16, "text_only": False}
    # an epoch is what the images need at 4 a batch (15 batches); the sentences repeat within it
    steps = [r["step"] for r in read_log(full) if "loss" in r]
    assert steps == list(range(1, 31))

    # killed mid-epoch 0 (after step 8 of 15) and resumed: the same batches, the same weights
    half = Path(shutil.copytree(full, tmp_path / "half"))
    for p in list_checkpoints(half):
        if int(p.name[5:]) > 8:
            shutil.rmtree(p)
    log = (half / "train_log.jsonl").read_text().splitlines()
    (half / "train_log.jsonl").write_text("\n".join(x for x in log if json.loads(x)["step"] <= 8) + "\n")
    train(recipe(half), resume=True, progress=False)
    a, b = (load_file(str(list_checkpoints(r)[-1] / "model.safetensors")) for r in (full, half))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    report = evaluate_run(full, progress=False)
    assert report["training"]["mix"] == {"images": 0.5, "text": 0.25, "pairs": 0.25}
    assert report["images"] == 6 and all(isinstance(e["caption"], str) for e in report["examples"])


def test_cli_error_for_a_pairs_file_without_its_column(
    tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir
) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("english\tvi\nA cat.\tMột con mèo.\n", encoding="utf-8")
    extra = {"pairs.source": str(pairs), "pairs.source_column": "en", "pairs.target_column": "vi"}
    sets = as_sets(_overrides(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra))
    res = CliRunner().invoke(app, ["train", "demo_vi_synthetic", *sets])
    assert res.exit_code == 2, res.output
    assert "error: " in res.stderr and "pairs.tsv:1" in res.stderr and "'en'" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_mixed_sources_on_two_processes_train_like_one(
    tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir
) -> None:
    """`accelerate launch` on 2 processes of a run mixing images, text and pairs: every step's global
    batch is the one-process run's (split between the processes), so losses and weights agree."""
    from tests.test_ddp import _assert_same_weights, _launch, _losses, _starts, _weights

    extra = _mixed_sources(tmp_path, ktvic_dir)
    single = train(
        load_recipe(
            "demo_vi_synthetic",
            _overrides(
                tmp_path,
                ktvic_dir,
                tiny_lm_dir,
                text_clip_dir,
                **extra,
                **{"train.output_dir": str(tmp_path / "one")},
            ),
        ),
        progress=False,
    )
    recipe = load_recipe(
        "demo_vi_synthetic",
        _overrides(
            tmp_path,
            ktvic_dir,
            tiny_lm_dir,
            text_clip_dir,
            **extra,
            **{"train.output_dir": str(tmp_path / "two")},
        ),
    )
    recipe_file = tmp_path / "mixed.toml"
    recipe_file.write_text(recipe.to_toml())
    _launch(recipe_file)
    double = tmp_path / "two"
    assert _starts(double) == [("start", 2)]
    assert len(_losses(double)) == 30
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-5)
    _assert_same_weights(_weights(double), _weights(single))
