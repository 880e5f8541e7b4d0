"""The caption model: mapper prefix + caption embeddings into a causal LM.

Sequence layout fed to the LM (k = prefix_length, P = the LM's start tokens such as Llama's BOS):

    [prefix_1 .. prefix_k] [P ...] [caption tokens ...] [EOS] [pad ...]
    labels: -100 ... -100   -100    caption tokens       EOS   -100 ...

Only the caption and its EOS are learned; the prefix, start tokens and padding are masked (-100),
so no real vocabulary id is ever ignored (ClipCap's ignore_index=0 silently never learned GPT-2's
token 0).
"""

from __future__ import annotations

import torch
from torch import nn

from vicap.decoders import Decoder
from vicap.mappers import build_mapper
from vicap.recipe import MapperConfig

IGNORE = -100


class CaptionModel(nn.Module):
    def __init__(self, mapper_cfg: MapperConfig, encoder_dim: int, decoder: Decoder, tuning: str) -> None:
        super().__init__()
        self.encoder_dim = encoder_dim
        self.tuning = tuning
        self.decoder = decoder  # tokenizer and special ids; decoder.lm is registered below
        self.lm = decoder.lm
        self.mapper = build_mapper(mapper_cfg, encoder_dim, decoder.hidden_size)
        self.prefix_length = mapper_cfg.prefix_length
        self.lm.requires_grad_(tuning == "full")
        self.register_buffer(
            "prompt_ids", torch.tensor(decoder.prompt_ids, dtype=torch.long), persistent=False
        )

    def train(self, mode: bool = True) -> CaptionModel:
        super().train(mode)
        if self.tuning == "frozen":
            self.lm.eval()  # a frozen LM keeps dropout off
        return self

    # ------------------------------------------------------------------ pieces

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(B, encoder_dim) -> (B, k + len(start tokens), d_lm): what every caption is continued from."""
        prefix = self.mapper(features.to(self.mapper_dtype))
        if self.prompt_ids.numel():
            start = self.embed(self.prompt_ids).unsqueeze(0).expand(prefix.shape[0], -1, -1)
            prefix = torch.cat([prefix, start.to(prefix.dtype)], dim=1)
        return prefix

    @property
    def mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Teacher-forced loss. input_ids are caption tokens + EOS, right-padded; mask marks real tokens."""
        prefix = self.prefix(features)
        tokens = self.embed(input_ids)
        embeds = torch.cat([prefix, tokens.to(prefix.dtype)], dim=1)
        b, n_prefix = prefix.shape[0], prefix.shape[1]
        ones = attention_mask.new_ones(b, n_prefix)
        mask = torch.cat([ones, attention_mask], dim=1)
        labels = torch.cat(
            [input_ids.new_full((b, n_prefix), IGNORE), input_ids.masked_fill(attention_mask == 0, IGNORE)],
            dim=1,
        )
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        return {"loss": out.loss, "logits": out.logits}

    # ------------------------------------------------------------------ what is trained

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the mapper, plus the LM when it is tuned."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in names}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        own = self.state_dict()
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(
                    f"checkpoint tensor {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
                )
        self.load_state_dict(state, strict=False)
