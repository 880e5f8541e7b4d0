"""train.group_by_image: each image's mapper and LM prefix computed once for all of its captions.

- Exactness: for a fixed batch, the grouped computation (`CaptionModel.forward(..., image=...)`: one
  LM pass over each image's prefix with its KV cache, the cache copied to the image's captions) gives
  the loss, logits and gradients of the ungrouped forward on the same captions to float32 rounding,
  for a GPT-2 (learned positions) and a Llama (rotary positions, a start token after the prefix,
  grouped KV heads), every mapper, and frozen / LoRA / full tuning; and the same validation loss.
- Batches: the shuffle is of images, each image's captions kept together; every caption once an
  epoch; processes take contiguous slices of the same global batches; a resume continues the order.
- Training: `vicap train` with the option trains, resumes exactly, covers every caption once an
  epoch as the ungrouped run does, trains like it on 2 processes and with accumulation.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tests.conftest import tiny_llama_config
from vicap.checkpoint import latest_checkpoint, list_checkpoints
from vicap.data import Collator, GlobalBatches
from vicap.decoders import Decoder
from vicap.model import CaptionModel
from vicap.recipe import DecoderConfig, MapperConfig, RecipeError, TrainConfig, load_recipe
from vicap.train import make_accelerator, mean_loss, read_log, train

VOCAB, WIDTH, D_FEAT = 40, 32, 12


def _model(lm_kind: str, mapper: str, tuning: str) -> CaptionModel:
    """A tiny GPT-2 or Llama caption model. Dropout is 0 everywhere: with dropout on, the ungrouped
    forward draws an independent mask for each caption's copy of the prefix and the grouped one a
    single mask for the image, so the two would compute different (equally valid) random functions."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    if lm_kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=WIDTH,
            n_layer=2,
            n_head=4,
            bos_token_id=2,
            eos_token_id=2,
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        lm, prompt = GPT2LMHeadModel(config), []
    else:  # rotary positions, 4 query heads over 2 KV heads, and <s> fed after the prefix
        lm, prompt = LlamaForCausalLM(tiny_llama_config(VOCAB, layers=2)), [1]
    decoder = Decoder(
        lm=lm, tokenizer=None, hidden_size=WIDTH, eos_token_id=2, pad_token_id=2, prompt_ids=prompt
    )
    cfg = MapperConfig(type=mapper, prefix_length=3, clip_length=2, num_layers=1, num_heads=4, dropout=0.0)
    model = CaptionModel(cfg, D_FEAT, decoder, tuning, lora=DecoderConfig(lora_dropout=0.0))
    if tuning == "lora":  # peft starts B at zero, which would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(seed: int = 1):
    """Seven captions of three images, right-padded (lengths 6, 4, 1 (EOS alone), 6, 3, 6, 2), with
    an image's captions not all adjacent; features (images, 1 + 3 patch tokens, D)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    lengths = [6, 4, 1, 6, 3, 6, 2]
    ids = torch.randint(3, VOCAB, (len(image), max(lengths)), generator=g)
    mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 2)
    ids[torch.arange(len(image)), torch.tensor(lengths) - 1] = 2  # EOS last
    features = torch.randn(3, 4, D_FEAT, generator=g)
    return features, ids, mask, image


def _loss_and_grads(model: CaptionModel, grouped: bool, *batch):
    features, ids, mask, image = batch
    model.zero_grad(set_to_none=True)
    rows = []
    hook = model.mapper.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        out = model(features, ids, mask, image=image) if grouped else model(features[image], ids, mask)
    finally:
        hook.remove()
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, rows


@pytest.mark.parametrize("tuning", ["frozen", "lora", "full"])
@pytest.mark.parametrize("mapper", ["mlp", "transformer", "attention"])
@pytest.mark.parametrize("lm_kind", ["gpt2", "llama"])
def test_grouped_loss_and_gradients_equal_the_ungrouped(lm_kind: str, mapper: str, tuning: str) -> None:
    model = _model(lm_kind, mapper, tuning)
    model.eval()  # dropout off (see _model); gradients are still computed
    batch = _batch()
    plain, g_plain, rows_plain = _loss_and_grads(model, False, *batch)
    grouped, g_grouped, rows_grouped = _loss_and_grads(model, True, *batch)
    assert (rows_plain, rows_grouped) == ([7], [3])  # the mapper ran once per image
    _, _, mask, _ = batch
    real = mask.bool()
    tight = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(grouped["loss"], plain["loss"], **tight)
    torch.testing.assert_close(grouped["loss_sum"], plain["loss_sum"], **tight)
    assert int(grouped["tokens"]) == int(plain["tokens"]) == int(mask.sum())
    assert torch.equal(grouped["labels"], plain["labels"])
    torch.testing.assert_close(grouped["logits"][real], plain["logits"][real], **tight)
    lm_trained = {n for n in g_plain if n.startswith("lm.")}
    assert bool(lm_trained) == (tuning != "frozen") and g_plain.keys() == g_grouped.keys()
    for name, grad in g_plain.items():
        assert grad is not None and grad.abs().sum() > 0, name  # a gradient that can differ
        torch.testing.assert_close(g_grouped[name], grad, **tight, msg=name)


def test_captions_of_one_token_are_predicted_from_the_prefix_alone() -> None:
    model = _model("llama", "mlp", "full")
    model.eval()
    features, _, _, image = _batch()
    ids, mask = torch.full((len(image), 1), 2), torch.ones(len(image), 1, dtype=torch.long)
    plain, g_plain, _ = _loss_and_grads(model, False, features, ids, mask, image)
    grouped, g_grouped, _ = _loss_and_grads(model, True, features, ids, mask, image)
    torch.testing.assert_close(grouped["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_grouped[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class _Store:
    """The Collator reads rows of the feature store's (memory-mapped) array."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features


