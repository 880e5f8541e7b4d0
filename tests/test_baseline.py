"""The CNN+LSTM baseline: recipes, vocabulary, beam search, and train + evaluate through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tests.conftest import as_sets
from vicap.baseline.model import LSTMDecoder, beam_search
from vicap.baseline.recipe import LSTMConfig, is_baseline_recipe, load_baseline_recipe
from vicap.baseline.vocab import BOS, EOS, SPECIALS, SentencePieceVocab, Vocab, caption_tokens
from vicap.cli import app
from vicap.errors import ModelLoadError
from vicap.evaluate import FLOOR, HUMAN
from vicap.recipe import RecipeError, find_recipe, shipped_recipes

BASELINE_RECIPES = sorted(name for name in shipped_recipes() if name.startswith("baseline_"))
DEMO = find_recipe("baseline_demo_vi_synthetic")


@pytest.mark.parametrize("name", BASELINE_RECIPES)
def test_shipped_baseline_recipes_validate(name: str) -> None:
    recipe = load_baseline_recipe(name)
    assert is_baseline_recipe(name) and recipe.encoder.cnn and recipe.data.source
    assert find_recipe(name).read_text(encoding="utf-8").startswith("#"), (
        f"{name}: start with its command and targets"
    )


def test_baseline_recipes_exist() -> None:
    assert {"baseline_demo_vi_synthetic", "baseline_ktvic", "baseline_uitviic"} <= set(BASELINE_RECIPES)
    assert "baseline_coco" in BASELINE_RECIPES
    assert not is_baseline_recipe("demo_vi_synthetic")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("decoder.typ=attention", "unknown key 'decoder.typ' (did you mean 'type'?)"),
        ("decoder.type=gru", "decoder.type = 'gru': must be one of show_tell, attention"),
        ("encoder.weights=imagenet", "the tiny CNN has no pretrained weights"),
        ("train.lr=0", "train.lr = 0.0: must be > 0"),
        ("train.lr=inf", "train.lr = inf: must be a finite number"),
        ("train.seed=-1", "train.seed = -1: must be in [0, 2**32 - 1"),
        ("generate.beam_size=0", "generate.beam_size = 0: must be >= 1"),
        ("data.adapter=ktvik", "data.adapter = 'ktvik': must be one of"),
        ("kind=vicap", 'a baseline recipe starts with kind = "baseline"'),
    ],
)
def test_bad_baseline_recipes_name_the_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match="baseline_demo_vi_synthetic.toml") as e:
        load_baseline_recipe(DEMO, [override])
    assert message in str(e.value)


# The baseline decodes with its own greedy / beam search: a [generate] setting it does not implement is
# an error, so a recipe never says something that is silently not done.
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "generate.strategy=sample",
            "generate.strategy = 'sample': the baseline decodes with greedy or beam",
        ),
        ("generate.n_best=2", "generate.n_best = 2: the baseline does not implement it"),
        ("generate.temperature=0.7", "generate.temperature = 0.7: only strategy 'sample' uses it"),
        ("generate.top_k=10", "generate.top_k = 10: only strategy 'sample' uses it"),
        ("generate.top_p=0.9", "generate.top_p = 0.9: only strategy 'sample' uses it"),
        ("generate.seed=3", "generate.seed = 3: only strategy 'sample' uses it"),
        ("generate.repetition_penalty=1.2", "generate.repetition_penalty = 1.2: the baseline does not"),
        ("generate.no_repeat_ngram_size=3", "generate.no_repeat_ngram_size = 3: the baseline does not"),
        ("generate.stop=.", "generate.stop = '.': the baseline does not implement it"),
        ("generate.min_new_tokens=5", "generate.min_new_tokens = 5: the baseline does not implement it"),
    ],
)
def test_baseline_rejects_decoding_options_it_does_not_implement(override: str, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        load_baseline_recipe(DEMO, [override])
    assert str(e.value).startswith(f"{DEMO}: ") and message in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["generate.strategy=greedy"],
        ["generate.beam_size=4", "generate.length_penalty=0.5", "generate.max_new_tokens=9"],
        ["generate.top_p=1.0", "generate.temperature=1.0"],  # written out, but at their defaults
    ],
)
def test_baseline_decoding_options_it_implements(overrides: list[str]) -> None:
    load_baseline_recipe(DEMO, overrides)


def test_vocabularies_from_segmented_tokens(tmp_path: Path) -> None:
    tokens = caption_tokens(["Người đàn ông đi xe đạp.", "Một người đàn ông"], "vi", "word")
    assert tokens[0] == ["người", "đàn_ông", "đi", "xe_đạp"]  # lowercased, segmented, no punctuation
    vocab = Vocab.build(tokens, min_count=2)
    assert vocab.tokens == [*SPECIALS, "người", "đàn_ông"]  # by count; rarer tokens become <unk>
    assert vocab.decode(vocab.encode(["người", "đi"]) + [EOS]) == "người"  # <unk> and specials dropped
    texts = caption_tokens(["một con mèo đen nằm trên ghế", "hai con chó chạy trên cỏ"] * 20, "vi", "none")
    sp = SentencePieceVocab.train(texts, 40, tmp_path)
    ids = sp.encode(texts[0])
    assert ids and min(ids) >= len(SPECIALS) and sp.decode(ids) == "một con mèo đen nằm trên ghế"
    assert sp.tokens[:4] == list(SPECIALS)


@pytest.mark.parametrize("kind", ["show_tell", "attention"])
def test_beam_of_one_is_greedy(kind: str) -> None:
    torch.manual_seed(0)
    cfg = LSTMConfig(type=kind, embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0)
    dec = LSTMDecoder(cfg, vocab_size=12, feat_dim=6).eval()
    feats = torch.randn(3, 4, 6)
    got = beam_search(dec, feats, beam_size=1, max_len=7)
    with torch.no_grad():
        state, tok, greedy = dec.init_state(feats), torch.full((3,), BOS), [[] for _ in range(3)]
        done = [False] * 3
        for _ in range(7):
            logits, state = dec.step(tok, state)
            logits[:, :2] = float("-inf")  # never <pad> or <bos>
            tok = logits.argmax(-1)
            for i, t in enumerate(tok.tolist()):
                if not done[i]:
                    done[i] = t == EOS
                    if not done[i]:
                        greedy[i].append(t)
    assert got == greedy
    wide = beam_search(dec, feats, beam_size=4, max_len=7)
    assert all(len(s) <= 7 and not {0, 1, 2} & set(s) for s in wide)


def _tiny_overrides(tmp: Path, ktvic: Path, **extra: str) -> list[str]:
    base = {
        "data.source": str(ktvic),
        "data.features_dir": str(tmp / "features"),
        "data.val_fraction": "0.2",
        "train.output_dir": str(tmp / "baseline"),
        "train.epochs": "2",
        "train.batch_size": "8",
        "train.log_every": "1",
        "train.device": "cpu",
        "encoder.image_size": "32",
        "encoder.grid": "2",
        "decoder.embed_dim": "16",
        "decoder.hidden_dim": "32",
        "decoder.attention_dim": "16",
        "generate.max_new_tokens": "12",
        "eval.levels": '["syllable"]',
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_cli_baseline_train_evaluate_compare(tmp_path: Path, ktvic_dir: Path) -> None:
    runner = CliRunner()
    args = ["baseline", "train", "baseline_demo_vi_synthetic", *as_sets(_tiny_overrides(tmp_path, ktvic_dir))]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "baseline"
    assert (run / "baseline.toml").is_file() and (run / "vocab.json").is_file()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    # 19 training images (5 of 24 held out for validation), 8 per step: 3 steps per epoch, 2 epochs
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sum("val_loss" in r for r in log) == 2
    ckpt = run / "checkpoints" / "step_00000006" / "model.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    assert meta["format"] == "vicap-baseline-1" and json.loads(meta["recipe"])["kind"] == "baseline"

    res = runner.invoke(app, ["baseline", "evaluate", str(run), "--set", "generate.beam_size=2"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "baseline" and report["images"] == 6 and report["references"] == 30
    rows = report["scores"]["syllable"]
    assert set(rows) == {"CNN+LSTM (attention)", FLOOR, HUMAN}
    assert {"BLEU-4", "ROUGE-L", "CIDEr-D", "chrF"} <= set(rows["CNN+LSTM (attention)"])
    assert (
        "SPICE" in report["protocol"]["metrics"]
        and "not applicable" in report["protocol"]["metrics"]["SPICE"]
    )
    assert len((run / "captions_test.jsonl").read_text().splitlines()) == 6
    assert "## Protocol" in (run / "report.md").read_text()

    res = runner.invoke(app, ["compare", str(run), "--reference", "ktvic", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "CNN+LSTM [published, not measured]" in res.output and "baseline" in res.output

    res = runner.invoke(app, ["baseline", "evaluate", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a baseline run directory" in res.output


def test_frozen_cnn_features_are_cached(tmp_path: Path, ktvic_dir: Path) -> None:
    """A frozen CNN runs once per image into vicap's feature store; show_tell decodes from it."""
    from vicap.baseline.train import evaluate_baseline, train_baseline

    overrides = _tiny_overrides(
        tmp_path,
        ktvic_dir,
        **{"encoder.trainable": "false", "decoder.type": "show_tell", "train.epochs": "1"},
    )
    run = train_baseline(load_baseline_recipe(DEMO, overrides), progress=False)
    stores = list((tmp_path / "features").iterdir())
    (shard,) = (stores[0] / "shards").glob("*.json")
    assert len(stores) == 1 and len(json.loads(shard.read_text())["entries"]) == 30
    report = evaluate_baseline(run, ["generate.strategy=greedy", 'eval.metrics=["BLEU"]', "eval.human=false"])
    assert set(report["scores"]["syllable"]) == {"CNN+LSTM (show_tell)", FLOOR}
    assert len(list((tmp_path / "features").iterdir())) == 1  # reused, not re-encoded elsewhere


