"""Text-only training (CapDec): the text tower, sentences in the feature store, the `text` adapter,
the recipe keys, and a run trained on text alone that captions images end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from data_prep.datasets import prepare
from data_prep.errors import DataPrepError
from tests import builders
from tests.conftest import tiny_recipe_overrides
from vicap.cli import app
from vicap.encoders import load_encoder
from vicap.errors import ModelLoadError
from vicap.features import extract_features, open_store, text_key
from vicap.recipe import EncoderConfig, RecipeError, load_recipe


def _encoder(clip: Path, **kw):
    return load_encoder(
        EncoderConfig(model=f"local-dir:{clip}", pretrained="", normalize=True, **kw), text=True
    )


# --------------------------------------------------------------------------- the text feature store


def test_sentences_are_rows_of_the_image_store_keyed_by_normalization(text_clip_dir, ktvic_dir, tmp_path):
    enc = _encoder(text_clip_dir)
    images = sorted((ktvic_dir / "train-images").glob("*.jpg"))[:3]
    texts = ["Một hình tròn màu đỏ.", "Hai hình vuông."]
    store = extract_features(enc, images, tmp_path, texts=texts, text_normalizer="vi-1", progress=False)
    assert len(store.rows) == 5 and store.dim == enc.embed_dim
    for t in texts:  # the row is the text tower's L2-normalized embedding of the sentence
        row = torch.tensor(store.features[store.text_row(t, "vi-1")])
        assert torch.allclose(row, enc.encode_text([t])[0], atol=1e-5)
        assert abs(float(row.norm()) - 1) < 1e-5
    shards = sorted((tmp_path / enc.key / "shards").iterdir())

    calls = []
    enc.encode_text = lambda ts: calls.append(ts) or torch.zeros(len(ts), enc.embed_dim)
    again = extract_features(enc, images, tmp_path, texts=texts, text_normalizer="vi-1", progress=False)
    assert calls == [] and sorted((tmp_path / enc.key / "shards").iterdir()) == shards  # nothing encoded
    assert again.rows == store.rows
    # another normalization of the same text is another row, encoded once
    other = extract_features(enc, [], tmp_path, texts=texts[:1], text_normalizer="vi-2", progress=False)
    assert calls == [texts[:1]] and text_key(texts[0], "vi-2") in other.rows
    assert len(open_store(enc, tmp_path).rows) == 6


def test_a_sentence_that_looks_like_a_path_is_text(text_clip_dir, tmp_path):
    enc = _encoder(text_clip_dir)
    store = extract_features(enc, [], tmp_path, texts=["/etc/hostname"], text_normalizer="n", progress=False)
    key = text_key("/etc/hostname", "n")
    assert list(store.rows) == [key] and not store.failures


@pytest.mark.parametrize(
    ("case", "clip", "settings", "message"),
    [
        ("no tokenizer for the tower", "tiny_clip_dir", {}, "text_cfg.hf_tokenizer_name"),
        ("patch tokens", "text_clip_dir", {"patch_tokens": True}, "encoder.patch_tokens = false"),
    ],
)
def test_text_tower_errors(request, case, clip, settings, message) -> None:
    with pytest.raises(ModelLoadError, match=message.replace(".", r"\.")):
        _encoder(request.getfixturevalue(clip), **settings)


def test_image_rows_unchanged_by_loading_the_text_tower(text_clip_dir, ktvic_dir) -> None:
    cfg = EncoderConfig(model=f"local-dir:{text_clip_dir}", pretrained="", normalize=True)
    image = sorted((ktvic_dir / "train-images").glob("*.jpg"))[0]
    plain, with_text = load_encoder(cfg), load_encoder(cfg, text=True)
    assert plain.key == with_text.key and plain.text_model is None
    pixels = plain.preprocess(__import__("PIL.Image").Image.open(image).convert("RGB")).unsqueeze(0)
    assert torch.equal(plain.encode(pixels), with_text.encode(pixels))
    with pytest.raises(ModelLoadError, match="without its text tower"):
        plain.encode_text(["x"])


def test_hf_clip_text_tower(tmp_path, tiny_lm_dir) -> None:
    """A transformers CLIPModel folder (both towers, its tokenizer beside them) embeds sentences as
    the full model's text tower and projection do, L2-normalized like its image rows."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.pad_token = tok.eos_token
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "eos_token_id": tok.eos_token_id,
        "projection_dim": 24,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 24,
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )

    enc = load_encoder(EncoderConfig(name="hf_clip", model=str(tmp_path), normalize=True), text=True)
    sentences = ["Một hình tròn.", "Hai hình vuông màu xanh lá ở bên trái."]
    got = enc.encode_text(sentences)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(**batch).pooler_output  # the EOS position, as CLIP pools
        want = torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)
    assert got.shape == (2, 24) and torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- the `text` adapter


