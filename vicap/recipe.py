"""Recipes: one TOML file per experiment, validated into frozen dataclasses before anything heavy loads.

A recipe has the sections encoder, decoder, mapper, data, train, generate and eval (plus optional
top-level `name` and `description`, and an optional `scst` section for a self-critical stage). Unknown keys, wrong types, non-finite numbers, names missing from
vicap's registries (encoders, mappers, dataset adapters) and bad values raise `RecipeError` naming the
file and the dotted key; no weights are loaded. Command-line overrides use the same dotted keys
(`train.lr=1e-4`, `decoder.model=gpt2`); values are parsed as TOML, and a bare word is a string.

Shipped recipes are package data (`vicap/recipes/*.toml`): a recipe's name is its file
(`find_recipe("vi_ktvic_lora")`), as open_clip's model names are its config files. A recipe file's
`name` and `train.output_dir` default to its file name (`runs/<file stem>`), and the resolved recipe
written to a run records both.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from vicap.errors import RecipeError  # noqa: F401  (raised here; importable from here too)
from vicap.metrics import FAMILIES

METRIC_FAMILIES = tuple(FAMILIES)  # BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, chrF: vicap.metrics's list
# Scores train.select may use: the pure-Python ones (no Java process at every validation).
SELECT_COLUMNS = (*FAMILIES["BLEU"], "ROUGE-L", "CIDEr-D", "chrF")
MetricFamily = Literal[METRIC_FAMILIES]


def option(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata={"help": text}, **kw)


def check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{key} = {value!r}: {why}")


def one_of(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        check(False, key, value, f"must be one of {', '.join(choices)}{hint}")


# numpy's seed range; Accelerate's set_seed seeds numpy, Python and torch with the same number.
SEED_MAX = 2**32 - 1


def check_seed(key: str, value: int) -> None:
    check(0 <= value <= SEED_MAX, key, value, f"must be in [0, 2**32 - 1 = {SEED_MAX}]")


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _check_choices(key: str, value: Any, tp: Any) -> None:
    """A Literal field (or a tuple of Literal items) must hold one of the type's values."""
    if _is_literal(tp):
        one_of(key, value, typing.get_args(tp))
    elif typing.get_origin(tp) is tuple and _is_literal(typing.get_args(tp)[0]):
        for item in value:
            one_of(key, item, typing.get_args(typing.get_args(tp)[0]))


class Section:
    """Base of every recipe section: a frozen dataclass whose fields carry their help text (`option`).

    A field typed `Literal[...]` is a choice, checked here for every section, so each list of allowed
    values is written once, in the type; `validate` checks the rest (ranges, registry names, fields
    that depend on each other) with `check`, whose ValueError names the dotted key."""

    KEY: ClassVar[str] = ""  # the section's name in a recipe ("train"), for messages

    def __post_init__(self) -> None:
        for name, tp in _field_types(type(self)).items():
            _check_choices(f"{self.KEY}.{name}", getattr(self, name), tp)
        self.validate()

    def validate(self) -> None:
        """Checks beyond the field types; raise through `check`."""


@dataclass(frozen=True)
class EncoderConfig(Section):
    KEY = "encoder"

    name: str = option(
        "encoder registry entry (see `vicap list`): 'open_clip', 'hf_clip' (transformers CLIP vision model), "
        "'timm' (any timm model) or 'hf_vision' (transformers image tower: SigLIP, DINOv2, CLIP vision)",
        "open_clip",
    )
    model: str = option(
        "open_clip: model name (ViT-B-32, RN50, convnext_base, ...), a local folder holding "
        "open_clip_config.json and weights (a path, '~' expanded, or 'local-dir:PATH'), or 'hf-hub:org/repo'; "
        "hf_clip, hf_vision: hub id (openai/clip-vit-base-patch32) or a local folder saved by save_pretrained; "
        "timm: model name (efficientnet_lite0) with encoder.pretrained, or 'local-dir:PATH' (timm's save_for_hf "
        "folder) (see vicap.resolve)",
        "ViT-B-32",
    )
    pretrained: str = option(
        "open_clip pretrained tag ('openai', 'laion2b_s34b_b79k', ...) or a local weights file (.safetensors, "
        "or .pt/.pth/.bin read with torch.load(weights_only=True)); timm: the local weights file of the "
        "model name, required; refused for local-dir:/hf-hub: models and folders, which carry their own weights",
        "openai",
    )
    batch_size: int = option("images per batch during feature extraction", 64)
    normalize: bool = option("L2-normalize image features before the mapper", False)
    patch_tokens: bool = option(
        "also store the patch tokens (projected to the embedding width) beside the pooled vector, "
        "for mappers that attend to them (mapper.type = 'attention'); ViT, SigLIP and timm towers",
        False,
    )

    def validate(self) -> None:
        from vicap.encoders import ENCODERS  # imported here: vicap.encoders imports this module
        from vicap.resolve import WEIGHT_SUFFIXES, looks_like_path

        one_of("encoder.name", self.name, ENCODERS.names())
        check(bool(self.model), "encoder.model", self.model, "must name a model")
        # Only an open_clip or timm model name reads encoder.pretrained; folders and hub repos carry their
        # own weights. The default tag is tolerated there, any other value would be accepted and ignored.
        own_weights = self.model.startswith(("local-dir:", "hf-hub:")) or looks_like_path(self.model)
        if self.name == "timm" and not own_weights:
            # vicap never lets timm fetch its pretrained weights: a model name without a file would be
            # a randomly initialised network
            check(
                self.pretrained.endswith(WEIGHT_SUFFIXES),
                "encoder.pretrained",
                self.pretrained,
                f"timm model {self.model!r} needs its weights as a local file ({', '.join(WEIGHT_SUFFIXES)}), "
                "or encoder.model = 'local-dir:PATH' for a folder written by timm's save_for_hf",
            )
        if self.pretrained not in ("", "openai"):
            check(
                self.name in ("open_clip", "timm"),
                "encoder.pretrained",
                self.pretrained,
                f"{self.name} models carry their own weights (encoder.model); remove encoder.pretrained",
            )
            check(
                not own_weights,
                "encoder.pretrained",
                self.pretrained,
                f"encoder.model = {self.model!r} carries its own weights; encoder.pretrained applies to "
                "open_clip and timm model names (ViT-B-32, efficientnet_lite0) only: remove it",
            )
        check(self.batch_size > 0, "encoder.batch_size", self.batch_size, "must be > 0")


