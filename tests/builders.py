"""The tests' own data and models, independent of `vicap demo`: a few coloured shapes in KTVIC's file
layout with five Vietnamese captions each, and a tiny GPT-2 with a byte-level BPE trained on them.

Deterministic from a seed, small enough to build in a second; what the tests assert about training and
captioning is about this data, so changing the demo never changes a test's expected numbers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"đỏ": (220, 40, 40), "xanh": (40, 90, 220), "vàng": (235, 200, 30)}
SHAPES = ("hình tròn", "hình vuông")
PLACES = {
    "bên trái": (0.05, 0.3, 0.45, 0.7),
    "bên phải": (0.55, 0.3, 0.95, 0.7),
    "ở giữa": (0.3, 0.3, 0.7, 0.7),
}
CAPTIONS = (  # five ways of saying one scene, each image gets all of them
    "Một {shape} màu {colour} {place}.",
    "Có một {shape} {colour} nằm {place} bức ảnh.",
    "Bức ảnh có một {shape} màu {colour}.",
    "{Shape} {colour} {place} trên nền trắng.",
    "Trên nền trắng là một {shape} màu {colour} {place}.",
)


def _image(shape: str, colour: str, place: str, rng: random.Random, size: int = 48):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    x0, y0, x1, y1 = (v * size for v in PLACES[place])
    r = rng.uniform(0.12, 0.18) * size
    cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "hình tròn" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def write_ktvic(root: Path, n_train: int = 24, n_test: int = 6, seed: int = 1) -> Path:
    """KTVIC's layout: train_data.json / test_data.json ({images, annotations}) beside train-images/
    and public-test-images/."""
    rng = random.Random(seed)
    annotation_id = 0
    for file, folder, n, first in (
        ("train_data.json", "train-images", n_train, 0),
        ("test_data.json", "public-test-images", n_test, n_train),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(first, first + n):
            shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
            filename = f"{image_id:06d}.jpg"
            _image(shape, colour, place, rng).save(root / folder / filename, quality=95)
            images.append({"id": image_id, "filename": filename})
            words = {"shape": shape, "Shape": shape.capitalize(), "colour": colour, "place": place}
            for template in CAPTIONS:
                annotations.append(
                    {"id": annotation_id, "image_id": image_id, "caption": template.format(**words)}
                )
                annotation_id += 1
        data = {"images": images, "annotations": annotations}
        (root / file).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


def ktvic_captions(root: Path) -> list[str]:
    data = json.loads((root / "train_data.json").read_text(encoding="utf-8"))
    return [a["caption"] for a in data["annotations"]]


def build_gpt2(out: Path, texts: list[str], *, seed: int = 0) -> Path:
    """A tiny GPT-2 (2 layers, width 128, 64 positions) with a 300-token byte-level BPE trained on
    `texts`, saved as a Hugging Face model folder. EOS = BOS = pad = <|endoftext|>, id 0."""
    from vicap.decoders import save_tiny_gpt2

    return save_tiny_gpt2(out, texts, vocab_size=300, seed=seed)


def _member_bytes(value: bytes | str | dict) -> bytes:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False).encode()
    return value.encode() if isinstance(value, str) else value


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> list[Path]:
    """img2dataset's output layout: `00000.tar`, `00001.tar` ... of `per_shard` samples each, written
    with webdataset's TarWriter. A sample is {"__key__": key, "jpg": bytes, "txt": str, "json": dict, ...};
    str and dict values are written as UTF-8 text and JSON, bytes as they are."""
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(samples), per_shard)):
        shards.append(folder / f"{n:05d}.tar")
        with open(shards[-1], "wb") as f, TarWriter(f, encoder=False) as tar:
            for sample in samples[start : start + per_shard]:
                tar.write({k: v if k == "__key__" else _member_bytes(v) for k, v in sample.items()})
    return shards


def ktvic_samples(root: Path, split: str = "train") -> list[dict]:
    """The images of a `write_ktvic` dataset as img2dataset samples: key, jpg, txt (the image's first
    caption) and json (all of its captions)."""
    file, folder = {
        "train": ("train_data.json", "train-images"),
        "test": ("test_data.json", "public-test-images"),
    }[split]
    data = json.loads((root / file).read_text(encoding="utf-8"))
    captions: dict[int, list[str]] = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    return [
        {
            "__key__": f"{im['id']:09d}",
            "jpg": (root / folder / im["filename"]).read_bytes(),
            "txt": captions[im["id"]][0],
            "json": {"caption": captions[im["id"]][0], "captions": captions[im["id"]], "status": "success"},
        }
        for im in data["images"]
    ]


# ------------------------------------------------------------------------------------------ GGUF files


def _gguf_tensors(lm, arch: str) -> dict:
    """`lm`'s weights under llama.cpp's tensor names, as its convert_hf_to_gguf.py writes them: Llama's
    q/k rows interleaved for llama.cpp's rotary layout, Gemma's RMSNorm weights stored as 1 + w (both
    undone by transformers' reader), a tied output layer left out (its absence means tied)."""
    import gguf

    cfg = lm.config
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers
    )
    out = {}
    for key, value in lm.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        array = value.float().numpy().copy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            shape = array.shape
            array = array.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        if arch == "gemma3" and base.endswith("norm"):
            array = array + 1
        out[f"{names.get_name(base)}.{suffix}"] = array
    return out


