"""Self-critical sequence training (vicap.scst), on the tiny models.

- The loss and gradients of a 2-caption batch equal a hand computation (per-caption mean token
  log-probabilities from a separate forward pass, advantages from the rewards and the baseline).
- The reward is CIDEr-D with the training references' document frequencies: per image, exactly what
  the corpus score of vicap's CIDEr-D gives that image.
- A SCST stage starts from a cross-entropy run's selected checkpoint, raises the reward on the toy set,
  trains only what the recipe trains (frozen LM: the mapper), resumes exactly, and its run loads and
  evaluates like any run. Bad settings name the key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vicap.checkpoint import list_checkpoints
from vicap.generate import _Hyp
from vicap.metrics.cider import CiderD
from vicap.recipe import GenerateConfig, RecipeError, ScstConfig
from vicap.runs import load_run
from vicap.scst import Rewarder, SelfCritical
from vicap.train import read_log, train


@pytest.fixture
def ce_run(tiny_recipe, tmp_path: Path) -> Path:
    """A cross-entropy run of the tiny models (tuned LM, 8 epochs), the start of every SCST stage."""
    return train(
        tiny_recipe(
            **{"train.epochs": "8", "decoder.tuning": "full", "train.output_dir": str(tmp_path / "ce")}
        ),
        progress=False,
    )


def _scst(tiny_recipe, ce_run: Path, tmp_path: Path, name: str = "scst", **extra: str):
    return tiny_recipe(
        **{
            "decoder.tuning": "full",
            "scst.init_from": str(ce_run),
            "scst.samples": "4",
            "train.output_dir": str(tmp_path / name),
            "train.lr": "1e-3",
            "train.warmup_steps": "0",
            "train.batch_size": "8",
            "train.epochs": "2",
            **extra,
        }
    )


@pytest.mark.parametrize("stop", ["eos", "another stop id"])
def test_loss_and_gradients_match_a_hand_computation(ce_run: Path, stop: str) -> None:
    loaded = load_run(ce_run)
    model = loaded.model.eval()  # no dropout: the two forward passes must see the same network
    # a ended with a stop token (the trained EOS, or another one the LM declares, as Gemma's
    # <end_of_turn>: the one sampled is the one whose log-prob counts), b was cut at max_new_tokens
    end = model.decoder.eos_token_id if stop == "eos" else 3
    a, b = [5, 9, 12], [7, 7]
    rewards = {"a": 1.5, "b": 0.25}
    rewarder = Rewarder({"0": ["x"]}, language="vi", level="syllable")
    objective = SelfCritical(model, ScstConfig(samples=2), GenerateConfig(), rewarder, ["0"], segment="none")
    # The samples and their rewards are given; the objective computes the rest.
    objective._captions = lambda features, cfg: [_Hyp(a, 0.0, True, end), _Hyp(b, 0.0, False)]
    objective._rewards = lambda hyps, keys: torch.tensor(
        [rewards["a"] if h.ids == a else rewards["b"] for h in hyps]
    )
    torch.manual_seed(0)
    features = torch.randn(1, loaded.checkpoint.encoder_dim)
    params = [p for p in model.parameters() if p.requires_grad]

    out = objective(features=features, image=torch.tensor([0]))
    assert int(out["tokens"]) == 2
    got = torch.autograd.grad(out["loss_sum"], params)

    # By hand: run the LM over prefix + tokens and read each token's log-probability.
    def mean_logp(tokens: list[int]) -> torch.Tensor:
        prefix = model.prefix(features)
        embeds = torch.cat([prefix, model.embed(torch.tensor([tokens]))], dim=1)
        logits = model.lm(inputs_embeds=embeds).logits[0]
        n = prefix.shape[1]
        logp = F.log_softmax(logits.float(), dim=-1)
        return torch.stack([logp[n - 1 + i, t] for i, t in enumerate(tokens)]).mean()

    # mean baseline of two samples: each is compared with the other
    hand = -((1.5 - 0.25) * mean_logp(a + [end]) + (0.25 - 1.5) * mean_logp(b))
    assert float(out["loss_sum"].detach()) == pytest.approx(float(hand.detach()), rel=1e-5, abs=1e-6)
    want = torch.autograd.grad(hand, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert float(out["stats"]["reward"]) == pytest.approx(1.75)
    assert float(out["stats"]["baseline"]) == pytest.approx(1.75)  # 0.25 + 1.5


def test_reward_is_cider_d_with_the_training_document_frequencies() -> None:
    refs = {
        "0": ["một hình tròn màu đỏ", "hình tròn đỏ ở giữa"],
        "1": ["hai hình vuông màu xanh", "hai hình vuông xanh"],
        "2": ["một hình tam giác vàng", "tam giác màu vàng"],
    }
    hyps = ["một hình tròn màu đỏ", "hai hình vuông", "hình tròn xanh"]
    rewarder = Rewarder(refs, language="vi", level="syllable")
    got = rewarder(["0", "1", "2"], hyps)
    _, per_image = CiderD(refs).score({k: [h] for k, h in zip(refs, hyps, strict=True)})
    assert got == pytest.approx(per_image, abs=1e-12)
    assert got[0] > got[2] > -1e-12


def test_scst_raises_the_reward_and_trains_what_the_recipe_trains(tiny_recipe, ce_run, tmp_path) -> None:
    run = train(_scst(tiny_recipe, ce_run, tmp_path, **{"train.epochs": "6"}), progress=False)
    rows = [r for r in read_log(run) if "reward" in r]
    assert len(rows) == 18 and all({"loss", "reward", "baseline"} <= set(r) for r in rows)
    # Rewards of single steps are noisy (8 images x 4 samples); compare the first and last thirds.
    before = sum(r["reward"] for r in rows[:6]) / 6
    after = sum(r["reward"] for r in rows[-6:]) / 6
    assert after > 1.5 * before > 0, (before, after)
    # The run is an ordinary vicap run: it loads and captions.
    loaded = load_run(run)
    assert loaded.checkpoint.meta["scst_init"].startswith(str(ce_run))


def test_frozen_lm_scst_changes_only_the_mapper(tiny_recipe, tmp_path, ktvic_dir) -> None:
    frozen = {"decoder.tuning": "frozen", "train.output_dir": str(tmp_path / "ce-frozen")}
    ce = train(tiny_recipe(**frozen), progress=False)
    run = train(
        _scst(tiny_recipe, ce, tmp_path, **{"decoder.tuning": "frozen", "train.epochs": "1"}), progress=False
    )
    start = load_file(str(list_checkpoints(ce)[-1] / "model.safetensors"))
    end = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert start.keys() == end.keys() and all(k.startswith("mapper.") for k in end)
    assert any(not torch.equal(start[k], end[k]) for k in end)


@pytest.mark.parametrize(
    "model",
    [
        {"decoder.tuning": "lora", "decoder.lora_rank": "4"},
        {
            "decoder.tuning": "frozen",
            "mapper.type": "transformer",
            "mapper.num_layers": "1",
            "mapper.num_heads": "4",
        },
    ],
    ids=["mlp+lora", "transformer+frozen"],
)
def test_every_mapper_and_tuning_mode_trains_what_it_trains(tiny_recipe, tmp_path, model) -> None:
    one = {**model, "train.epochs": "1"}
    ce = train(tiny_recipe(**one, **{"train.output_dir": str(tmp_path / "ce")}), progress=False)
    run = train(_scst(tiny_recipe, ce, tmp_path, **one), progress=False)
    start = load_file(str(list_checkpoints(ce)[-1] / "model.safetensors"))
    end = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert start.keys() == end.keys()  # LoRA: adapters + mapper; frozen: the mapper only
    changed = {k.split(".")[0] for k in end if not torch.equal(start[k], end[k])}
    assert "mapper" in changed and (changed == {"mapper"}) == (model["decoder.tuning"] == "frozen")
    assert load_run(run).model.tuning == model["decoder.tuning"]


def test_scst_resumes_exactly(tiny_recipe, ce_run, tmp_path) -> None:
    run = train(_scst(tiny_recipe, ce_run, tmp_path, **{"train.save_every": "2"}), progress=False)
    other = tmp_path / "again"
    shutil.copytree(run, other)
    for ckpt in list_checkpoints(other)[-1:]:  # killed before the last save
        shutil.rmtree(ckpt)
    train(
        _scst(tiny_recipe, ce_run, tmp_path, name="again", **{"train.save_every": "2"}),
        resume=True,
        progress=False,
    )
    a = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(other)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_baseline_and_validation_selection(tiny_recipe, ce_run, tmp_path) -> None:
    run = train(
        _scst(
            tiny_recipe,
            ce_run,
            tmp_path,
            **{"scst.baseline": "greedy", "data.val_fraction": "0.2", "train.epochs": "1"},
        ),
        progress=False,
    )
    assert [r for r in read_log(run) if "baseline" in r]
    assert [r for r in read_log(run) if "select" in r and "CIDEr-D" in r["val"]]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"scst.samples": "1"}, "sample at least 2"),
        ({"scst.temperature": "0"}, "scst.temperature"),
        ({"scst.baseline": "max"}, "scst.baseline"),
        ({"scst.init_checkpoint": "first"}, "scst.init_checkpoint"),
        ({"scst.level": "char"}, "scst.level"),
        ({"scst.samples": "8"}, "applies only to a self-critical stage"),  # no init_from: not ignored
    ],
)
def test_bad_scst_settings_name_the_key(tiny_recipe, override, message) -> None:
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(**override)


def test_init_run_must_have_the_same_model(tiny_recipe, ce_run, tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"mapper.prefix_length: checkpoint 2 vs recipe 3"):
        train(_scst(tiny_recipe, ce_run, tmp_path, **{"mapper.prefix_length": "3"}), progress=False)
    with pytest.raises(RecipeError, match="not a vicap run directory"):
        train(_scst(tiny_recipe, tmp_path / "nothing", tmp_path, name="x"), progress=False)