@dataclass(frozen=True)
class DecoderConfig(Section):
    KEY = "decoder"

    model: str = option(
        "Hugging Face causal LM: hub id (gpt2, NlpHUST/gpt2-vietnamese, 'hf-hub:org/name'), a local folder "
        "saved by save_pretrained (a path, '~' expanded, or 'local-dir:PATH'), or a GGUF file (PATH.gguf, "
        "read through transformers and cached as a folder; needs `pip install vicap[gguf]`)",
        "gpt2",
    )
    gguf_file: str = option(
        "a .gguf file inside the local folder decoder.model names (a GGUF repo holds several "
        "quantizations); empty: decoder.model is a Hugging Face model or names the .gguf file itself",
        "",
    )
    tuning: Literal["frozen", "full", "lora"] = option(
        "'frozen' trains only the mapper; 'full' also fine-tunes the LM (ClipCap's MLP setting); "
        "'lora' trains LoRA adapters on the LM (peft) with the mapper",
        "frozen",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "LM weight dtype: 'float32' (train with it; bf16 compute comes from train.mixed_precision), "
        "or 'bfloat16' / 'float16' to halve the memory of a frozen LM",
        "float32",
    )
    lora_rank: int = option("LoRA rank r (tuning = 'lora')", 8)
    lora_alpha: float = option("LoRA scaling alpha; updates are scaled by alpha / rank", 16.0)
    lora_dropout: float = option("dropout on the LoRA branch's input", 0.05)
    lora_target_modules: tuple[str, ...] = option(
        "module names that get adapters; empty means peft's default for the architecture "
        "(GPT-2: c_attn; Llama: q_proj, v_proj)",
        (),
    )

    def validate(self) -> None:
        check(bool(self.model), "decoder.model", self.model, "must name a model")
        if self.gguf_file:
            check(
                self.gguf_file.lower().endswith(".gguf"),
                "decoder.gguf_file",
                self.gguf_file,
                "must name a .gguf file inside the folder decoder.model names",
            )
            check(
                not self.model.lower().endswith(".gguf"),
                "decoder.gguf_file",
                self.gguf_file,
                f"decoder.model = {self.model!r} names a GGUF file already; set only one of the two",
            )
        check(
            self.dtype == "float32" or self.tuning != "full",
            "decoder.dtype",
            self.dtype,
            "a fully tuned LM trains in float32 (use train.mixed_precision for bf16 compute)",
        )
        check(self.lora_rank > 0, "decoder.lora_rank", self.lora_rank, "must be > 0")
        check(self.lora_alpha > 0, "decoder.lora_alpha", self.lora_alpha, "must be > 0")
        check(0.0 <= self.lora_dropout < 1.0, "decoder.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        for name in self.lora_target_modules:
            check(bool(name), "decoder.lora_target_modules", name, "module names must not be empty")


@dataclass(frozen=True)
class MapperConfig(Section):
    KEY = "mapper"

    type: str = option("mapper registry entry (see `vicap list`): mlp, transformer or attention", "mlp")
    prefix_length: int = option("number of prefix embeddings the mapper produces", 10)
    hidden_dim: int = option("mlp: hidden width; 0 means ClipCap's (LM width * prefix_length) // 2", 0)
    dropout: float = option(
        "dropout inside the mapper (mlp: after the Tanh; transformer/attention: in the MLPs)", 0.0
    )
    clip_length: int = option(
        "transformer: tokens the image vector is projected to before the layers (ClipCap's clip_length)", 10
    )
    num_layers: int = option("transformer/attention: layers; 0 means the mapper's default (8 / 2)", 0)
    num_heads: int = option("transformer/attention: attention heads; must divide the LM width", 8)
    mlp_ratio: float = option("transformer/attention: MLP width as a multiple of the LM width", 2.0)

    def validate(self) -> None:
        from vicap.mappers import MAPPERS  # imported here: vicap.mappers imports this module

        one_of("mapper.type", self.type, MAPPERS.names())
        check(self.prefix_length > 0, "mapper.prefix_length", self.prefix_length, "must be > 0")
        check(self.hidden_dim >= 0, "mapper.hidden_dim", self.hidden_dim, "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "mapper.dropout", self.dropout, "must be in [0, 1)")
        check(self.clip_length > 0, "mapper.clip_length", self.clip_length, "must be > 0")
        check(self.num_layers >= 0, "mapper.num_layers", self.num_layers, "must be >= 0")
        check(self.num_heads > 0, "mapper.num_heads", self.num_heads, "must be > 0")
        check(self.mlp_ratio > 0, "mapper.mlp_ratio", self.mlp_ratio, "must be > 0")


_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*")  # BCP 47-like: 'th', 'pt-BR'


@dataclass(frozen=True)
class DataConfig(Section):
    KEY = "data"

    adapter: str = option(
        "dataset adapter that reads the source (see `vicap list`), or 'manifest' when data.source is a "
        "manifest written by `vicap prepare`",
        "ktvic",
    )
    source: str = option("the dataset as published: a folder or file the adapter reads", "")
    images: str = option("image folder, for adapters whose annotations live apart from the images", "")
    language: str = option("language code of the captions (vi, en, ...)", "vi")
    segment: Literal["none", "word"] = option(
        "what the LM sees: 'none' (syllables / raw words) or 'word' (word-segmented)", "none"
    )
    val_fraction: float = option("fraction of training images held out for validation (by image)", 0.0)
    max_tokens: int = option("captions longer than this many LM tokens are truncated (EOS kept)", 40)
    features_dir: str = option("root of the on-disk feature store, shared across runs", "features")
    image_fraction: float = option(
        "fraction of the training split's images whose captions train as image-caption pairs (by image, "
        "seeded by train.seed; the same images at every seed-equal run); 1 = all, 0 = none: train on the "
        "[text] corpus alone. For low-resource studies: 0.1 is a 10% paired set",
        1.0,
    )

    def validate(self) -> None:
        from data_prep.datasets import ADAPTERS
        from data_prep.languages import LANGUAGES, get_language

        one_of("data.adapter", self.adapter, ("manifest", *sorted(ADAPTERS)))
        if self.adapter == "manifest":  # its splits and images were fixed by `vicap prepare`
            check(
                self.val_fraction == 0,
                "data.val_fraction",
                self.val_fraction,
                "a manifest's splits are fixed when it is written (vicap prepare --val-fraction)",
            )
            check(
                not self.images,
                "data.images",
                self.images,
                "a manifest names its images itself (paths relative to the manifest)",
            )
        check(bool(self.source), "data.source", self.source, "must name the dataset folder or file")
        # A code without a registry entry gets data_prep's generic fallback (NFC, whitespace tokens), so
        # any well-formed code is accepted; a malformed one ('Vietnamese', 'VI') would silently get it.
        if self.language not in LANGUAGES:
            check(
                _LANGUAGE_CODE.fullmatch(self.language) is not None,
                "data.language",
                self.language,
                f"not a language code; registered: {', '.join(sorted(LANGUAGES))}, and any other ISO 639 "
                "code ('th', 'sw', 'pt-BR') gets the generic fallback",
            )
            primary = re.split(r"[-_]", self.language)[0]
            check(
                primary not in LANGUAGES,
                "data.language",
                self.language,
                f"would get the generic fallback, not the rules registered for {primary!r}; write {primary!r}",
            )
        modes = get_language(self.language).modes
        check(
            self.segment in modes,
            "data.segment",
            self.segment,
            f"language {self.language!r} has no {self.segment!r} segmenter (modes: {', '.join(modes)}); "
            "register one in data_prep.languages or use 'none'",
        )
        check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        check(
            0.0 <= self.image_fraction <= 1.0, "data.image_fraction", self.image_fraction, "must be in [0, 1]"
        )
        check(self.max_tokens >= 2, "data.max_tokens", self.max_tokens, "must be >= 2")


@dataclass(frozen=True)
class TrainSettings(Section):
    """The [train] keys of every captioner: what `vicap.train.fit`, the one training loop, reads."""

    KEY = "train"

    output_dir: str = option(
        "run directory (checkpoints, logs, resolved recipe); a recipe file's default is runs/<file stem>",
        "runs/default",
    )
    seed: int = option("seed for weights init, data order and dropout", 42)
    epochs: int = option("passes over the training captions", 10)
    batch_size: int = option(
        "captions per micro-batch summed over all processes (the global batch; each of N processes gets "
        "1/N of it), so a recipe trains the same on 1 or N devices; optimizer batch = batch_size * grad_accum",
        40,
    )
    grad_accum: int = option("gradient accumulation steps (micro-batches per optimizer step)", 1)
    lr: float = option("peak learning rate (AdamW)", 2e-5)
    weight_decay: float = option("AdamW weight decay", 0.0)
    warmup_steps: int = option("linear warmup steps, then linear decay to 0", 5000)
    grad_clip: float = option("max gradient norm; 0 disables clipping", 1.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "'no', 'bf16' or 'fp16' (through Accelerate)", "no"
    )
    device: Literal["auto", "cpu"] = option("'auto' lets Accelerate choose; 'cpu' forces the CPU", "auto")
    log_every: int = option("optimizer steps between loss log lines", 50)
    save_every: int = option("optimizer steps between checkpoints; 0 saves once per epoch", 0)
    keep_checkpoints: int = option(
        "how many recent checkpoints to keep (the best one, see train.select, is kept besides)", 2
    )
    select: str = option(
        "which checkpoint is the run's result, scored on the validation split at each validation: a "
        "metric ('CIDEr-D', 'BLEU-4', ...) or a sum of them ('CIDEr-D+BLEU-4', as LAVIS), 'loss' (lowest "
        "validation loss) or 'last'; '' means CIDEr-D+BLEU-4 when there is a validation split, else last. "
        "evaluate, caption and serve load the selected one unless told --checkpoint last",
        "",
    )
    patience: int = option(
        "stop after this many validations in a row without a better selection score; 0 never stops early", 0
    )
    val_every: int = option("optimizer steps between validations; 0 validates at the end of each epoch", 0)
    val_max_images: int = option("score at most this many validation images when selecting (0 = all)", 0)
    group_by_length: bool = option(
        "draw each global batch from captions of similar length (as transformers' group_by_length): "
        "less padding, the epoch still covers every caption once",
        False,
    )

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        check(self.save_every >= 0, "train.save_every", self.save_every, "must be >= 0")
        for key in ("patience", "val_every", "val_max_images"):
            check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "must be >= 0")
        if self.select not in ("", "last", "loss"):
            for name in self.select.split("+"):
                one_of("train.select", name, SELECT_COLUMNS)
        check(
            self.patience == 0 or self.select != "last",
            "train.patience",
            self.patience,
            "early stopping needs a selection score: set train.select to a metric or 'loss'",
        )
        check_seed("train.seed", self.seed)


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    feature_noise: float = option(
        "std of the noise added to every training feature row, image or sentence (CapDec; its variance "
        "0.016 is std 0.126 on L2-normalized features); captioning reads clean image features; 0 disables",
        0.0,
    )
    group_by_image: bool = option(
        "form each global batch from whole images with all their captions and run each image's mapper "
        "and LM prefix once for them: the same loss and gradients, less work. The shuffle is of images; "
        "mapper dropout and train.feature_noise are drawn once per image. train.batch_size still counts "
        "captions: make it a multiple of captions per image x processes, or edge images are split",
        False,
    )
    feature_noise_kind: Literal["gaussian", "uniform"] = option(
        "'gaussian' (CapDec) or 'uniform' noise of the same std (uniform on [-std*sqrt(3), std*sqrt(3)])",
        "gaussian",
    )

    def validate(self) -> None:
        super().validate()
        check(self.feature_noise >= 0, "train.feature_noise", self.feature_noise, "must be >= 0")
        check(
            self.feature_noise > 0 or self.feature_noise_kind == "gaussian",
            "train.feature_noise_kind",
            self.feature_noise_kind,
            "applies only with noise: set train.feature_noise > 0",
        )


PAIR_SUFFIXES = (".tsv", ".csv", ".jsonl", ".ndjson")  # files with named columns


@dataclass(frozen=True)
class TextConfig(Section):
    """Text-only training (CapDec, Nukrai et al. 2022): sentences of the target language train the
    mapper from their own CLIP text embeddings; at test time it reads image embeddings."""

    KEY = "text"

    source: str = option(
        "a text corpus in data.language, read by the `text` adapter (one sentence a line in a .txt, or "
        "a .jsonl/.csv/.tsv text column); each sentence is a training target whose input is its own "
        "noisy, L2-normalized text embedding. '' (the default): no text corpus",
        "",
    )
    column: str = option("the .jsonl key or .csv/.tsv column that holds the sentences", "text")
    offset_images: str = option(
        "a folder of unpaired images (captions not needed): their mean embedding minus the corpus's mean "
        "text embedding is added to every sentence's embedding in training, closing the image-text "
        "modality gap; '' adds none",
        "",
    )

    def validate(self) -> None:
        check(bool(self.column), "text.column", self.column, "must name a key or column")
        for key in ("column", "offset_images"):
            value = getattr(self, key)
            check(
                bool(self.source) or value == getattr(TextConfig, key),
                f"text.{key}",
                value,
                "applies only with a text corpus: set text.source",
            )
        check(
            not self.source or self.source.lower().endswith((".txt", *PAIR_SUFFIXES)),
            "text.source",
            self.source,
            "a text corpus is a .txt (one sentence a line), .jsonl/.ndjson, .csv or .tsv file",
        )
        check(
            not self.source.lower().endswith(".txt") or self.column == "text",
            "text.column",
            self.column,
            f"a .txt corpus ({self.source}) is one sentence a line and has no columns: remove text.column",
        )


@dataclass(frozen=True)
class PairsConfig(Section):
    """Cross-lingual sentence pairs: each pair trains the mapper to say the target-language sentence
    from the CLIP text embedding of its source-language sentence (e.g. English COCO captions with their
    Vietnamese translations, through a multilingual CLIP)."""

    KEY = "pairs"

    source: str = option(
        "a file of sentence pairs read by the `text` adapter: a .tsv/.csv with a header row, or a .jsonl, "
        "with a source-sentence column and a target-sentence column. The target (in data.language) is "
        "normalized and segmented as every caption; the mapper's input is the source sentence's noisy, "
        "L2-normalized text embedding. '' (the default): no sentence pairs",
        "",
    )
    source_column: str = option("the column or .jsonl key of the source-language sentences", "source")
    target_column: str = option("the column or .jsonl key of their translations (data.language)", "target")
    source_language: str = option(
        "language code of the source sentences: their normalization before the CLIP text tower", "en"
    )

    def validate(self) -> None:
        for key in ("source_column", "target_column", "source_language"):
            value = getattr(self, key)
            check(bool(value), f"pairs.{key}", value, "must not be empty")
            check(
                bool(self.source) or value == getattr(PairsConfig, key),
                f"pairs.{key}",
                value,
                "applies only with sentence pairs: set pairs.source",
            )
        check(
            self.source_column != self.target_column,
            "pairs.target_column",
            self.target_column,
            "is pairs.source_column too: name the two columns of a pair",
        )
        check(
            _LANGUAGE_CODE.fullmatch(self.source_language) is not None or self.source_language == "generic",
            "pairs.source_language",
            self.source_language,
            "not a language code (en, vi, pt-BR, ...)",
        )
        check(
            not self.source or self.source.lower().endswith(PAIR_SUFFIXES),
            "pairs.source",
            self.source,
            f"sentence pairs are read from a file with two named columns: {', '.join(PAIR_SUFFIXES)}",
        )


TEXT_TOWERS = ("open_clip", "hf_clip")  # encoders that keep a text tower (vicap.encoders)

# The training sources a [mix] share can name, and what makes each present in a recipe.
MIX_SOURCES = {
    "images": "data.image_fraction > 0",
    "text": "text.source",
    "pairs": "pairs.source",
}


@dataclass(frozen=True)
class MixConfig(Section):
    """How the training sources fill each global batch. All 0 (the default): every present source's
    items are shuffled together, so each source fills batches in proportion to its size. Otherwise
    each present source gets its fixed share of every global batch of train.batch_size items."""

    KEY = "mix"

    images: float = option(
        "share of every global batch drawn from the image-caption pairs (the data.image_fraction subset "
        "of the training images); 0 with every share 0: in proportion to the sources' sizes",
        0.0,
    )
    text: float = option("share of every global batch drawn from the [text] corpus's sentences", 0.0)
    pairs: float = option("share of every global batch drawn from the [pairs] sentence pairs", 0.0)

    def validate(self) -> None:
        for name in MIX_SOURCES:
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"mix.{name}", value, "must be in [0, 1]")

    @property
    def shares(self) -> dict[str, float]:
        """Source -> its share of a global batch; empty when the sources mix by size."""
        shares = {name: getattr(self, name) for name in MIX_SOURCES}
        return shares if any(shares.values()) else {}

    def counts(self, batch_size: int) -> dict[str, int]:
        """Source -> its items in every global batch of `batch_size`: the shares rounded so that they
        add up to the batch (largest remainder first, ties in source order)."""
        shares = self.shares
        exact = {name: share * batch_size for name, share in shares.items()}
        counts = {name: int(x) for name, x in exact.items()}
        by_remainder = sorted(shares, key=lambda name: -(exact[name] - counts[name]))
        for name in by_remainder[: batch_size - sum(counts.values())]:
            counts[name] += 1
        return counts


