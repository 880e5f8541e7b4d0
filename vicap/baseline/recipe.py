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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicap.recipe import (
    RECIPE_KINDS,
    DataConfig,
    EvalConfig,
    GenerateConfig,
    RecipeError,
    RecipeSchema,
    Section,
    TrainSettings,
    check,
    find_recipe,
    option,
    read_toml,
)

CNN = Literal["resnet50", "resnet18", "efficientnet_b0", "tiny", "timm"]
CNNS = typing.get_args(CNN)
IMAGE_SIZE = 224


@dataclass(frozen=True)
class CNNConfig(Section):
    KEY = "encoder"

    cnn: CNN = option(
        "image encoder: resnet50, resnet18, efficientnet_b0 (torchvision), tiny (a small conv net "
        "for tests and the demo, always trained from scratch) or timm (encoder.model, read as vicap's "
        "encoder.name = 'timm' reads it: its pooled features, the same feature store rows as a vicap run "
        "with that model and weights file)",
        "resnet50",
    )
    model: str = option(
        "cnn = 'timm': the timm model name (efficientnet_lite0); encoder.weights is its local weights file",
        "",
    )
    weights: str = option(
        "'imagenet' (torchvision's ImageNet weights: from the torch hub cache, downloaded when "
        "reachable), 'none' (random init), or a local state dict (.safetensors, or .pth/.pt/.bin read "
        "with torch.load(weights_only=True))",
        "imagenet",
    )
    image_size: int = option(
        "images are resized (shorter side) and center-cropped to this many pixels", IMAGE_SIZE
    )
    grid: int = option(
        "the feature map is average-pooled to grid x grid regions (attention attends to them; "
        "show_tell uses their mean)",
        7,
    )
    trainable: bool = option(
        "train the CNN with the decoder; false freezes it and caches its features in data.features_dir",
        False,
    )
    batch_size: int = option("images per batch when caching frozen features", 64)

    def validate(self) -> None:
        check(bool(self.weights), "encoder.weights", self.weights, "must be 'imagenet', 'none' or a file")
        check(
            self.cnn != "tiny" or self.weights == "none",
            "encoder.weights",
            self.weights,
            "the tiny CNN has no pretrained weights; use 'none'",
        )
        check(
            bool(self.model) == (self.cnn == "timm"),
            "encoder.model",
            self.model,
            "names the timm model when encoder.cnn = 'timm', and only then",
        )
        if self.cnn == "timm":
            # vicap's timm encoder: frozen, its pooled vector (one region), timm's own preprocessing
            check(
                self.weights not in ("imagenet", "none"),
                "encoder.weights",
                self.weights,
                "encoder.cnn = 'timm' needs the model's weights as a local file",
            )
            check(not self.trainable, "encoder.trainable", self.trainable, "a timm CNN is used frozen")
            check(self.grid == 1, "encoder.grid", self.grid, "a timm CNN gives one pooled region; use 1")
            check(
                self.image_size == IMAGE_SIZE,
                "encoder.image_size",
                self.image_size,
                f"is not used with encoder.cnn = 'timm' (timm's own data config preprocesses): set it back "
                f"to its default, {IMAGE_SIZE}",
            )
        check(self.image_size >= 16, "encoder.image_size", self.image_size, "must be >= 16")
        check(self.grid >= 1, "encoder.grid", self.grid, "must be >= 1")
        check(self.batch_size > 0, "encoder.batch_size", self.batch_size, "must be > 0")