def _write_gguf(path: Path, arch: str, hparams: dict, tokenizer: dict, tensors: dict, quantize: bool) -> Path:
    """A GGUF file: `hparams` and `tokenizer` as metadata (GGUFWriter.add_<key>(value) each), then the
    tensors, 2-D ones as Q8_0 blocks when `quantize` (as real files are quantized), others float32."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value in {**hparams, **tokenizer}.items():
        getattr(writer, f"add_{key}")(value)
    for name, array in tensors.items():
        if quantize and array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_gguf_llama(path: Path, texts: list[str], *, seed: int = 0):
    """A tiny Llama as SmolLM2's GGUF files have it: llama architecture, a byte-level BPE tokenizer
    (llama.cpp's "gpt2" model) trained on `texts`, <|endoftext|> (id 0) as BOS and EOS, no BOS added,
    tied embeddings, Q8_0-quantized matrices. Returns (the file, the model it was written from)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    lm = LlamaForCausalLM(config).eval()
    hparams = {
        "context_length": 128,
        "embedding_length": 32,
        "block_count": 2,
        "feed_forward_length": 64,
        "head_count": 4,
        "head_count_kv": 2,
        "layer_norm_rms_eps": config.rms_norm_eps,
        "rope_freq_base": 10000.0,
        "rope_dimension_count": 8,
    }
    tokenizer = {
        "tokenizer_model": "gpt2",
        "token_list": tokens,
        "token_merges": merges,
        "token_types": [3 if t == "<|endoftext|>" else 1 for t in tokens],  # 3: control
        "bos_token_id": 0,
        "eos_token_id": 0,
        "add_bos_token": False,
    }
    return _write_gguf(path, "llama", hparams, tokenizer, _gguf_tensors(lm, "llama"), True), lm


def build_gguf_gemma3(path: Path, texts: list[str], *, seed: int = 0):
    """A tiny Gemma 3 text model as Gemma 3's GGUF files have it: gemma3 architecture, a SentencePiece-style
    BPE vocabulary (llama.cpp's "llama" model, merges implied by the token order) trained on `texts`,
    <pad> 0, <eos> 1, <bos> 2 (put before every text), <unk> 3, tied embeddings scaled by sqrt(hidden),
    float32 tensors. Returns (the file, the model it was written from)."""
    import torch
    from tokenizers import SentencePieceBPETokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"]
    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=200, min_frequency=2, special_tokens=specials, show_progress=False
    )
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=16,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    lm = Gemma3ForCausalLM(config).eval()
    hparams = {
        "context_length": 128,
        "embedding_length": 32,
        "block_count": 2,
        "feed_forward_length": 64,
        "head_count": 4,
        "head_count_kv": 2,
        "key_length": 8,
        "value_length": 8,
        "layer_norm_rms_eps": config.rms_norm_eps,
        "sliding_window": 16,
        "rope_freq_base": float(config.rope_parameters["full_attention"]["rope_theta"]),
    }
    tokenizer = {
        "tokenizer_model": "llama",
        "token_list": tokens,
        "token_scores": [-float(i) for i in range(len(tokens))],
        "token_types": [3 if t in specials else 1 for t in tokens],
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "unk_token_id": 3,
        "add_bos_token": True,
    }
    return _write_gguf(path, "gemma3", hparams, tokenizer, _gguf_tensors(lm, "gemma3"), False), lm