@dataclass(frozen=True)
class GenerateConfig(Section):
    KEY = "generate"

    strategy: Literal["greedy", "beam", "sample"] = option(
        "'greedy', 'beam' or 'sample' (temperature / top_k / top_p, seeded)", "beam"
    )
    beam_size: int = option("beams for beam search", 5)
    max_new_tokens: int = option("longest caption, in LM tokens", 30)
    min_new_tokens: int = option("shortest caption, in LM tokens (EOS is blocked before it)", 0)
    length_penalty: float = option(
        "beam score = log-prob / length ** length_penalty (length counts the EOS)", 1.0
    )
    batch_size: int = option("images per generation batch", 32)
    n_best: int = option(
        "captions returned per image, best first: beam keeps the n best beams (n_best <= beam_size), "
        "sample draws n samples; greedy has one",
        1,
    )
    temperature: float = option("sample: divide logits by this before sampling", 1.0)
    top_k: int = option("sample: keep only the k most likely tokens; 0 keeps all", 0)
    top_p: float = option("sample: keep the smallest set of tokens whose probability reaches top_p", 1.0)
    seed: int = option("sample: seed; the same seed, inputs and batch_size give the same captions", 0)
    repetition_penalty: float = option(
        "penalize tokens the caption already has (CTRL-style; 1.0 = off, 1.2 is typical)", 1.0
    )
    no_repeat_ngram_size: int = option("no n-gram of this many tokens appears twice in a caption; 0 = off", 0)
    stop: str = option("stop a caption once its text contains this string (kept); '' = EOS only", "")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "'fp32', or 'bf16' / 'fp16' autocast while encoding images and decoding captions (caption, "
        "evaluate, serve); fast on GPUs and on CPUs with bf16 support, captions may differ slightly",
        "fp32",
    )

    def validate(self) -> None:
        check(self.beam_size >= 1, "generate.beam_size", self.beam_size, "must be >= 1")
        check(self.max_new_tokens >= 1, "generate.max_new_tokens", self.max_new_tokens, "must be >= 1")
        check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "generate.min_new_tokens",
            self.min_new_tokens,
            f"must be in [0, max_new_tokens = {self.max_new_tokens}]",
        )
        check(self.batch_size >= 1, "generate.batch_size", self.batch_size, "must be >= 1")
        check(self.n_best >= 1, "generate.n_best", self.n_best, "must be >= 1")
        if self.strategy == "beam":
            check(
                self.n_best <= self.beam_size,
                "generate.n_best",
                self.n_best,
                f"beam search returns at most beam_size = {self.beam_size} captions",
            )
        if self.strategy == "greedy":
            check(
                self.n_best == 1,
                "generate.n_best",
                self.n_best,
                "greedy decoding has one caption; use beam or sample",
            )
        check(self.temperature > 0, "generate.temperature", self.temperature, "must be > 0")
        check(self.top_k >= 0, "generate.top_k", self.top_k, "must be >= 0")
        check_seed("generate.seed", self.seed)
        check(0.0 < self.top_p <= 1.0, "generate.top_p", self.top_p, "must be in (0, 1]")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in unused_generate_keys(self.strategy):
            value = getattr(self, key)
            reader = next(s for s, keys in STRATEGY_KEYS.items() if key in keys)
            check(
                value == defaults[key],
                f"generate.{key}",
                value,
                f"only strategy {reader!r} uses it, and this recipe decodes with {self.strategy!r}; "
                f"remove it or set the default {defaults[key]!r}",
            )

        check(
            self.repetition_penalty > 0, "generate.repetition_penalty", self.repetition_penalty, "must be > 0"
        )
        check(
            self.no_repeat_ngram_size >= 0,
            "generate.no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            "must be >= 0",
        )

    def switched(self, strategy: str, **changes: Any) -> GenerateConfig:
        """These settings decoding with `strategy`, as `--set generate.strategy=...` gives them: the keys
        only other strategies read go back to their defaults, then `changes` apply. Checked as a
        recipe's [generate] is: an unknown key, a wrong type or a bad value is a RecipeError naming
        `generate.KEY`."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        reset = {key: defaults[key] for key in unused_generate_keys(strategy)}
        values = {**dataclasses.asdict(self), **reset, "strategy": strategy, **changes}
        return _build_section(self.KEY, type(self), values)


# The [generate] keys only one strategy reads. Under another strategy they must keep their defaults;
# an override that changes generate.strategy drops the recipe's values of the keys the new strategy
# does not read (a beam recipe run with `--set generate.strategy=greedy` needs no beam_size reset).
STRATEGY_KEYS = {"beam": ("beam_size", "length_penalty"), "sample": ("temperature", "top_k", "top_p", "seed")}


@dataclass(frozen=True)
class EvalConfig(Section):
    KEY = "eval"

    split: str = option("manifest split that is scored", "test")
    levels: tuple[Literal["syllable", "word"], ...] = option(
        "metric tokenizations: 'syllable' (whitespace units) and/or 'word' (the language's word segmenter); "
        "English uses a PTB-compatible tokenizer at both",
        ("syllable",),
    )
    max_images: int = option("score at most this many images (0 = all)", 0)
    metrics: tuple[MetricFamily, ...] = option(
        "metric families: BLEU (1-4), METEOR, ROUGE-L, CIDEr-D, SPICE, chrF; one that cannot run here "
        "(no Java, no CoreNLP, not defined for the language) is reported as unavailable with the reason",
        METRIC_FAMILIES,
    )
    human: bool = option(
        "also score each human caption against the image's other captions (leave-one-out), as a "
        "'human (leave-one-out)' row",
        True,
    )

    def validate(self) -> None:
        check(len(self.levels) > 0, "eval.levels", self.levels, "must name at least one level")
        check(self.max_images >= 0, "eval.max_images", self.max_images, "must be >= 0")
        check(len(self.metrics) > 0, "eval.metrics", self.metrics, "must name at least one metric")


@dataclass(frozen=True)
class ScstConfig(Section):
    """Self-critical sequence training (Rennie et al. 2017): a second stage that starts from a
    cross-entropy run and raises the CIDEr-D of sampled captions (vicap.scst)."""

    KEY = "scst"

    init_from: str = option(
        "a trained run directory to start from; '' (the default) trains with cross-entropy instead", ""
    )
    init_checkpoint: str = option("which checkpoint of init_from: best, last or a step number", "best")
    samples: int = option("captions sampled per image at each step", 5)
    baseline: Literal["mean", "greedy"] = option(
        "what a sample's reward is compared with: 'mean' of the image's other samples (as M2), or the "
        "reward of the image's 'greedy' caption (as Rennie et al.)",
        "mean",
    )
    temperature: float = option("sampling temperature", 1.0)
    level: Literal["", "syllable", "word"] = option(
        "metric tokens the CIDEr-D reward is computed on; '' = the first of eval.levels", ""
    )

    def validate(self) -> None:
        check(self.samples >= 1, "scst.samples", self.samples, "must be >= 1")
        check(
            self.baseline != "mean" or self.samples >= 2,
            "scst.samples",
            self.samples,
            "the 'mean' baseline compares each sample with the others: sample at least 2",
        )
        check(self.temperature > 0, "scst.temperature", self.temperature, "must be > 0")
        which = self.init_checkpoint
        check(
            which in ("best", "last") or which.isdigit(),
            "scst.init_checkpoint",
            which,
            "best, last or a step",
        )


# --------------------------------------------------------------------------- the schema engine


class RecipeSchema:
    """What every kind of recipe is: sections (the dataclass fields whose type is a `Section`), an
    optional top-level `name` and `description`, and, for kinds other than vicap's own, a first line
    `kind = "..."`. A kind of recipe is a short declaration (`Recipe` below, `BaselineRecipe` in
    vicap.baseline.recipe); reading, overriding, validating, writing and describing are done here."""

    KIND: ClassVar[str | None] = None  # the `kind = "..."` a file of this schema declares (None: none)
    OPTIONAL: ClassVar[tuple[str, ...]] = ()  # sections a file may leave out: their defaults apply

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {k: t for k, t in _field_types(cls).items() if isinstance(t, type) and issubclass(t, Section)}

    @classmethod
    def top_level(cls) -> tuple[str, ...]:
        return (("kind",) if cls.KIND else ()) + ("name", "description")

    def check(self) -> None:
        """Rules across sections; raise through `check` (the module function)."""

    def summary(self) -> str:
        """One line saying what the recipe trains (for `vicap validate`)."""
        return self.description

    # ---------------------------------------------------------------- writing

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML/JSON-ready values (tuples become lists): the resolved recipe."""
        out: dict[str, Any] = {"kind": self.KIND} if self.KIND else {}
        out.update(name=self.name, description=self.description)
        for section in self.sections():
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def replace(self, **overrides: Any):
        """A copy with dotted overrides applied and validated again: `recipe.replace(**{"train.lr": 1e-3})`."""
        return self.from_dict(
            apply_overrides(self.to_dict(), [f"{k}={_toml_value(v)}" for k, v in overrides.items()])
        )

    # ---------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Validate plain data (a parsed TOML file, or `to_dict()` output) into the recipe."""
        sections, top = cls.sections(), cls.top_level()
        for key in data:
            if key not in sections and key not in top:
                raise RecipeError(_unknown(key, [*top, *sections]))
        if cls.KIND and data.get("kind") != cls.KIND:
            raise RecipeError(
                f'kind = {data.get("kind")!r}: a {cls.KIND} recipe starts with kind = "{cls.KIND}"'
            )
        missing = [s for s in sections if s not in data and s not in cls.OPTIONAL]
        if missing:
            raise RecipeError(f"missing section(s): {', '.join('[' + s + ']' for s in missing)}")
        built = {name: _build_section(name, sc, data.get(name, {})) for name, sc in sections.items()}
        names = {k: _coerce(k, data[k], str) for k in ("name", "description") if k in data}
        recipe = cls(**built, **names)
        try:
            recipe.check()
        except ValueError as e:
            raise RecipeError(str(e)) from None
        return recipe

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, spec: str | Path, overrides: list[str] | tuple[str, ...] = ()):
        """Read, override and validate a recipe file or shipped recipe name. Errors name the file and key."""
        path, data = read_recipe_file(spec, optional=cls.OPTIONAL)
        try:
            return cls.from_dict(apply_overrides(data, list(overrides)))
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None

    @classmethod
    def describe_fields(cls) -> list[tuple[str, str, Any]]:
        """(dotted key, help, default) for every field, for docs and `vicap list`."""
        rows = []
        for section, sc in cls.sections().items():
            for f in dataclasses.fields(sc):
                default = f.default if f.default is not dataclasses.MISSING else None
                rows.append((f"{section}.{f.name}", f.metadata.get("help", ""), default))
        return rows


