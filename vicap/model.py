"""The caption model: mapper prefix + caption embeddings into a causal LM.

Sequence layout fed to the LM (k = prefix_length, P = the LM's start tokens such as Llama's BOS):

    [prefix_1 .. prefix_k] [P ...] [caption tokens ...] [EOS] [pad ...]
    labels: -100 ... -100   -100    caption tokens       EOS   -100 ...

Only the caption and its EOS are learned; the prefix, start tokens and padding are masked (-100),
so no real vocabulary id is ever ignored (ClipCap's ignore_index=0 silently never learned GPT-2's
token 0).

The loss is computed here, not by the LM: `forward` returns the summed token loss and the number of
learned tokens beside their mean, so training can weight every token of a global batch equally
however the batch is split across processes and accumulation steps. Logits are computed only at the
positions that predict a caption token (`logits_to_keep`): the prefix never needs the output layer.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from vicap.decoders import Decoder, add_lora, contiguous_output_input, fuse_activations
from vicap.mappers import build_mapper
from vicap.recipe import DecoderConfig, MapperConfig, Recipe, RecipeError

IGNORE = -100


@functools.cache
def cache_name() -> str:
    """The LM's name for its KV cache, as a forward argument, an output field and a `generate`
    argument: `cache` from transformers 5.24 on (which deprecates `past_key_values` with a warning),
    `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def position_limit(lm: nn.Module) -> int | None:
    """How many positions the LM can embed, when it has a hard limit: a learned position-embedding
    table (GPT-2's `wpe`, `n_positions` rows) has no row past its end, and indexing past it fails deep
    inside the LM. Rotary (Llama, Gemma) and ALiBi (BLOOM) LMs have no table and no hard limit: None."""
    config = getattr(lm, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    tokens = lm.get_input_embeddings()
    tables = (m for m in lm.modules() if isinstance(m, nn.Embedding) and m is not tokens)
    return limit if any(m.num_embeddings >= limit for m in tables) else None


def _check_length(key: str, tokens: int, k: int, start: int, limit: int | None, name: str) -> None:
    if limit is None or k + start + tokens <= limit:
        return
    room = limit - k - start
    fix = f"set {key} to at most {room}" if room >= 1 else "lower mapper.prefix_length"
    raise RecipeError(
        f"{key} = {tokens}: the prefix ({k}) + start tokens ({start}) + {tokens} caption tokens need "
        f"{k + start + tokens} positions, but the LM {name} has {limit} positions; {fix}"
    )


def check_recipe_lengths(recipe: Recipe) -> int | None:
    """The length checks of `CaptionModel.from_recipe` without loading weights (for `vicap validate`):
    the LM is built from its config on the meta device and the tokenizer gives the start tokens.
    Returns the LM's position limit (None: no hard limit); raises ModelLoadError when the LM's files are
    not on this machine, RecipeError when a length does not fit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vicap.decoders import _start_tokens
    from vicap.errors import ModelLoadError
    from vicap.resolve import resolve

    ref = resolve(recipe.decoder.model, "decoder.model", gguf_file=recipe.decoder.gguf_file)
    if ref.kind == "gguf":  # its config is inside the file, read when it is converted
        raise ModelLoadError("a GGUF file")
    try:
        config = AutoConfig.from_pretrained(ref.target, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(ref.target, local_files_only=True)
    except Exception:  # a hub model not downloaded here: checked when it loads
        raise ModelLoadError("not on this machine") from None
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    limit, start = position_limit(lm), len(_start_tokens(tokenizer))
    for key, tokens in (
        ("data.max_tokens", recipe.data.max_tokens),
        ("generate.max_new_tokens", recipe.generate.max_new_tokens),
    ):
        _check_length(key, tokens, recipe.mapper.prefix_length, start, limit, recipe.decoder.model)
    return limit


class CaptionModel(nn.Module):
    def __init__(
        self,
        mapper_cfg: MapperConfig,
        encoder_dim: int,
        decoder: Decoder,
        tuning: str,
        *,
        lora: DecoderConfig | None = None,
    ) -> None:
        super().__init__()
        self.encoder_dim = encoder_dim
        self.tuning = tuning
        self.decoder = decoder  # tokenizer and special ids; decoder.lm is registered below
        self.lm = decoder.lm
        fuse_activations(self.lm)  # the same function, one fused kernel (see fuse_activations)
        contiguous_output_input(self.lm)  # bfloat16 decoding on CPU (see _contiguous_input)
        # The mapper is built before any LoRA weights, so its initialisation under a seed does not
        # depend on the tuning mode.
        self.mapper = build_mapper(mapper_cfg, encoder_dim, decoder.hidden_size)
        self.prefix_length = mapper_cfg.prefix_length
        if tuning == "lora":
            if lora is None:
                raise ValueError("tuning 'lora' needs the decoder config (rank, alpha, dropout, targets)")
            self.lm = decoder.lm = add_lora(decoder.lm, lora)
        else:
            self.lm.requires_grad_(tuning == "full")
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.lm.forward).parameters
        self.register_buffer(
            "prompt_ids", torch.tensor(decoder.prompt_ids, dtype=torch.long), persistent=False
        )
        self.max_positions = position_limit(self.lm)

    @classmethod
    def from_recipe(cls, recipe: Recipe, encoder_dim: int, decoder: Decoder) -> CaptionModel:
        """The model of a recipe; a recipe whose captions (training or generated) would not fit the LM's
        positions is a RecipeError here, before any training or captioning starts."""
        model = cls(recipe.mapper, encoder_dim, decoder, recipe.decoder.tuning, lora=recipe.decoder)
        model.check_length("data.max_tokens", recipe.data.max_tokens)
        model.check_length("generate.max_new_tokens", recipe.generate.max_new_tokens)
        return model

    def check_length(self, key: str, tokens: int) -> None:
        """RecipeError naming `key` when the prefix, the start tokens and `tokens` caption tokens need more
        positions than the LM has (`position_limit`); LMs without a hard limit accept any length."""
        name = getattr(self.lm.config, "name_or_path", "") or type(self.lm).__name__
        _check_length(key, tokens, self.prefix_length, int(self.prompt_ids.numel()), self.max_positions, name)

    def train(self, mode: bool = True) -> CaptionModel:
        super().train(mode)
        if self.tuning == "frozen":
            self.lm.eval()  # a frozen LM keeps dropout off
        return self

    # ------------------------------------------------------------------ pieces

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> (B, k + len(start tokens), d_lm): what every caption is continued from.

        `features` is whatever the feature store (or `Encoder.encode`) gives: (B, D) pooled vectors,
        or (B, 1 + T, D) with patch tokens; each mapper takes what it needs from it.
        """
        prefix = self.mapper(features.to(self.mapper_dtype)).to(self.lm_dtype)
        if self.prompt_ids.numel():
            start = self.embed(self.prompt_ids).unsqueeze(0).expand(prefix.shape[0], -1, -1)
            prefix = torch.cat([prefix, start.to(prefix.dtype)], dim=1)
        return prefix

    @property
    def mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor | None = None,
    ) -> dict:
        """Teacher-forced loss. input_ids are caption tokens + EOS, right-padded; mask marks real tokens.

        With `image` (train.group_by_image), `features` holds one row per image and caption i is of
        image `image[i]`: each image's mapper and prefix run once (`grouped_logits`), for the same loss
        and gradients. Returns loss (mean over learned tokens), loss_sum and tokens (their sum and
        count), the caption-position logits (B, L, V) and the full-sequence labels (B, n_prefix + L).
        """
        if image is None:
            prefix = self.prefix(features)
            logits = self.sequence_logits(prefix, input_ids, attention_mask)
            n_prefix = prefix.shape[1]
        else:
            logits = self.grouped_logits(features, input_ids, attention_mask, image)
            n_prefix = self.prefix_length + int(self.prompt_ids.numel())
        targets = input_ids.masked_fill(attention_mask == 0, IGNORE)
        labels = torch.cat([input_ids.new_full((input_ids.shape[0], n_prefix), IGNORE), targets], dim=1)
        loss_sum = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        tokens = (targets != IGNORE).sum()
        return {
            "loss": loss_sum / tokens.clamp(min=1),
            "loss_sum": loss_sum,
            "tokens": tokens,
            "logits": logits,
            "labels": labels,
        }

    def sequence_logits(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The logits predicting each caption token, from one LM pass over prefix + caption per row."""
        embeds = torch.cat([prefix, self.embed(input_ids).to(prefix.dtype)], dim=1)
        b, n_prefix = prefix.shape[0], prefix.shape[1]
        mask = torch.cat([attention_mask.new_ones(b, n_prefix), attention_mask], dim=1)
        # Position i predicts token i + 1, so the L caption tokens are predicted by positions
        # n_prefix - 1 .. n_prefix + L - 2: only those go through the output layer.
        keep = torch.arange(n_prefix - 1, n_prefix - 1 + input_ids.shape[1], device=input_ids.device)
        if self._logits_to_keep:
            return self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
        return self.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, keep]  # computes all; keep some

    def grouped_logits(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor,
    ) -> torch.Tensor:
        """`sequence_logits` of caption i continued from image `image[i]`'s prefix, with each image's
        mapper and prefix computed once.

        The LM runs over the G prefixes once with its KV cache on; the cache keeps its autograd graph
        and is copied to the B captions' rows (`batch_select_indices`: an index into every layer's keys
        and values), and the captions run against it, their positions continuing after the prefix
        (GPT-2's position table, Llama's rotary angles). The prefix pass's last position gives the
        logits that predict each caption's first token. Causal attention makes every value the one of
        the full sequence; in backward the copies' gradients add up in the one prefix, as the gradients
        of B separate prefixes add up in the mapper's weights.
        """
        prefix = self.prefix(features)
        kw = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.lm(inputs_embeds=prefix, use_cache=True, **kw)
        first = out.logits[:, -1:][image]
        if input_ids.shape[1] == 1:  # every caption is its EOS alone
            return first
        cache = getattr(out, cache_name(), None)
        if not hasattr(cache, "batch_select_indices"):
            raise RecipeError(
                f"train.group_by_image = true: {type(self.lm).__name__} returns no KV cache that can be "
                "copied to each caption (a transformers Cache); set train.group_by_image = false"
            )
        cache.batch_select_indices(image)
        ids, mask = input_ids[:, :-1], attention_mask[:, :-1]  # the last token predicts nothing
        mask = torch.cat([mask.new_ones(len(image), prefix.shape[1]), mask], dim=1)
        rest = self.lm(
            inputs_embeds=self.embed(ids).to(prefix.dtype),
            attention_mask=mask,
            use_cache=True,
            **{cache_name(): cache},
        ).logits
        return torch.cat([first, rest], dim=1)

    @staticmethod
    def learned_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """attention_mask marks exactly the learned tokens (caption + EOS) of a collated batch."""
        return batch["attention_mask"].sum()

    # ------------------------------------------------------------------ what is trained

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the mapper, plus the LM when tuned or its adapters under LoRA.

        Tied input/output embeddings are one parameter and appear once (under the input name)."""
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
