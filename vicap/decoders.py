"""Decoders: any Hugging Face causal LM, by hub id or local directory, with its tokenizer.

The code is LM-agnostic: widths come from the model's input embeddings, BOS/EOS/pad from the
tokenizer and config. LMs without a pad token (GPT-2, Llama) pad with EOS; padding never reaches the
loss (labels are -100 there) and the attention mask hides it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vicap.encoders import ModelLoadError
from vicap.recipe import DecoderConfig

log = logging.getLogger(__name__)


@dataclass
class Decoder:
    lm: nn.Module
    tokenizer: object
    hidden_size: int
    eos_token_id: int
    pad_token_id: int
    prompt_ids: list[int]  # tokens the tokenizer puts before a text (Llama's BOS), fed after the prefix


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

    local = Path(cfg.model).is_dir()
    if not local and (cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
        raise ModelLoadError(f"decoder.model = {cfg.model!r}: directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=local)
        lm = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=local)
    except Exception as e:
        raise ModelLoadError(
            f"could not load decoder {cfg.model!r}: {type(e).__name__}: {e}\n"
            "vicap looked for a local directory of that name, then the Hugging Face cache/hub. Offline, run "
            f"`huggingface-cli download {cfg.model} --local-dir DIR` on a connected machine, copy DIR here "
            "and set decoder.model = DIR."
        ) from e
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else lm.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise ModelLoadError(f"decoder {cfg.model!r} defines no EOS token; captions need one to stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    hidden = lm.get_input_embeddings().embedding_dim
    if cfg.tuning == "frozen":
        lm.requires_grad_(False)
    lm.eval()
    prompt = _start_tokens(tokenizer)
    log.info(
        "decoder %s: %s, hidden=%d, vocab=%d, eos=%d, pad=%d, prompt=%s",
        cfg.model,
        type(lm).__name__,
        hidden,
        lm.get_input_embeddings().num_embeddings,
        eos,
        pad,
        prompt,
    )
    return Decoder(
        lm=lm,
        tokenizer=tokenizer,
        hidden_size=hidden,
        eos_token_id=int(eos),
        pad_token_id=int(pad),
        prompt_ids=prompt,
    )
