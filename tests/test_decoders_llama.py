"""A non-GPT-2 LM through the whole path: tiny Llamas saved as Hugging Face folders, trained with
`vicap.train.train` in every tuning mode, then captioned and scored with `evaluate_run`.

The two Llamas differ in the conventions the code must not assume: one has no pad token and separate
input/output embeddings, the other a pad token of its own and tied embeddings. Both tokenizers put
<s> before every text (fed after the prefix) and captions end with </s>.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import builders
from tests.conftest import save_tiny_llama
from vicap.checkpoint import list_checkpoints
from vicap.data import encode_captions
from vicap.decoders import load_decoder
from vicap.evaluate import evaluate_run
from vicap.recipe import DecoderConfig
from vicap.runs import load_run
from vicap.train import read_log, train


@pytest.fixture(scope="module")
def llamas(tmp_path_factory, ktvic_dir: Path) -> dict[str, Path]:
    flat = builders.ktvic_captions(ktvic_dir)
    root = tmp_path_factory.mktemp("llamas")
    return {
        "untied-nopad": save_tiny_llama(root / "untied-nopad", flat, pad=False, tied=False),
        "tied-pad": save_tiny_llama(root / "tied-pad", flat, pad=True, tied=True),
    }


def test_llama_conventions_are_read_from_the_model(llamas: dict[str, Path], ktvic_dir: Path) -> None:
    a = load_decoder(DecoderConfig(model=str(llamas["untied-nopad"])))
    assert (a.eos_token_id, a.pad_token_id, a.prompt_ids, a.hidden_size) == (2, 2, [1], 32)  # pads with EOS
    assert a.lm.lm_head.weight is not a.lm.model.embed_tokens.weight
    b = load_decoder(DecoderConfig(model=str(llamas["tied-pad"])))
    assert (b.eos_token_id, b.pad_token_id, b.prompt_ids) == (2, 3, [1])
    assert b.lm.lm_head.weight is b.lm.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in b.lm.parameters())
    captions = builders.ktvic_captions(ktvic_dir)
    ids = encode_captions([captions[0]], b, 40)[0]
    assert ids[-1] == 2 and 1 not in ids and 0 not in ids  # no BOS inside, EOS last, every word known


@pytest.mark.parametrize(
    ("llama", "tuning", "mapper"),
    [
        ("untied-nopad", "frozen", "transformer"),
        ("untied-nopad", "lora", "mlp"),
        ("tied-pad", "full", "mlp"),
    ],
)
def test_llama_trains_and_captions(
    llamas: dict[str, Path], tiny_recipe, llama: str, tuning: str, mapper: str
) -> None:
    recipe = tiny_recipe(
        **{
            "decoder.model": str(llamas[llama]),
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
        assert {k.split(".")[-4] for k in lm_keys} == {"q_proj", "v_proj"}  # peft's Llama default
    else:
        assert "lm.model.embed_tokens.weight" in lm_keys and "lm.lm_head.weight" not in lm_keys  # tied: once

    model = load_run(run).model
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(v, state[k])
    report = evaluate_run(run, ["generate.strategy=greedy"], progress=False)
    assert report["images"] == 6
    captions = [e["caption"] for e in report["examples"]]
    assert all(isinstance(c, str) for c in captions)
    assert not any(t in c for c in captions for t in ("<s>", "</s>", "<pad>"))