@dataclass(frozen=True)
class Recipe(RecipeSchema):
    """A ClipCap recipe: every section is required."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    mapper: MapperConfig
    data: DataConfig
    train: TrainConfig
    generate: GenerateConfig
    eval: EvalConfig
    scst: ScstConfig = field(default_factory=ScstConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    name: str = ""
    description: str = ""

    OPTIONAL = ("scst", "text", "pairs", "mix")

    @property
    def text_only(self) -> bool:
        """Trained without a single image: on the [text] corpus and/or the [pairs] alone."""
        return bool(self.text.source or self.pairs.source) and self.data.image_fraction == 0

    @property
    def sources(self) -> dict[str, bool]:
        """Which training sources the recipe gives (see MIX_SOURCES)."""
        return {
            "images": self.data.image_fraction > 0,
            "text": bool(self.text.source),
            "pairs": bool(self.pairs.source),
        }

    def check(self) -> None:
        check(
            not (self.scst.init_from and self.train.group_by_image),
            "train.group_by_image",
            True,
            "applies to cross-entropy training; self-critical training (scst.init_from) samples its "
            "own captions per image",
        )
        for key in ("text.source", "pairs.source"):
            if not (self.text.source if key == "text.source" else self.pairs.source):
                continue
            check(
                not self.train.group_by_image,
                "train.group_by_image",
                True,
                f"groups the captions of each image; {key} gives sentences, not images",
            )
            check(
                self.encoder.name in TEXT_TOWERS,
                "encoder.name",
                self.encoder.name,
                f"has no text tower to embed {key}'s sentences; use a CLIP encoder "
                f"({' or '.join(TEXT_TOWERS)})",
            )
            # sentences and images meet on the unit sphere (CapDec normalizes both)
            check(
                self.encoder.normalize,
                "encoder.normalize",
                self.encoder.normalize,
                f"{key} trains on L2-normalized text embeddings, so image features must be "
                "L2-normalized too: set encoder.normalize = true",
            )
            check(
                not self.encoder.patch_tokens,
                "encoder.patch_tokens",
                self.encoder.patch_tokens,
                f"text embeddings have no patch tokens: {key} needs encoder.patch_tokens = false",
            )
        check(
            self.data.image_fraction > 0 or bool(self.text.source or self.pairs.source),
            "data.image_fraction",
            self.data.image_fraction,
            "0 leaves nothing to train on: set text.source to a text corpus, pairs.source to sentence "
            "pairs, or a fraction above 0",
        )
        self._check_mix()
        if self.scst.init_from:
            for key, value, default in (
                ("text.source", self.text.source, ""),
                ("pairs.source", self.pairs.source, ""),
                ("data.image_fraction", self.data.image_fraction, 1.0),
                *((f"mix.{name}", getattr(self.mix, name), 0.0) for name in MIX_SOURCES),
            ):
                check(
                    value == default,
                    key,
                    value,
                    "self-critical training samples captions of the training images: no text corpus, "
                    "sentence pairs or [mix] shares, and every image",
                )
        if not self.scst.init_from:  # no SCST stage: its other keys would be accepted and ignored
            default = ScstConfig()
            for f in dataclasses.fields(ScstConfig):
                value = getattr(self.scst, f.name)
                check(
                    value == getattr(default, f.name),
                    f"scst.{f.name}",
                    value,
                    "applies only to a self-critical stage: set scst.init_from to the run to start from",
                )

    def _check_mix(self) -> None:
        """[mix] shares: one for each source the recipe gives and none for a source it does not, adding
        up to 1, each at least one item of train.batch_size."""
        shares = self.mix.shares
        if not shares:
            return
        for name, present in self.sources.items():
            if shares[name] > 0:
                check(present, f"mix.{name}", shares[name], f"a share of nothing: set {MIX_SOURCES[name]}")
            else:
                check(
                    not present,
                    f"mix.{name}",
                    shares[name],
                    f"{MIX_SOURCES[name]} is given but gets no share of the batches: give it one, or "
                    "remove it",
                )
        total = sum(shares.values())
        check(
            abs(total - 1) < 1e-6,
            "mix.images + mix.text + mix.pairs",
            round(total, 6),
            "the shares of a global batch must add up to 1",
        )
        counts = self.mix.counts(self.train.batch_size)
        for name, share in shares.items():
            check(
                share == 0 or counts[name] > 0,
                f"mix.{name}",
                share,
                f"is no item of a global batch of train.batch_size = {self.train.batch_size}: raise one "
                "of them",
            )
        check(
            not self.train.group_by_length,
            "train.group_by_length",
            True,
            "regroups items across global batches by length, which would break the [mix] shares; set "
            "it to false",
        )

    def summary(self) -> str:
        line = f"{self.encoder.model} -> {self.mapper.type} -> {self.decoder.model}, tuning={self.decoder.tuning}"
        if self.text.source:
            line += f"; text corpus {self.text.source}"
        if self.pairs.source:
            line += (
                f"; sentence pairs {self.pairs.source} ({self.pairs.source_language} -> {self.data.language})"
            )
        if self.text_only:
            line += " (no images)"
        if self.mix.shares:
            line += "; each batch " + " + ".join(f"{v:g} {k}" for k, v in self.mix.shares.items() if v)
        if self.scst.init_from:
            line += f"; self-critical training from {self.scst.init_from} ({self.scst.init_checkpoint} checkpoint)"
        return line


# Recipe kinds by the `kind` a file declares (None: vicap's own); vicap.baseline.recipe adds its own.
RECIPE_KINDS: dict[str | None, type[RecipeSchema]] = {None: Recipe}


def load_any_recipe(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeSchema:
    """A recipe of whichever kind its file declares (`kind = "baseline"`, or none for vicap's)."""
    import vicap.baseline.recipe  # noqa: F401  (registers the baseline kind)

    path = find_recipe(spec)
    kind = read_toml(path).get("kind")
    if kind not in RECIPE_KINDS:
        known = ", ".join(repr(k) for k in RECIPE_KINDS if k)
        raise RecipeError(f"{path}: kind = {kind!r}: known kinds are {known} (or no kind line for vicap's)")
    return RECIPE_KINDS[kind].load(path, overrides)


SECTIONS: dict[str, type] = Recipe.sections()
recipe_from_dict = Recipe.from_dict
recipe_from_json = Recipe.from_json
load_recipe = Recipe.load
describe_fields = Recipe.describe_fields


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a TOML value against a field type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError("recipe fields are not unions")
    if origin is Literal:  # a choice: its type here, its values in Section.__post_init__
        return _coerce(key, value, type(typing.get_args(tp)[0]))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan; no recipe setting means them
            raise RecipeError(f"{key} = {value!r}: must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp}")


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; known: {', '.join(known)}"


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"[{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(_unknown(f"{name}.{key}", list(fields)))
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    except TypeError as e:  # a required field is missing
        raise RecipeError(f"[{name}]: {e}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Write a recipe dict (top-level scalars, then one table per section) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4). A value that is not valid TOML is taken as a string."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError(f"override {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if part not in node:
                raise RecipeError(f"override {text!r}: " + _unknown(part, list(node)))
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    overridden = [parse_override(text)[0] for text in overrides]
    if ["generate", "strategy"] in overridden and isinstance(data.get("generate"), dict):
        section = data["generate"]
        for key in unused_generate_keys(section["strategy"]):
            if ["generate", key] not in overridden:
                section.pop(key, None)
    return data


def unused_generate_keys(strategy: str) -> list[str]:
    """The [generate] keys that only strategies other than `strategy` read (see STRATEGY_KEYS)."""
    return [key for other, keys in STRATEGY_KEYS.items() if other != strategy for key in keys]


# --------------------------------------------------------------------------- files and shipped recipes

SHIPPED_DIR = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe shipped with vicap (package data, so installed wheels have them)."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.toml"))}


