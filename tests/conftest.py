"""Shared fixtures: tiny real-format models and a tiny KTVIC-layout dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import vicap  # noqa: E402,F401  (installs the torchvision guard first)
from tests import builders  # noqa: E402
from vicap.encoders import clip_preprocess_cfg, save_open_clip  # noqa: E402
from vicap.recipe import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 1,
        "head_width": 16,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 64,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "pool_type": "last",
    },
}


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny matrices: one thread is faster than two, and far faster on a busy machine (no spin-waits).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ktvic_dir(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in KTVIC's own layout (the tests' own builder, not the demo's)."""
    return builders.write_ktvic(tmp_path_factory.mktemp("ktvic"), n_train=24, n_test=6, seed=1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, ktvic_dir) -> Path:
    """A tiny GPT-2 + byte-level BPE tokenizer, saved as a Hugging Face model folder."""
    return builders.build_gpt2(
        tmp_path_factory.mktemp("lm") / "tiny-gpt2", builders.ktvic_captions(ktvic_dir)
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised open_clip model saved as a local-dir folder."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    return save_open_clip(
        model, TINY_CLIP_CFG, clip_preprocess_cfg(32), tmp_path_factory.mktemp("clip") / "c"
    )


def tiny_llama_config(
    vocab_size: int, *, eos: int = 2, pad: int | None = None, tied: bool = False, layers: int = 1
):
    """A tiny Llama: rotary positions, grouped KV heads (4 query heads over 2), width 32."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=tied,
    )


def save_tiny_llama(out: Path, texts: list[str], *, pad: bool = False, tied: bool = False) -> Path:
    """A tiny Llama and a word-level tokenizer over `texts` that puts <s> before every text (like
    Llama's), saved as a Hugging Face model folder. Ids: <unk> 0, <s> 1, </s> 2, <pad> 3 if `pad`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    extra = {"pad_token": "<pad>"} if pad else {}
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    ).save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(vocab), pad=3 if pad else None, tied=tied)).save_pretrained(out)
    return out


def as_sets(overrides: list[str]) -> list[str]:
    """Overrides as command-line arguments: --set KEY=VALUE each."""
    return [arg for o in overrides for arg in ("--set", o)]


def tiny_recipe_overrides(tmp: Path, ktvic: Path, lm: Path, clip: Path, **extra: str) -> list[str]:
    base = {
        "encoder.model": f"local-dir:{clip}",
        "decoder.model": str(lm),
        "data.source": str(ktvic),
        "data.features_dir": str(tmp / "features"),
        "data.val_fraction": "0.0",
        "train.output_dir": str(tmp / "run"),
        "train.epochs": "2",
        "train.batch_size": "16",
        "train.warmup_steps": "2",
        "train.lr": "1e-3",
        "train.log_every": "1",
        "train.device": "cpu",
        "generate.max_new_tokens": "8",
        "mapper.prefix_length": "2",
        "eval.levels": '["syllable"]',
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_recipe(tmp_path, ktvic_dir, tiny_lm_dir, tiny_clip_dir):
    """Factory: the demo recipe pointed at the tiny models and data, with extra overrides."""

    def make(**extra: str):
        return load_recipe(
            "demo_vi_synthetic",  # the shipped recipe, by name
            tiny_recipe_overrides(tmp_path, ktvic_dir, tiny_lm_dir, tiny_clip_dir, **extra),
        )

    return make