# cnn = "timm": vicap's own timm encoder, frozen, one pooled region
TIMM = ["encoder.cnn=timm", "encoder.model=test_efficientnet", "encoder.weights=w.safetensors"]
FROZEN_ONE_REGION = ["encoder.trainable=false", "encoder.grid=1", "encoder.image_size=224"]


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("no model", ["encoder.cnn=timm", *FROZEN_ONE_REGION], "names the timm model when encoder.cnn"),
        ("model without timm", ["encoder.model=test_efficientnet"], "and only then"),
        ("no weights file", [*TIMM, *FROZEN_ONE_REGION, "encoder.weights=none"], "needs the model's weights"),
        ("trainable", [*TIMM, *FROZEN_ONE_REGION, "encoder.trainable=true"], "a timm CNN is used frozen"),
        ("grid", [*TIMM, *FROZEN_ONE_REGION, "encoder.grid=2"], "gives one pooled region; use 1"),
        (
            "image size",
            [*TIMM, *FROZEN_ONE_REGION, "encoder.image_size=64"],
            "set it back to its default, 224",
        ),
    ],
)
def test_bad_timm_cnn_settings_name_the_key(case: str, overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match="baseline_demo_vi_synthetic.toml") as e:
        load_baseline_recipe(DEMO, overrides)
    assert message in str(e.value)