def find_recipe(spec: str | Path) -> Path:
    """The recipe file `spec` names: a path that exists wins; otherwise a shipped recipe's name, with or
    without .toml (`vi_ktvic_lora`). Anything else is a RecipeError that lists close shipped names."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"{spec}: a folder, not a recipe file")
    shipped = shipped_recipes()
    name = path.name.removesuffix(".toml")
    if path.name != str(spec):  # a path with folders is a file, never a shipped name
        # recipes/NAME.toml is where shipped recipes lived in source checkouts before they became package data
        hint = f"; did you mean the shipped recipe {name!r} (run it by name)?" if name in shipped else ""
        raise RecipeError(f"{spec}: recipe file not found{hint}")
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise RecipeError(
        f"{spec}: no such recipe file, and no shipped recipe of that name{hint}; "
        "`vicap list` lists the shipped recipes"
    )


def shipped_descriptions() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped recipe, for `vicap list`."""
    return [(name, str(read_toml(path).get("description", ""))) for name, path in shipped_recipes().items()]


def read_toml(path: str | Path) -> dict[str, Any]:
    """A recipe file's raw TOML; a missing file, bytes that are not UTF-8 or bad TOML are a RecipeError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); TOML files are "
            "UTF-8: save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it: {e.strerror or e}") from None


def read_recipe_file(spec: str | Path, optional: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Find and read a recipe file. Sections in `optional` may be left out (their defaults apply);
    `name` and `train.output_dir` default to the file's name (`runs/<stem>`), so a recipe does not
    repeat its own name three times. Overrides still replace them."""
    path = find_recipe(spec)
    data = read_toml(path)
    for section in optional:
        data.setdefault(section, {})
    data.setdefault("name", path.stem)
    if isinstance(data.get("train"), dict):  # a missing or malformed [train] is reported by validation
        data["train"].setdefault("output_dir", f"runs/{path.stem}")
    return path, data
