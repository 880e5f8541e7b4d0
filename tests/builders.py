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
