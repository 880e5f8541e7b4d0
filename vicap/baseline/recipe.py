"""Baseline recipes: the CNN+LSTM captioner's TOML, validated into frozen dataclasses like vicap's.

Sections: encoder (the CNN), decoder (the LSTM), vocab, data, train, generate, eval. `data`,
`generate` and `eval` are vicap's own sections (same keys, same meaning), so a baseline reads the same
manifest, decodes with the same settings and is scored by the same protocol as the ClipCap recipe
beside it; `data.max_tokens` and `generate.max_new_tokens` count the baseline's own vocabulary tokens,
and `data.features_dir` holds its cached CNN features when the CNN is frozen. The baseline decodes with
its own greedy / beam search, so `[generate]` keys it does not implement (sampling, n-best lists,
repetition rules, stop strings, a minimum length) must stay at their defaults. A file is a baseline
recipe when it has `kind = "baseline"` at the top.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicap.recipe import (
    DataConfig,
    EvalConfig,
    GenerateConfig,
    RecipeError,
    _build_section,
    _check,
    _check_seed,
    _coerce,
    _help,
    _one_of,
    _unknown,
    apply_overrides,
    dump_toml,
    find_recipe,
    read_recipe_file,
    read_toml,
    sections_dict,
)

CNNS = ("resnet50", "resnet18", "efficientnet_b0", "tiny")


@dataclass(frozen=True)
class CNNConfig:
    cnn: str = _help(
        "image encoder: resnet50, resnet18, efficientnet_b0 (torchvision) or tiny (a small conv net "
        "for tests and the demo, always trained from scratch)",
        "resnet50",
    )
    weights: str = _help(
        "'imagenet' (torchvision's ImageNet weights: from the torch hub cache, downloaded when "
        "reachable), 'none' (random init), or a local state dict (.safetensors, or .pth/.pt/.bin read "
        "with torch.load(weights_only=True))",
        "imagenet",
    )
    image_size: int = _help("images are resized (shorter side) and center-cropped to this many pixels", 224)
    grid: int = _help(
        "the feature map is average-pooled to grid x grid regions (attention attends to them; "
        "show_tell uses their mean)",
        7,
    )
    trainable: bool = _help(
        "train the CNN with the decoder; false freezes it and caches its features in data.features_dir",
        False,
    )
    batch_size: int = _help("images per batch when caching frozen features", 64)

    def __post_init__(self) -> None:
        _one_of("encoder.cnn", self.cnn, CNNS)
        _check(bool(self.weights), "encoder.weights", self.weights, "must be 'imagenet', 'none' or a file")
        _check(
            self.cnn != "tiny" or self.weights == "none",
            "encoder.weights",
            self.weights,
            "the tiny CNN has no pretrained weights; use 'none'",
        )
        _check(self.image_size >= 16, "encoder.image_size", self.image_size, "must be >= 16")
        _check(self.grid >= 1, "encoder.grid", self.grid, "must be >= 1")
        _check(self.batch_size > 0, "encoder.batch_size", self.batch_size, "must be > 0")


@dataclass(frozen=True)
class LSTMConfig:
    type: str = _help(
        "'show_tell' (Vinyals et al. 2015: the image is the LSTM's first input) or 'attention' "
        "(Xu et al. 2015: soft attention over the CNN regions at every step)",
        "show_tell",
    )
    embed_dim: int = _help("word embedding width", 512)
    hidden_dim: int = _help("LSTM hidden width", 512)
    attention_dim: int = _help("attention MLP width (type = 'attention')", 512)
    dropout: float = _help("dropout before the output layer", 0.5)

    def __post_init__(self) -> None:
        _one_of("decoder.type", self.type, ("show_tell", "attention"))
        for key in ("embed_dim", "hidden_dim", "attention_dim"):
            _check(getattr(self, key) > 0, f"decoder.{key}", getattr(self, key), "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "decoder.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class VocabConfig:
    type: str = _help(
        "'word': one id per token of the normalized, segmented training captions (data.segment); "
        "'sentencepiece': a unigram SentencePiece model trained on the same text",
        "word",
    )
    min_count: int = _help("word vocabulary: tokens seen fewer times become <unk>", 5)
    size: int = _help("sentencepiece vocabulary size (including the 4 special ids)", 4000)

    def __post_init__(self) -> None:
        _one_of("vocab.type", self.type, ("word", "sentencepiece"))
        _check(self.min_count >= 1, "vocab.min_count", self.min_count, "must be >= 1")
        _check(self.size >= 16, "vocab.size", self.size, "must be >= 16")


@dataclass(frozen=True)
class BaselineTrainConfig:
    output_dir: str = _help(
        "run directory (checkpoints, logs, vocabulary, resolved recipe); a recipe file's default is "
        "runs/<file stem>",
        "runs/baseline",
    )
    seed: int = _help("seed for weights init, data order and dropout", 42)
    epochs: int = _help("passes over the training images (each with all its captions)", 20)
    batch_size: int = _help(
        "images per micro-batch summed over all processes (the global batch); each brings all of its "
        "captions, and every caption token of a step weighs the same",
        32,
    )
    grad_accum: int = _help("gradient accumulation steps (micro-batches per optimizer step)", 1)
    lr: float = _help("peak learning rate (AdamW)", 4e-4)
    cnn_lr: float = _help("learning rate of a trainable CNN (encoder.trainable)", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    warmup_steps: int = _help("linear warmup steps, then linear decay to 0", 200)
    grad_clip: float = _help("max gradient norm; 0 disables clipping", 5.0)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (through Accelerate)", "no")
    device: str = _help("'auto' lets Accelerate choose; 'cpu' forces the CPU", "auto")
    log_every: int = _help("steps between loss log lines", 50)
    save_every: int = _help("optimizer steps between checkpoints; 0 saves once per epoch", 0)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", 1)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        for key in ("lr", "cnn_lr"):
            _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.save_every >= 0, "train.save_every", self.save_every, "must be >= 0")
        _one_of("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _one_of("train.device", self.device, ("auto", "cpu"))
        _check_seed("train.seed", self.seed)


# The [generate] keys the baseline's decoder honours (vicap/baseline/model.py beam_search, beam_size 1
# being greedy); any other key must keep its default, or the recipe would say something that is not done.
GENERATE_KEYS = ("strategy", "beam_size", "max_new_tokens", "length_penalty", "batch_size", "precision")


def check_baseline_generate(gen: GenerateConfig) -> None:
    """A RecipeError naming the first [generate] setting the baseline cannot honour."""
    _check(
        gen.strategy in ("greedy", "beam"),
        "generate.strategy",
        gen.strategy,
        "the baseline decodes with greedy or beam search only",
    )
    default = GenerateConfig()
    for f in dataclasses.fields(GenerateConfig):
        value = getattr(gen, f.name)
        _check(
            f.name in GENERATE_KEYS or value == getattr(default, f.name),
            f"generate.{f.name}",
            value,
            f"the baseline does not implement it (its decoder takes {', '.join(GENERATE_KEYS)}); "
            f"remove it or set the default {getattr(default, f.name)!r}",
        )


SECTIONS: dict[str, type] = {
    "encoder": CNNConfig,
    "decoder": LSTMConfig,
    "vocab": VocabConfig,
    "data": DataConfig,
    "train": BaselineTrainConfig,
    "generate": GenerateConfig,
    "eval": EvalConfig,
}
TOP_LEVEL = ("kind", "name", "description")
REQUIRED = ("encoder", "decoder", "data")  # the other sections may be left out: their defaults apply
KIND = "baseline"


@dataclass(frozen=True)
class BaselineRecipe:
    encoder: CNNConfig
    decoder: LSTMConfig
    vocab: VocabConfig
    data: DataConfig
    train: BaselineTrainConfig
    generate: GenerateConfig
    eval: EvalConfig
    name: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "name": self.name,
            "description": self.description,
            **sections_dict(self, SECTIONS),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def baseline_from_dict(data: dict[str, Any]) -> BaselineRecipe:
    for key in data:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise RecipeError(_unknown(key, [*TOP_LEVEL, *SECTIONS]))
    if data.get("kind") != KIND:
        raise RecipeError(f'kind = {data.get("kind")!r}: a baseline recipe starts with kind = "baseline"')
    missing = [s for s in REQUIRED if s not in data]
    if missing:
        raise RecipeError(f"missing section(s): {', '.join('[' + s + ']' for s in missing)}")
    sections = {name: _build_section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()}
    try:
        check_baseline_generate(sections["generate"])
    except ValueError as e:
        raise RecipeError(str(e)) from None
    top = {k: _coerce(k, data[k], str) for k in ("name", "description") if k in data}
    return BaselineRecipe(**sections, **top)


def is_baseline_recipe(path: str | Path) -> bool:
    """True when the recipe (a file or shipped name) declares kind = "baseline" (how `vicap validate`
    tells the two apart). A file that cannot be read is not one; loading it reports why."""
    try:
        return read_toml(find_recipe(path)).get("kind") == KIND
    except RecipeError:
        return False


def load_baseline_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BaselineRecipe:
    """Read, override and validate a baseline recipe file or shipped name. Errors name the file and key."""
    # vocab, train, generate and eval may be left out: their defaults apply.
    path, data = read_recipe_file(path, optional=tuple(s for s in SECTIONS if s not in REQUIRED))
    try:
        return baseline_from_dict(apply_overrides(data, list(overrides)))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def baseline_from_json(text: str) -> BaselineRecipe:
    return baseline_from_dict(json.loads(text))
