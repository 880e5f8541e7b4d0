"""Causal LM families through the whole path: a tiny random LM of each family (tests/conftest.py
TINY_LMS: Llama, Gemma 3, Qwen2, Qwen3, BLOOM, GPT-NeoX) saved as a Hugging Face folder, loaded by
`load_decoder`, trained with `vicap.train.train` in every tuning mode, then captioned and scored with
`evaluate_run`.

The families differ in the conventions the code must not assume: tied or separate output embeddings, a
BOS the tokenizer puts before every text (fed after the prefix) or none, a pad token or none (vicap pads
with EOS), one EOS id or several (Gemma's <end_of_turn>, Qwen's <|endoftext|>), and input embeddings the
LM scales itself (Gemma multiplies them by sqrt(hidden) inside its embedding module).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import builders
from tests.conftest import TINY_LMS, save_tiny_lm
from vicap.checkpoint import list_checkpoints
from vicap.data import encode_captions
from vicap.decoders import load_decoder
from vicap.evaluate import evaluate_run
from vicap.model import CaptionModel
from vicap.recipe import DecoderConfig, MapperConfig
from vicap.runs import load_run
from vicap.train import read_log, train


@pytest.fixture(scope="module")
def lms(tmp_path_factory, ktvic_dir: Path) -> dict[str, Path]:
    flat = builders.ktvic_captions(ktvic_dir)
    root = tmp_path_factory.mktemp("lms")
    return {family: save_tiny_lm(root / family, flat, family) for family in TINY_LMS}


# (family, LM class, eos, pad, prompt ids, stop ids, tied embeddings)
CONVENTIONS = [
    ("llama-untied-nopad", "LlamaForCausalLM", 2, 2, [1], (2,), False),  # no pad: pads with EOS
    ("llama-tied-pad", "LlamaForCausalLM", 2, 3, [1], (2,), True),
    ("gemma3", "Gemma3ForCausalLM", 1, 0, [2], (1, 4), True),  # <end_of_turn> (4) stops too
    ("qwen2", "Qwen2ForCausalLM", 2, 0, [], (2, 0), True),  # no BOS; its pad is an EOS as well
    ("qwen3", "Qwen3ForCausalLM", 0, 0, [], (0,), False),
    ("bloom", "BloomForCausalLM", 2, 3, [], (2,), True),
    ("gpt-neox", "GPTNeoXForCausalLM", 0, 0, [], (0,), False),
]


def test_every_family_is_tested() -> None:
    assert {c[0] for c in CONVENTIONS} == set(TINY_LMS)


@pytest.mark.parametrize(("family", "cls", "eos", "pad", "prompt", "stops", "tied"), CONVENTIONS)
def test_conventions_are_read_from_the_model(
    lms: dict[str, Path], ktvic_dir: Path, family, cls, eos, pad, prompt, stops, tied
) -> None:
    dec = load_decoder(DecoderConfig(model=str(lms[family])))
    assert type(dec.lm).__name__ == cls
    assert (dec.eos_token_id, dec.pad_token_id, dec.prompt_ids, dec.stop_ids, dec.hidden_size) == (
        eos,
        pad,
        prompt,
        stops,
        32,
    )
    assert (dec.lm.get_output_embeddings().weight is dec.lm.get_input_embeddings().weight) == tied
    assert all(p.dtype == torch.float32 for p in dec.lm.parameters())
    ids = encode_captions([builders.ktvic_captions(ktvic_dir)[0]], dec, 40)[0]
    specials = len(TINY_LMS[family].specials)
    assert ids[-1] == eos and all(i >= specials for i in ids[:-1])  # no BOS inside, every word known


@pytest.mark.parametrize("family", list(TINY_LMS))
def test_caption_tokens_are_embedded_as_the_lm_embeds_its_own(lms: dict[str, Path], family: str) -> None:
    """The caption (and BOS) embeddings fed as inputs_embeds give the logits the LM gives for the token
    ids: whatever the LM does to its input embeddings (Gemma's scaling) happens once, not zero times or
    twice."""
    dec = load_decoder(DecoderConfig(model=str(lms[family])))
    model = CaptionModel(MapperConfig(prefix_length=2), 8, dec, "frozen")
    ids = torch.tensor([dec.prompt_ids + [7, 9, 11, dec.eos_token_id]])
    torch.testing.assert_close(dec.lm(inputs_embeds=model.embed(ids)).logits, dec.lm(input_ids=ids).logits)


def test_gemma_embeddings_are_scaled_by_the_lm_itself(lms: dict[str, Path]) -> None:
    dec = load_decoder(DecoderConfig(model=str(lms["gemma3"]), dtype="bfloat16"))
    model = CaptionModel(MapperConfig(prefix_length=2), 8, dec, "frozen")
    ids = torch.tensor([[2, 7, 9]])
    raw = dec.lm.get_input_embeddings().weight[ids]
    # sqrt(32) rounded to bfloat16, as Gemma does it
    scale = torch.tensor(32**0.5).to(torch.bfloat16)
    torch.testing.assert_close(model.embed(ids), raw * scale)


@pytest.mark.parametrize("family", ["gemma3", "llama-untied-nopad"])
def test_the_output_layer_gets_a_contiguous_input_when_decoding(lms: dict[str, Path], family: str) -> None:
    """logits_to_keep=1 hands the output layer a strided view of the last position, which a bfloat16
    F.linear on CPU multiplies by copying the whole (vocab, hidden) weight per row; the decoder's hook
    hands it a contiguous copy (CaptionModel sets that up), and the logits are those of the full
    forward's last position."""
    dec = load_decoder(DecoderConfig(model=str(lms[family]), dtype="bfloat16"))
    CaptionModel(MapperConfig(prefix_length=2), 8, dec, "frozen")  # sets the hook on the LM, once
    CaptionModel(MapperConfig(prefix_length=2), 8, dec, "frozen")
    assert len(dec.lm.get_output_embeddings()._forward_pre_hooks) == 1
    seen: list[bool] = []
    dec.lm.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    embeds = dec.lm.get_input_embeddings()(torch.tensor([[3, 7, 9, 11], [5, 6, 8, 10]]))
    with torch.no_grad():
        last = dec.lm(inputs_embeds=embeds, logits_to_keep=1).logits
        full = dec.lm(inputs_embeds=embeds).logits
    assert seen == [True, True]
    torch.testing.assert_close(last[:, -1], full[:, -1])


LORA_TARGETS = {"bloom": {"query_key_value"}, "gpt-neox": {"query_key_value"}}  # others: q_proj, v_proj
TUNINGS = ("frozen", "lora", "full")


@pytest.mark.parametrize(
    ("family", "tuning", "mapper"),
    [
        (family, tuning, "transformer" if (i + j) % 2 else "mlp")
        for i, family in enumerate(TINY_LMS)
        for j, tuning in enumerate(TUNINGS)
    ],
)
def test_family_trains_and_captions(
    lms: dict[str, Path], tiny_recipe, family: str, tuning: str, mapper: str
) -> None:
    recipe = tiny_recipe(
        **{
            "decoder.model": str(lms[family]),
            "decoder.tuning": tuning,
            "mapper.type": mapper,
            "mapper.num_layers": "1",
            "mapper.num_heads": "4",
            "train.epochs": "2",
            "train.lr": "5e-3",
        }
    )
    run = train(recipe, progress=False)
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert len(losses) == 16 and losses[-1] < losses[0]
    state = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    lm_keys = {k for k in state if k.startswith("lm.")}
    if tuning == "frozen":
        assert not lm_keys
    elif tuning == "lora":
        assert lm_keys and all(".lora_" in k for k in lm_keys)
        # peft's default targets for the architecture
        assert {k.split(".")[-4] for k in lm_keys} == LORA_TARGETS.get(family, {"q_proj", "v_proj"})
    else:
        lm = load_run(run).model.lm
        embed = next(f"lm.{n}" for n, p in lm.named_parameters() if p is lm.get_input_embeddings().weight)
        out = next(f"lm.{n}" for n, m in lm.named_modules() if m is lm.get_output_embeddings()) + ".weight"
        assert embed in lm_keys and (out in lm_keys) != TINY_LMS[family].tied  # tied: stored once

    model = load_run(run).model
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(v, state[k])
    report = evaluate_run(run, ["generate.strategy=greedy"], progress=False)
    assert report["images"] == 6
    captions = [e["caption"] for e in report["examples"]]
    assert all(isinstance(c, str) for c in captions)
    specials = TINY_LMS[family].specials
    assert not any(t in c for c in captions for t in specials)