def test_timm_cnn_reads_vicaps_feature_store(tmp_path: Path, ktvic_dir: Path) -> None:
    """The baseline's cnn = "timm" caches the rows vicap's timm encoder writes: one store, its key."""
    import timm
    from safetensors.torch import save_file

    from vicap.baseline.train import evaluate_baseline, train_baseline
    from vicap.encoders import load_encoder
    from vicap.recipe import EncoderConfig

    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}, weights
    )
    timm_cnn = [*TIMM[:2], f"encoder.weights={weights}", *FROZEN_ONE_REGION, "decoder.type=show_tell"]
    overrides = _tiny_overrides(tmp_path, ktvic_dir, **{"train.epochs": "1"})
    run = train_baseline(load_baseline_recipe(DEMO, [*overrides, *timm_cnn]), progress=False)
    vicap_key = load_encoder(
        EncoderConfig(name="timm", model="test_efficientnet", pretrained=str(weights))
    ).key
    assert [p.name for p in (tmp_path / "features").iterdir()] == [vicap_key]
    with safe_open(str(next((run / "checkpoints").glob("*/model.safetensors"))), framework="pt") as f:
        assert all(k.startswith("decoder.") for k in f.keys())  # the timm CNN is rebuilt from its file
    report = evaluate_baseline(run, ["generate.strategy=greedy", 'eval.metrics=["BLEU"]', "eval.human=false"])
    assert set(report["scores"]["syllable"]) == {"CNN+LSTM (show_tell)", FLOOR}

    # a weights file that is not there is named by the baseline's own key
    gone = [*TIMM[:2], f"encoder.weights={tmp_path / 'gone.safetensors'}", *FROZEN_ONE_REGION]
    overrides = _tiny_overrides(tmp_path / "2", ktvic_dir)
    with pytest.raises(ModelLoadError, match=r"^encoder\.weights = '.*gone\.safetensors': file not found"):
        train_baseline(load_baseline_recipe(DEMO, [*overrides, *gone]), progress=False)
