"""Shared fixtures: tiny real-format models and a tiny KTVIC-layout dataset, built once per session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
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


@pytest.fixture(scope="session", autouse=True)
def _vicap_cache(tmp_path_factory):
    """vicap's cache (converted GGUF files) in a temporary folder, never the user's ~/.cache."""
    before = os.environ.get("VICAP_CACHE")
    os.environ["VICAP_CACHE"] = str(tmp_path_factory.mktemp("vicap-cache"))
    yield
    if before is None:
        del os.environ["VICAP_CACHE"]
    else:
        os.environ["VICAP_CACHE"] = before


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


@pytest.fixture(scope="session")
def text_clip_dir(tmp_path_factory, tiny_lm_dir: Path) -> Path:
    """A tiny open_clip model whose text tower reads the tiny LM's BPE, saved in its folder and named
    in text_cfg (as `vicap demo` saves its stand-in CLIP)."""
    import open_clip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["text_cfg"]["vocab_size"] = len(tok)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    out = tmp_path_factory.mktemp("text-clip") / "c"
    out.mkdir()
    tok.save_pretrained(out)
    cfg["text_cfg"].update(hf_tokenizer_name="tiny", tokenizer_kwargs={"pad_token": tok.eos_token})
    return save_open_clip(model, cfg, clip_preprocess_cfg(32), out)


def tiny_llama_config(
    vocab_size: int,
    *,
    bos: int = 1,
    eos: int = 2,
    pad: int | None = None,
    tied: bool = False,
    layers: int = 1,
):
    """A tiny Llama: rotary positions, grouped KV heads (4 query heads over 2), width 32."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**_rotary(vocab_size, bos, eos, pad, tied), "num_hidden_layers": layers})


@dataclass(frozen=True)
class TinyLM:
    """One tiny causal LM of a family and the conventions of its tokenizer (ids in `specials` order)."""

    config: Callable[..., object]  # (vocab_size, bos, eos, pad, tied) -> a transformers config
    model: str  # the *ForCausalLM class in transformers
    specials: tuple[str, ...]  # special tokens, ids 0, 1, ...
    eos: str  # the tokenizer's EOS: what captions end with
    bos: str | None = None  # put before every text by the tokenizer (Llama, Gemma), else None
    pad: str | None = None  # the tokenizer's pad token; None: vicap pads with EOS
    more_eos: tuple[str, ...] = ()  # further EOS ids in the config (Gemma's <end_of_turn>)
    tied: bool = False


def _llama(vocab_size, bos, eos, pad, tied):
    return tiny_llama_config(vocab_size, bos=bos, eos=eos, pad=pad, tied=tied)


def _rotary(vocab_size, bos, eos, pad, tied) -> dict:
    """Width 32, 4 query heads over 2 KV heads, rotary positions: the Llama-like families' shared shape."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=tied,
    )


def _gemma3(vocab_size, bos, eos, pad, tied):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_rotary(vocab_size, bos, eos, pad, tied), head_dim=8, sliding_window=16)


def _qwen2(vocab_size, bos, eos, pad, tied):
    from transformers import Qwen2Config

    return Qwen2Config(**_rotary(vocab_size, bos, eos, pad, tied))


def _qwen3(vocab_size, bos, eos, pad, tied):
    from transformers import Qwen3Config

    return Qwen3Config(**_rotary(vocab_size, bos, eos, pad, tied), head_dim=8)


def _bloom(vocab_size, bos, eos, pad, tied):
    from transformers import BloomConfig

    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=tied)
    return BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=1, n_head=4, **ids)


def _gpt_neox(vocab_size, bos, eos, pad, tied):
    from transformers import GPTNeoXConfig

    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=tied)
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        rotary_pct=0.25,
        **ids,
    )


# The families vicap is tested with, each with its own model's conventions: tied or separate output
# embeddings, BOS put before every text or not, a pad token or none, one EOS id or several.
TINY_LMS = {
    "llama-untied-nopad": TinyLM(_llama, "LlamaForCausalLM", ("<unk>", "<s>", "</s>"), "</s>", bos="<s>"),
    "llama-tied-pad": TinyLM(
        _llama,
        "LlamaForCausalLM",
        ("<unk>", "<s>", "</s>", "<pad>"),
        "</s>",
        bos="<s>",
        pad="<pad>",
        tied=True,
    ),
    # Gemma 3: scaled input embeddings, BOS added, <end_of_turn> a second EOS
    "gemma3": TinyLM(
        _gemma3,
        "Gemma3ForCausalLM",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"),
        "<eos>",
        bos="<bos>",
        pad="<pad>",
        more_eos=("<end_of_turn>",),
        tied=True,
    ),
    # Qwen2 instruct: no BOS, EOS <|im_end|>, pads with <|endoftext|>, which is an EOS too
    "qwen2": TinyLM(
        _qwen2,
        "Qwen2ForCausalLM",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        pad="<|endoftext|>",
        more_eos=("<|endoftext|>",),
        tied=True,
    ),
    "qwen3": TinyLM(_qwen3, "Qwen3ForCausalLM", ("<|endoftext|>", "<|im_start|>"), "<|endoftext|>"),
    "bloom": TinyLM(
        _bloom, "BloomForCausalLM", ("<unk>", "<s>", "</s>", "<pad>"), "</s>", pad="<pad>", tied=True
    ),
    "gpt-neox": TinyLM(_gpt_neox, "GPTNeoXForCausalLM", ("<|endoftext|>",), "<|endoftext|>"),
}


def save_word_tokenizer(out: Path, texts: list[str], lm: TinyLM):
    """A word-level tokenizer over `texts` with `lm`'s special tokens first (ids 0, 1, ...), putting
    `lm.bos` before every text when it is set; saved to `out` and returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {t: i for i, t in enumerate([*lm.specials, *words])}
    unk = "<unk>" if "<unk>" in vocab else lm.specials[0]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if lm.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{lm.bos} $A", pair=f"{lm.bos} $A {lm.bos} $B", special_tokens=[(lm.bos, vocab[lm.bos])]
        )
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    named = {"bos_token": lm.bos, "eos_token": lm.eos, "unk_token": unk, "pad_token": lm.pad}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[t for t in lm.specials if t not in named.values()],
        **{k: v for k, v in named.items() if v},
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def save_tiny_lm(out: Path, texts: list[str], family: str) -> Path:
    """A tiny randomly initialised LM of `family` (a TINY_LMS entry) and a word-level tokenizer over
    `texts`, saved as a Hugging Face model folder."""
    import transformers

    lm = TINY_LMS[family]
    tokenizer = save_word_tokenizer(out, texts, lm)
    ids = tokenizer.convert_tokens_to_ids
    eos = [ids(lm.eos), *(ids(t) for t in lm.more_eos)]
    config = lm.config(
        len(tokenizer),
        ids(lm.bos) if lm.bos else ids(lm.eos),
        eos if len(eos) > 1 else eos[0],
        ids(lm.pad) if lm.pad else None,
        lm.tied,
    )
    torch.manual_seed(0)
    getattr(transformers, lm.model)(config).save_pretrained(out)
    return out


def save_tiny_llama(out: Path, texts: list[str], *, pad: bool = False, tied: bool = False) -> Path:
    """A tiny Llama and a word-level tokenizer over `texts` that puts <s> before every text (like
    Llama's), saved as a Hugging Face model folder. Ids: <unk> 0, <s> 1, </s> 2, <pad> 3 if `pad`."""
    family = {(False, False): "llama-untied-nopad", (True, True): "llama-tied-pad"}[(pad, tied)]
    return save_tiny_lm(out, texts, family)


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