@dataclass(frozen=True)
class LSTMConfig(Section):
    KEY = "decoder"

    type: Literal["show_tell", "attention"] = option(
        "'show_tell' (Vinyals et al. 2015: the image is the LSTM's first input) or 'attention' "
        "(Xu et al. 2015: soft attention over the CNN regions at every step)",
        "show_tell",
    )
    embed_dim: int = option("word embedding width", 512)
    hidden_dim: int = option("LSTM hidden width", 512)
    attention_dim: int = option("attention MLP width (type = 'attention')", 512)
    dropout: float = option("dropout before the output layer", 0.5)

    def validate(self) -> None:
        for key in ("embed_dim", "hidden_dim", "attention_dim"):
            check(getattr(self, key) > 0, f"decoder.{key}", getattr(self, key), "must be > 0")
        check(0.0 <= self.dropout < 1.0, "decoder.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class VocabConfig(Section):
    KEY = "vocab"

    type: Literal["word", "sentencepiece"] = option(
        "'word': one id per token of the normalized, segmented training captions (data.segment); "
        "'sentencepiece': a unigram SentencePiece model trained on the same text",
        "word",
    )
    min_count: int = option("word vocabulary: tokens seen fewer times become <unk>", 5)
    size: int = option("sentencepiece vocabulary size (including the 4 special ids)", 4000)

    def validate(self) -> None:
        check(self.min_count >= 1, "vocab.min_count", self.min_count, "must be >= 1")
        check(self.size >= 16, "vocab.size", self.size, "must be >= 16")


@dataclass(frozen=True)
class BaselineTrainConfig(TrainSettings):
    """vicap's shared [train] keys with the baseline's defaults, plus the CNN's learning rate."""

    output_dir: str = option(
        "run directory (checkpoints, logs, vocabulary, resolved recipe); a recipe file's default is "
        "runs/<file stem>",
        "runs/baseline",
    )
    epochs: int = option("passes over the training images (each with all its captions)", 20)
    batch_size: int = option(
        "images per micro-batch summed over all processes (the global batch); each brings all of its "
        "captions, and every caption token of a step weighs the same",
        32,
    )
    lr: float = option("peak learning rate (AdamW)", 4e-4)
    warmup_steps: int = option("linear warmup steps, then linear decay to 0", 200)
    grad_clip: float = option("max gradient norm; 0 disables clipping", 5.0)
    keep_checkpoints: int = option("how many recent checkpoints to keep", 1)
    cnn_lr: float = option("learning rate of a trainable CNN (encoder.trainable)", 1e-4)

    def validate(self) -> None:
        super().validate()
        check(self.cnn_lr > 0, "train.cnn_lr", self.cnn_lr, "must be > 0")


# The [generate] keys the baseline's decoder honours (vicap/baseline/model.py beam_search, beam_size 1
# being greedy); any other key must keep its default, or the recipe would say something that is not done.
GENERATE_KEYS = ("strategy", "beam_size", "max_new_tokens", "length_penalty", "batch_size", "precision")


def check_baseline_generate(gen: GenerateConfig) -> None:
    """A RecipeError naming the first [generate] setting the baseline cannot honour."""
    check(
        gen.strategy in ("greedy", "beam"),
        "generate.strategy",
        gen.strategy,
        "the baseline decodes with greedy or beam search only",
    )
    default = GenerateConfig()
    for f in dataclasses.fields(GenerateConfig):
        value = getattr(gen, f.name)
        check(
            f.name in GENERATE_KEYS or value == getattr(default, f.name),
            f"generate.{f.name}",
            value,
            f"the baseline does not implement it (its decoder takes {', '.join(GENERATE_KEYS)}); "
            f"remove it or set the default {getattr(default, f.name)!r}",
        )


@dataclass(frozen=True)
class BaselineRecipe(RecipeSchema):
    """A CNN+LSTM recipe: `kind = "baseline"`; vocab, train, generate and eval may be left out."""

    KIND = "baseline"
    OPTIONAL = ("vocab", "train", "generate", "eval")

    encoder: CNNConfig
    decoder: LSTMConfig
    vocab: VocabConfig
    data: DataConfig
    train: BaselineTrainConfig
    generate: GenerateConfig
    eval: EvalConfig
    name: str = ""
    description: str = ""

    def check(self) -> None:
        check_baseline_generate(self.generate)
        check(  # vicap's low-resource setting; the baseline trains on every image
            self.data.image_fraction == 1.0,
            "data.image_fraction",
            self.data.image_fraction,
            "the CNN+LSTM baseline trains on every training image; leave it at 1",
        )

    def summary(self) -> str:
        return f"baseline: {self.encoder.cnn} -> {self.decoder.type} LSTM"


RECIPE_KINDS[BaselineRecipe.KIND] = BaselineRecipe

SECTIONS: dict[str, type] = BaselineRecipe.sections()
KIND = BaselineRecipe.KIND
baseline_from_dict = BaselineRecipe.from_dict
baseline_from_json = BaselineRecipe.from_json
load_baseline_recipe = BaselineRecipe.load


def is_baseline_recipe(path: str | Path) -> bool:
    """True when the recipe (a file or shipped name) declares kind = "baseline" (how `vicap validate`
    tells the two apart). A file that cannot be read is not one; loading it reports why."""
    try:
        return read_toml(find_recipe(path)).get("kind") == KIND
    except RecipeError:
        return False
