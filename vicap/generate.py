"""Caption generation from image features, driven through Hugging Face `generate(inputs_embeds=...)`.

`generate` brings the KV cache, batched greedy and beam search, and EOS stopping for any causal LM,
so vicap does not keep a decoding loop of its own.
"""

from __future__ import annotations

import torch

from data_prep.languages import get_language
from vicap.model import CaptionModel
from vicap.recipe import GenerateConfig


def postprocess(text: str, language: str, segment: str) -> str:
    """LM output -> display text: word segmentation undone, whitespace tidied."""
    text = text.strip()
    if segment != "none":
        text = get_language(language).desegment(text)
    return " ".join(text.split())


@torch.no_grad()
def generate_ids(model: CaptionModel, features: torch.Tensor, cfg: GenerateConfig) -> list[list[int]]:
    """Token ids (EOS and padding removed) for a batch of image features."""
    model.eval()
    features = features.to(next(model.parameters()).device)
    prefix = model.prefix(features)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    dec = model.decoder
    beams = cfg.beam_size if cfg.strategy == "beam" else 1
    out = model.lm.generate(
        inputs_embeds=prefix,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        num_beams=beams,
        length_penalty=cfg.length_penalty,
        do_sample=False,
        eos_token_id=dec.eos_token_id,
        pad_token_id=dec.pad_token_id,
    )
    ids = []
    for row in out.tolist():  # decoder-only generate with inputs_embeds returns only new tokens
        ids.append(row[: row.index(dec.eos_token_id)] if dec.eos_token_id in row else row)
    return ids


def generate_captions(
    model: CaptionModel, features: torch.Tensor, cfg: GenerateConfig, *, language: str, segment: str = "none"
) -> list[str]:
    captions: list[str] = []
    for start in range(0, features.shape[0], cfg.batch_size):
        ids = generate_ids(model, features[start : start + cfg.batch_size], cfg)
        texts = model.decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        captions += [postprocess(t, language, segment) for t in texts]
    return captions