@pytest.mark.parametrize("lm_kind", ["gpt2", "llama"])
def test_validation_loss_is_the_same(lm_kind: str) -> None:
    """Validation batches are consecutive captions in record order; grouped collation gives each image
    once and the same mean loss through `mean_loss`, the validation code."""
    model = _model(lm_kind, "transformer", "full")
    g = torch.Generator().manual_seed(2)
    store = _Store(torch.randn(5, D_FEAT, generator=g).numpy())
    items = [
        (row, torch.randint(3, VOCAB, (int(n),), generator=g).tolist() + [2])
        for row, n in zip([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4], [3, 5, 2, 4, 0, 6, 1, 3, 2, 5, 4], strict=True)
    ]
    accelerator = make_accelerator(TrainConfig(device="cpu"))
    losses = {}
    for group in (False, True):
        collate = Collator(store, 2, group=group)
        batch = collate(items[:7])
        if group:  # features once per image, and each caption's row among them
            assert batch["features"].shape[0] == 4
            assert batch["image"].tolist() == [0, 0, 0, 1, 1, 2, 3]
        loader = DataLoader(
            items, batch_sampler=GlobalBatches(len(items), 4, shuffle=False), collate_fn=collate
        )
        losses[group] = mean_loss(model, loader, accelerator)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


# --------------------------------------------------------------------------- batches of whole images


def _images(n_images: int, seed: int = 0) -> np.ndarray:
    """Each item's image: 1 to 5 captions per image, items in record order."""
    counts = np.random.default_rng(seed).integers(1, 6, size=n_images)
    return np.repeat(np.arange(n_images), counts)


@pytest.mark.parametrize(
    ("case", "world", "batch", "with_lengths"),
    [
        ("one process", 1, 10, False),
        ("two processes", 2, 10, False),
        ("three processes, uneven slices", 3, 10, False),
        ("with group_by_length", 2, 10, True),
    ],
)
def test_batches_hold_whole_images_cover_the_epoch_and_resume(
    case: str, world: int, batch: int, with_lengths: bool
) -> None:
    images = _images(97)
    n = len(images)
    lengths = np.random.default_rng(1).integers(3, 30, size=n) if with_lengths else None
    shards = []
    for rank in range(world):
        s = GlobalBatches(
            n, batch, shuffle=True, seed=4, rank=rank, world=world, lengths=lengths, images=images
        )
        s.set_epoch(1)
        shards.append(list(s))
    one = GlobalBatches(n, batch, shuffle=True, seed=4, lengths=lengths, images=images)
    order = one.order(1)
    assert sorted(order) == list(range(n))  # every caption once an epoch
    runs = [images[order[0]]] + [
        images[b] for a, b in zip(order, order[1:], strict=False) if images[a] != images[b]
    ]
    assert len(runs) == len(set(runs)) == images.max() + 1  # each image's captions are together
    seen = [i for b in range(len(shards[0])) for s in shards for i in s[b]]
    assert seen == order[: len(seen)] and n - len(seen) < world  # the processes split the same batches
    assert order != GlobalBatches(n, batch, shuffle=True, seed=4, images=images).order(2)  # reshuffled
    resumed = GlobalBatches(
        n, batch, shuffle=True, seed=4, rank=world - 1, world=world, lengths=lengths, images=images
    )
    resumed.set_epoch(1, start=3)
    assert list(resumed) == shards[-1][3:]
    if with_lengths:  # images by their longest caption: less padding than whole images alone
        alone = GlobalBatches(n, batch, shuffle=True, seed=4, world=world, images=images)
        assert one.padding(lengths, 1) < alone.padding(lengths, 1)