@pytest.mark.parametrize(
    ("case", "name", "content", "expected"),
    [
        ("blank lines are no sentences", "c.txt", "Một câu.\n\n  \nHai câu.\n", {"sentences": 2}),
        ("duplicate after normalization", "c.txt", "Một câu.\nMột  câu.\n", {"duplicate_text": ["line 2"]}),
        ("punctuation only", "c.txt", "Một câu.\n!!!\n", {"empty_caption": ["line 2"]}),
        ("NFD text is fixed", "c.txt", "Mo\u0302t câu.\n", {"nfd_text": ["line 1"], "sentences": 1}),
        ("over-long line", "c.txt", "Một câu.\n" + "a " * 400 + "\n", {"long_caption": ["line 2"]}),
        ("invalid JSON line", "c.jsonl", '{"text": "Một câu."}\nnot json\n', {"bad_entry": ["line 2"]}),
        (
            "JSON row without the key",
            "c.jsonl",
            '{"sentence": "x"}\n{"text": "Hai."}\n',
            {"bad_entry": ["line 1"]},
        ),
        ("JSON non-string text", "c.jsonl", '{"text": 3}\n{"text": "Hai."}\n', {"empty_caption": ["line 1"]}),
        ("JSON list of sentences", "c.jsonl", '{"text": ["Một.", "Hai."]}\n', {"sentences": 2}),
        (
            "lone surrogate",
            "c.jsonl",
            '{"text": "a\\ud800b"}\n{"text": "Hai."}\n',
            {"invalid_text": ["line 1"]},
        ),
        ("CSV quote left open", "c.csv", 'text\nMột câu.\n"Hai\n', {"bad_entry": ["line 3"]}),
        ("CSV wrong field count", "c.csv", "id,text\n1,Một câu.\n2,Hai,Ba\n", {"bad_entry": ["line 3"]}),
        ("CSV without the column", "c.csv", "a,b\nx,y\n", "no column 'text'"),
        ("not UTF-8", "c.txt", b"M\xf4t c\xe2u.\n", "not UTF-8"),
        ("missing file", "none.txt", None, "text corpus not found|source not found"),
        (
            "a JSON list, not JSON lines",
            "c.json",
            '["Một câu.", "Hai câu."]\n',
            r"c\.json: a text corpus is a \.txt",
        ),
    ],
)
def test_text_adapter_bad_input(tmp_path, case, name, content, expected) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "m.jsonl"
    if isinstance(expected, str):
        with pytest.raises(DataPrepError, match=expected):
            prepare("text", path, out, language="vi", stats=False)
        assert not out.exists()
        return
    report = prepare("text", path, out, language="vi", stats=False)
    kinds = {k: [p.line_or_id for p in report.problems if p.kind == k] for k in expected if k != "sentences"}
    assert kinds == {k: v for k, v in expected.items() if k != "sentences"}
    c = report.counts
    assert c["captions_read"] == c["captions"] + c["captions_skipped"]
    assert c["images_read"] == c["images"] + c["images_skipped"]
    if "sentences" in expected:
        assert c["captions"] == expected["sentences"]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["image"] == "" for line in lines[1:])


# --------------------------------------------------------------------------- recipe keys


@pytest.mark.parametrize(
    ("case", "overrides", "key"),
    [
        ("text without normalized features", {"text.source": "c.txt"}, "encoder.normalize"),
        (
            "text with patch tokens",
            {"text.source": "c.txt", "encoder.normalize": True, "encoder.patch_tokens": True},
            "encoder.patch_tokens",
        ),
        ("offset without a corpus", {"text.offset_images": "imgs"}, "text.offset_images"),
        ("column without a corpus", {"text.column": "sentence"}, "text.column"),
        (
            "column of a .txt corpus",
            {"text.source": "c.txt", "encoder.normalize": True, "text.column": "sentence"},
            "text.column",
        ),
        ("uniform noise without noise", {"train.feature_noise_kind": "uniform"}, "train.feature_noise_kind"),
        (
            "unknown noise kind",
            {"train.feature_noise": 0.1, "train.feature_noise_kind": "laplace"},
            "train.feature_noise_kind",
        ),
        ("no images and no text", {"data.image_fraction": 0}, "data.image_fraction"),
        ("fraction above 1", {"data.image_fraction": 1.5}, "data.image_fraction"),
        (
            "self-critical with text",
            {"text.source": "c.txt", "encoder.normalize": True, "scst.init_from": "runs/x"},
            "text.source",
        ),
        (
            "text with per-image grouping",
            {"text.source": "c.txt", "encoder.normalize": True, "train.group_by_image": True},
            "train.group_by_image",
        ),
        ("unknown text key", {"text.sources": "c.txt"}, "text.sources"),
    ],
)
def test_recipe_rejects(case, overrides, key) -> None:
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe("demo_vi_synthetic", ["data.source=d", *sets])


