"""Every mapper and tuning mode trains and captions through vicap on tiny models; LoRA checkpoints hold
adapters only; tied embeddings; feature noise; gradient accumulation and bf16 as recipe options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vicap.captioner import caption_images
from vicap.checkpoint import list_checkpoints
from vicap.decoders import load_decoder
from vicap.evaluate import evaluate_run
from vicap.mappers import MAPPERS
from vicap.model import CaptionModel
from vicap.recipe import DecoderConfig, MapperConfig, RecipeError
from vicap.runs import load_run
from vicap.train import read_log, train

ENCODER_DIM = 24


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if "loss" in r]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


@pytest.mark.parametrize("mapper", MAPPERS.names())
def test_every_mapper_trains_and_captions(mapper: str, tiny_recipe, ktvic_dir: Path) -> None:
    extra = {"mapper.type": mapper, "mapper.num_layers": "1", "mapper.num_heads": "4", "train.epochs": "1"}
    if mapper == "attention":
        extra["encoder.patch_tokens"] = "true"
    recipe = tiny_recipe(**extra)
    run = train(recipe, progress=False)
    losses = _losses(run)
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    report = evaluate_run(run, ["generate.strategy=greedy"], progress=False)
    assert report["images"] == 6
    image = next((ktvic_dir / "public-test-images").glob("*.jpg"))
    rows = list(caption_images(run, [image], ["generate.strategy=greedy"]))  # the encoder runs live here
    assert rows[0]["image"] == str(image) and isinstance(rows[0]["caption"], str)


def test_attention_mapper_without_tokens_is_a_recipe_error(tiny_recipe) -> None:
    with pytest.raises(
        RecipeError, match=r"'attention' attends to patch tokens.*encoder\.patch_tokens = true"
    ):
        train(tiny_recipe(**{"mapper.type": "attention"}), progress=False)


# --------------------------------------------------------------------------- LoRA


def test_lora_checkpoint_holds_adapters_and_loading_applies_them(tiny_recipe, tiny_lm_dir: Path) -> None:
    recipe = tiny_recipe(
        **{"decoder.tuning": "lora", "decoder.lora_rank": "4", "train.epochs": "1", "train.lr": "1e-2"}
    )
    run = train(recipe, progress=False)
    state = _final_weights(run)
    lm_keys = [k for k in state if k.startswith("lm.")]
    assert lm_keys and all(".lora_A." in k or ".lora_B." in k for k in lm_keys)
    assert all(k.startswith(("lm.", "mapper.")) for k in state)
    assert {k.split(".")[-4] for k in lm_keys} == {"c_attn"}  # peft's default target for GPT-2
    base = load_decoder(DecoderConfig(model=str(tiny_lm_dir)))
    n_lm = sum(p.numel() for p in base.lm.parameters())
    assert sum(state[k].numel() for k in lm_keys) < n_lm / 20  # adapters, not the LM
    assert any(state[k].abs().sum() > 0 for k in lm_keys if ".lora_B." in k)  # B starts at 0: it trained

    loaded = load_run(run)
    model = loaded.model
    assert model.tuning == "lora"
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(v, state[k])
    # The adapters change what the LM computes: the loaded LM differs from the bare base LM.
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        adapted = model.lm(input_ids=ids).logits
        bare = base.lm(input_ids=ids).logits
    assert not torch.allclose(adapted, bare)
    # ... and the base weights under the adapters are the pretrained ones, untouched.
    base_w = dict(base.lm.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(
        dict(model.lm.named_parameters())["transformer.h.0.attn.c_attn.base_layer.weight"], base_w
    )
    assert evaluate_run(run, ["generate.strategy=greedy"], progress=False)["images"] == 6


def test_lora_options_and_errors(tiny_lm_dir: Path) -> None:
    cfg = DecoderConfig(
        model=str(tiny_lm_dir), tuning="lora", lora_rank=2, lora_alpha=4.0, lora_target_modules=("c_fc",)
    )
    torch.manual_seed(0)
    model = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, load_decoder(cfg), "lora", lora=cfg)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("lm.")}
    assert lora and all(".mlp.c_fc.lora_" in n for n in lora)
    a = next(p for n, p in lora.items() if ".lora_A." in n)
    assert a.shape[0] == 2  # rank
    layer = model.lm.transformer.h[0].mlp.c_fc
    assert layer.scaling["default"] == pytest.approx(4.0 / 2)
    assert model.lm.training is False
    model.train()
    assert model.lm.training  # adapters train with the LM's dropout on, as in peft fine-tuning

    bad = DecoderConfig(model=str(tiny_lm_dir), tuning="lora", lora_target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"no module named q_proj in GPT2LMHeadModel; .*c_attn"):
        CaptionModel(MapperConfig(), ENCODER_DIM, load_decoder(bad), "lora", lora=bad)
    with pytest.raises(ValueError, match="decoder.lora_rank = 0: must be > 0"):
        DecoderConfig(tuning="lora", lora_rank=0)
    with pytest.raises(ValueError, match="decoder.dtype = 'bfloat16': a fully tuned LM trains in float32"):
        DecoderConfig(tuning="full", dtype="bfloat16")


# --------------------------------------------------------------------------- full tuning, tied embeddings


def test_full_tuning_stores_tied_embeddings_once(tiny_recipe) -> None:
    run = train(tiny_recipe(**{"decoder.tuning": "full", "train.epochs": "1"}), progress=False)
    state = _final_weights(run)
    assert "lm.transformer.wte.weight" in state and "lm.lm_head.weight" not in state  # one tied tensor
    model = load_run(run).model
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight  # still tied after loading
    torch.testing.assert_close(model.lm.lm_head.weight.detach(), state["lm.transformer.wte.weight"])


# --------------------------------------------------------------------------- recipe options


def test_feature_noise_is_added_in_training_only(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    forward = CaptionModel.forward

    def spy(self, features, input_ids, attention_mask):
        if self.training:
            seen.append(features.detach().clone())
        return forward(self, features, input_ids, attention_mask)

    monkeypatch.setattr(CaptionModel, "forward", spy)
    common = {"train.epochs": "1", "data.val_fraction": "0.2"}  # a val split: its loss is noise-free
    clean = train(tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "a")}), progress=False)
    clean_feats = seen[0]
    seen.clear()
    noisy = train(
        tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "b"), "train.feature_noise": "0.5"}),
        progress=False,
    )
    diff = seen[0] - clean_feats  # same seed, same batches: the difference is the noise
    assert diff.std().item() == pytest.approx(0.5, rel=0.1) and diff.mean().abs() < 0.05
    assert _losses(clean) != _losses(noisy)
    # Evaluation sees clean features: captioning is deterministic and identical run to run.
    a = evaluate_run(noisy, ["generate.strategy=greedy"], progress=False)
    b = evaluate_run(noisy, ["generate.strategy=greedy"], progress=False)
    assert a["examples"] == b["examples"]


def test_grad_accumulation_equals_the_larger_batch(tiny_recipe, tmp_path: Path) -> None:
    # 16 captions in one micro-batch, or 2 micro-batches of 8 accumulated: the same optimizer steps,
    # because every step's loss is the mean over all of its tokens however it is split.
    # (A frozen LM: a tuned one trains with dropout, whose masks depend on how the batch is split.)
    frozen = {"decoder.tuning": "frozen"}
    big = train(tiny_recipe(**frozen, **{"train.output_dir": str(tmp_path / "big")}), progress=False)
    acc = train(
        tiny_recipe(
            **frozen,
            **{"train.output_dir": str(tmp_path / "acc"), "train.batch_size": "8", "train.grad_accum": "2"},
        ),
        progress=False,
    )
    assert _losses(acc) == pytest.approx(_losses(big), rel=1e-5)
    wa, wb = _final_weights(big), _final_weights(acc)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_bf16_mixed_precision_trains_close_to_fp32(tiny_recipe, tmp_path: Path) -> None:
    fp32 = train(
        tiny_recipe(**{"train.output_dir": str(tmp_path / "fp32"), "train.epochs": "1"}), progress=False
    )
    bf16 = train(
        tiny_recipe(
            **{
                "train.output_dir": str(tmp_path / "bf16"),
                "train.epochs": "1",
                "train.mixed_precision": "bf16",
            }
        ),
        progress=False,
    )
    a, b = _losses(fp32), _losses(bf16)
    assert len(b) == 8 and a != b  # autocast really ran in bf16 ...
    assert b == pytest.approx(a, rel=2e-2)  # ... and tracks the fp32 run
    assert all(v.dtype == torch.float32 for v in _final_weights(bf16).values())  # fp32 master weights


def test_frozen_lm_can_be_held_in_bfloat16(tiny_lm_dir: Path) -> None:
    dec = load_decoder(DecoderConfig(model=str(tiny_lm_dir), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in dec.lm.parameters())
    torch.manual_seed(0)
    model = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, dec, "frozen").train()
    assert model.mapper_dtype == torch.float32  # the trained part keeps float32 weights
    ids = torch.tensor([dec.tokenizer("một con mèo")["input_ids"] + [dec.eos_token_id]])
    out = model(torch.randn(1, ENCODER_DIM), ids, torch.ones_like(ids))
    assert out["loss_sum"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.mapper.parameters())
    assert model.prefix(torch.randn(2, ENCODER_DIM)).dtype == torch.bfloat16