def test_five_captions_an_image_and_batch_forty_hold_eight_whole_images() -> None:
    images = np.repeat(np.arange(40), 5)
    for b in GlobalBatches(len(images), 40, shuffle=True, seed=0, images=images):
        assert sorted(Counter(images[b].tolist()).values()) == [5] * 8


# --------------------------------------------------------------------------- training


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if "loss" in r]


def test_training_resumes_exactly_with_grouping(tiny_recipe, tmp_path: Path) -> None:
    # A tuned GPT-2 trains with dropout; a validation split adds a grouped validation pass per epoch.
    common = {
        "train.group_by_image": "true",
        "decoder.tuning": "full",
        "data.val_fraction": "0.25",
        "train.save_every": "2",
        "train.keep_checkpoints": "10",
    }
    full = train(tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "full")}), progress=False)
    half_recipe = tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "half")})
    half = train(half_recipe, progress=False)
    for p in list_checkpoints(half):  # interrupted after step 5 of 6 an epoch
        if int(p.name[5:]) > 4:
            shutil.rmtree(p)
    train(half_recipe, resume=True, progress=False)
    wa, wb = _weights(full), _weights(half)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _losses(half) == _losses(full) and len(_losses(full)) == 12
    vals = [r["val_loss"] for r in read_log(full) if "val_loss" in r]
    assert len(vals) == 2 and [r["val_loss"] for r in read_log(half) if "val_loss" in r] == vals


def test_every_caption_once_an_epoch_as_without_grouping(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    seen: list[list[tuple[int, tuple[int, ...]]]] = []
    shared: list[tuple[int, int]] = []
    collate = Collator.__call__

    def recording(self, batch):
        seen.append([(r, tuple(t)) for r, t in batch])
        out = collate(self, batch)
        shared.append((out["features"].shape[0], len(batch)))
        return out

    monkeypatch.setattr(Collator, "__call__", recording)
    epochs = {}
    for group in ("false", "true"):
        seen.clear()
        shared.clear()
        recipe = tiny_recipe(
            **{
                "train.group_by_image": group,
                "decoder.tuning": "frozen",
                "train.output_dir": str(tmp_path / group),
            }
        )
        assert len(_losses(train(recipe, progress=False))) == 16
        assert len(seen) == 16  # 120 captions of 24 images, batch 16: 8 batches an epoch, 2 epochs
        epochs[group] = [Counter(c for b in seen[e * 8 : (e + 1) * 8] for c in b) for e in range(2)]
        if group == "true":  # 16 captions of 5-caption images span at most 4 images
            assert all(images <= 4 for images, captions in shared if captions == 16)
        else:
            assert max(images for images, _ in shared) > 4
    first = epochs["false"][0]
    assert sum(first.values()) == 120 and set(first.values()) == {1}
    assert epochs["true"] == epochs["false"] == [first, first]


def test_accumulation_splits_grouped_batches_like_processes(tiny_recipe, tmp_path: Path) -> None:
    """Global batch 16 in one micro-batch, or 8 + 8 accumulated: the same optimizer steps (images
    split at different edges), the same losses and weights to float32 rounding. A frozen LM and no
    mapper dropout: random masks would be drawn in a different order (the tiny GPT-2 has dropout)."""
    common = {"train.group_by_image": "true", "decoder.tuning": "frozen", "mapper.dropout": "0.0"}
    one = train(tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "a")}), progress=False)
    acc = {"train.batch_size": "8", "train.grad_accum": "2", "train.output_dir": str(tmp_path / "b")}
    two = train(tiny_recipe(**common, **acc), progress=False)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("not a bool", ["train.group_by_image=yes"], "train.group_by_image: expected true or false"),
        (
            "self-critical stage",
            ["train.group_by_image=true", "scst.init_from=runs/x"],
            "train.group_by_image = True: applies to cross-entropy training; self-critical training",
        ),
    ],
)
def test_bad_settings_name_the_key(case: str, overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("demo_vi_synthetic", overrides)
    assert message in str(err.value)


def test_the_baseline_has_no_such_key() -> None:
    from vicap.baseline.recipe import load_baseline_recipe

    with pytest.raises(RecipeError, match="unknown key 'train.group_by_image'"):
        load_baseline_recipe("baseline_ktvic", ["train.group_by_image=true"])