def test_baseline_rejects_an_image_fraction() -> None:
    from vicap.recipe import load_any_recipe

    with pytest.raises(RecipeError, match=r"data\.image_fraction"):
        load_any_recipe("baseline_ktvic", ["data.source=d", "data.image_fraction=0.5"])


# --------------------------------------------------------------------------- end to end


def test_text_only_run_captions_images(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir) -> None:
    from vicap.checkpoint import list_checkpoints, read_checkpoint
    from vicap.evaluate import evaluate_run
    from vicap.train import read_log, train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(builders.ktvic_captions(ktvic_dir)) + "\n", encoding="utf-8")
    extra = {
        "text.source": str(corpus),
        "text.offset_images": str(ktvic_dir / "public-test-images"),
        "data.image_fraction": "0",
        "encoder.normalize": "true",
        "train.feature_noise": "0.126",
        "train.feature_noise_kind": "uniform",
    }
    recipe = load_recipe(
        "demo_vi_synthetic", tiny_recipe_overrides(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra)
    )
    assert recipe.text_only
    run_dir = train(recipe, progress=False)
    meta = read_checkpoint(list_checkpoints(run_dir)[-1]).meta
    sources = json.loads(meta["sources"])
    distinct = len(set(builders.ktvic_captions(ktvic_dir)))
    assert sources == {"image_captions": 0, "sentences": distinct, "sentence_pairs": 0, "text_only": True}
    assert read_log(run_dir)[-1]["step"] > 0
    # no training image was even encoded: the rows are the test images and the sentences
    rows = open_store(load_encoder(recipe.encoder), recipe.data.features_dir).rows
    assert not any("train-images" in key for key in rows)
    assert sum(key.startswith("text:") for key in rows) == distinct

    report = evaluate_run(run_dir, progress=False)
    assert report["training"]["text_only"] is True
    assert "without images" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert report["images"] == 6 and all(isinstance(e["caption"], str) for e in report["examples"])

    photo = sorted((ktvic_dir / "public-test-images").glob("*.jpg"))[0]
    res = CliRunner().invoke(app, ["caption", str(run_dir), str(photo), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert photo.name in res.stdout


def test_cli_error_for_a_missing_corpus(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir) -> None:
    from tests.conftest import as_sets

    extra = {
        "text.source": str(tmp_path / "none.txt"),
        "encoder.normalize": "true",
        "data.image_fraction": "0",
    }
    sets = as_sets(tiny_recipe_overrides(tmp_path, ktvic_dir, tiny_lm_dir, text_clip_dir, **extra))
    res = CliRunner().invoke(app, ["train", "demo_vi_synthetic", *sets])
    assert res.exit_code == 2
    assert "error: " in res.stderr and "none.txt" in res.stderr and "Traceback" not in res.output


# --------------------------------------------------------------------------- run files


def test_a_text_manifest_follows_the_recipe_on_a_new_start(tmp_path) -> None:
    """A run that stopped before its first checkpoint is started again with another corpus: the
    manifest written by the first start is not reused for it."""
    from vicap.pipeline import prepare_text_manifest

    firsts = []
    for name, sentence in (("a.txt", "Một con mèo."), ("b.txt", "Hai con chó.")):
        (tmp_path / name).write_text(sentence + "\n", encoding="utf-8")
        sets = ["data.source=d", f"text.source={tmp_path / name}", "encoder.normalize=true"]
        manifest = prepare_text_manifest(load_recipe("demo_vi_synthetic", sets), tmp_path / "run", "text")
        firsts.append(manifest.records[0].captions)
    assert firsts == [("Một con mèo.",), ("Hai con chó.",)]


def test_an_image_fraction_of_no_image_is_an_error(tmp_path, ktvic_dir) -> None:
    from data_prep.manifest import read_manifest
    from vicap.train import _paired_images

    prepare("ktvic", ktvic_dir, tmp_path / "m.jsonl", language="vi", stats=False)
    manifest = read_manifest(tmp_path / "m.jsonl")
    recipe = load_recipe("demo_vi_synthetic", ["data.source=d", "data.image_fraction=0.01"])
    with pytest.raises(RecipeError, match=r"data\.image_fraction = 0\.01: .* is none"):
        _paired_images(recipe, manifest)
    kept = _paired_images(
        load_recipe("demo_vi_synthetic", ["data.source=d", "data.image_fraction=0.5"]), manifest
    )
    assert 0 < len(kept) < len(manifest.split("train"))
