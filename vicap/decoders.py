"""Decoders: any Hugging Face causal LM, by hub id or local directory, with its tokenizer.

The code is LM-agnostic: widths come from the model's input embeddings, BOS/EOS/pad from the
tokenizer and config. Captions are trained to end with the tokenizer's EOS; any other EOS id the LM's
config or generation config declares (Gemma 3's <end_of_turn>, Qwen's <|endoftext|>) ends a generated
caption too. LMs without a pad token (GPT-2, Llama) pad with EOS; padding never reaches the loss
(labels are -100 there) and the attention mask hides it. Input embeddings are always the LM's own
embedding module's output, so an LM that scales them there (Gemma, by sqrt(hidden)) sees captions
embedded exactly as it embeds its own tokens. Tied input/output embeddings are one
parameter, so a tuned LM's checkpoint stores it once and loading re-ties it.

Tuning modes (`decoder.tuning`): 'frozen' (requires_grad off, eval mode), 'full' (every LM weight
trains), 'lora' (peft LoRA adapters injected into the LM in place; only they train).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vicap.encoders import hf_load_error
from vicap.errors import ModelLoadError, RecipeError
from vicap.gguf_files import gguf_folder
from vicap.recipe import DecoderConfig
from vicap.resolve import resolve

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Decoder:
    lm: nn.Module
    tokenizer: object
    hidden_size: int
    eos_token_id: int
    pad_token_id: int
    prompt_ids: list[int]  # tokens the tokenizer puts before a text (Llama's BOS), fed after the prefix
    # every token that ends a caption: eos_token_id (what captions are trained to end with) and any
    # other EOS the LM declares (Gemma's <end_of_turn>, an instruct model's end of message)
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.stop_ids = tuple(dict.fromkeys((self.eos_token_id, *self.stop_ids)))


def fuse_activations(lm: nn.Module) -> int:
    """Swap GPT-2's tanh-approximated GELU, written in Python ops, for PyTorch's fused kernel of the
    same formula (`nn.GELU(approximate="tanh")`); returns how many modules were swapped.

    `NewGELUActivation` ("gelu_new", GPT-2's default) and `FastGELUActivation` ("gelu_fast") compute
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with five element-wise ops, each a full pass over
    the MLP activations and each kept for the backward pass; the fused kernel is one pass. Outputs
    agree to float rounding (in float32 max |diff| ~2e-7, tested; in bfloat16/float16 the Python
    version rounds after every op, so they differ by a few low-precision ulps), and a frozen
    GPT-2-small trains ~12% faster on CPU (bench/train_throughput.py). Weights and the saved config
    are untouched.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation

    swapped = 0
    for module in list(lm.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def contiguous_output_input(lm: nn.Module) -> None:
    """Give the LM's output layer a contiguous input (see `_contiguous_input`), once per LM."""
    head = lm.get_output_embeddings()
    if head is not None and not getattr(head, "_vicap_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._vicap_contiguous_input = True


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for the LM's output layer: its input made contiguous.

    Decoding asks the LM for the last position's logits only (`logits_to_keep=1`), so the output layer
    gets `hidden[:, -1:]`, a strided view. On CPU, a bfloat16 `F.linear` over such a view copies the
    (vocab, hidden) weight once per row: measured with Gemma 3's 262,144 x 640 output layer and 4 rows,
    3.1 s and 1.3 GB against 25 ms and 2 MB for the same product on a contiguous input (float32 is not
    affected). The copy made here is one (rows, hidden) tensor."""
    return (args[0].contiguous(), *args[1:])


def _start_tokens(tokenizer) -> list[int]:
    """The special tokens a tokenizer puts in front of any text (BOS for Llama-style, none for GPT-2)."""
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def load_decoder(cfg: DecoderConfig) -> Decoder:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve(cfg.model, "decoder.model", gguf_file=cfg.gguf_file)
    try:
        # a GGUF file is converted once into a cached Hugging Face folder, which loads like any other
        target = str(gguf_folder(ref, cfg.dtype)) if ref.kind == "gguf" else ref.target
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=ref.local)
        # An explicit dtype: transformers 5 otherwise keeps the dtype the weights were saved in.
        lm = AutoModelForCausalLM.from_pretrained(target, local_files_only=ref.local, dtype=DTYPES[cfg.dtype])
    except ModelLoadError:
        raise
    except Exception as e:
        raise hf_load_error(ref, "decoder", e) from e
    declared = [  # EOS ids the LM's config and generation config declare: one id or a list each
        i
        for source in (lm.config, getattr(lm, "generation_config", None))
        for ids in [getattr(source, "eos_token_id", None)]
        for i in (ids if isinstance(ids, list) else [ids])
        if i is not None
    ]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (declared or [None])[0]
    if eos is None:
        raise ModelLoadError(f"decoder {cfg.model!r} defines no EOS token; captions need one to stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    hidden = lm.get_input_embeddings().embedding_dim
    if cfg.tuning == "frozen":
        lm.requires_grad_(False)
    lm.eval()
    prompt = _start_tokens(tokenizer)
    decoder = Decoder(
        lm=lm,
        tokenizer=tokenizer,
        hidden_size=hidden,
        eos_token_id=int(eos),
        pad_token_id=int(pad),
        prompt_ids=prompt,
        stop_ids=tuple(int(i) for i in declared),
    )
    log.info(
        "decoder %s: %s, hidden=%d, vocab=%d, eos=%d, stops at %s, pad=%d, prompt=%s",
        cfg.model,
        type(lm).__name__,
        hidden,
        lm.get_input_embeddings().num_embeddings,
        eos,
        list(decoder.stop_ids),
        pad,
        prompt,
    )
    return decoder


def add_lora(lm: nn.Module, cfg: DecoderConfig) -> nn.Module:
    """Freeze `lm` and inject LoRA adapters (peft) into it in place; only the adapters train.

    Target modules default to peft's table for the architecture (GPT-2: c_attn, Llama: q_proj and
    v_proj). GPT-2-style Conv1D layers store weights as (in, out), which peft must be told.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    model_type = getattr(getattr(lm, "config", None), "model_type", "")
    targets = list(cfg.lora_target_modules) or list(DEFAULT_TARGETS.get(model_type, []))
    if not targets:
        raise RecipeError(
            f"decoder.lora_target_modules is empty and peft has no default for model type {model_type!r}; "
            'name the attention projections, e.g. ["q_proj", "v_proj"]'
        )
    matched = {
        t: [m for n, m in lm.named_modules() if n == t or n.endswith("." + t)] for t in targets
    }  # peft's own rule: a target names a module or a dotted suffix of one
    missing = [t for t, found in matched.items() if not found]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
        )
        raise RecipeError(
            f"decoder.lora_target_modules: no module named {', '.join(missing)} in {type(lm).__name__}; "
            f"its linear layers are named {', '.join(linear)}"
        )
    conv1d = any(type(m).__name__ == "Conv1D" for found in matched.values() for m in found)
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
    )
    lm.requires_grad_(False)
    lm = inject_adapter_in_model(config, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_(".lora_" in name)
    n = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d alpha=%g on %s: %s adapter parameters", cfg.lora_rank, cfg.lora_alpha, targets, f"{n:,}"
    )
    return lm


def save_tiny_gpt2(
    out: Path, texts: list[str], *, vocab_size: int = 400, width: int = 128, layers: int = 2, seed: int = 0
) -> Path:
    """A tiny randomly initialised GPT-2 (64 positions, 4 heads) with a byte-level BPE trained on
    `texts`, saved as a Hugging Face model folder: the stand-in LM of the demo and the tests, loaded
    back through `load_decoder` like any real one. EOS = BOS = unk = <|endoftext|>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    eos = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[eos], show_progress=False
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out
