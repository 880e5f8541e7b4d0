"""`vicap demo`: the whole pipeline, offline, in a few minutes on a CPU.

Nothing is downloaded. The demo
1. draws a deterministic synthetic captioning set (coloured shapes: which shape, colour, how many,
   where, on which background) with five varied Vietnamese captions per image, written in KTVIC's
   own file layout so it is read by the same adapter as a real KTVIC copy;
2. builds two *stand-ins* for the real pretrained models, saved in the real formats and loaded back
   through vicap's real loaders: a tiny CLIP (open_clip `local-dir:` folder) trained contrastively
   for a few hundred steps on the training pairs, and a tiny GPT-2 with a byte-level BPE tokenizer
   trained on the training captions (a Hugging Face model folder). Real recipes name real CLIP and
   GPT-2 weights instead;
3. trains the mapper together with the tiny LM (ClipCap's "MLP + fine-tuned LM" setting: a randomly
   initialised LM has nothing useful to keep frozen), captions the held-out images and scores them
   beside the most-frequent-training-caption floor.

`vicap demo --dataset hard` does the same on a harder set (`vicap.scenes`: 2-4 related shapes per
image, five captions that say different things; its own recipe `demo_vi_scenes`), whose scores stay
clearly between that floor and human agreement; `DEMO_SETS` holds each set's sizes and folders.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the synthetic world

COLOURS = {  # Vietnamese colour name -> RGB
    "đỏ": (215, 38, 38),
    "xanh lá": (40, 165, 60),
    "xanh dương": (35, 75, 215),
    "vàng": (240, 200, 25),
    "tím": (135, 55, 180),
}
BACKGROUNDS = {"trắng": (246, 246, 246), "xám": (125, 125, 125), "đen": (18, 18, 18)}
SHAPES = ("hình tròn", "hình vuông", "hình tam giác")
COUNTS = ("một", "hai", "ba")
# position phrase -> region (x0, y0, x1, y1) as fractions of the image; regions do not overlap
POSITIONS = {
    "bên trái": (0.02, 0.22, 0.42, 0.78),
    "bên phải": (0.58, 0.22, 0.98, 0.78),
    "phía trên": (0.22, 0.02, 0.78, 0.42),
    "phía dưới": (0.22, 0.58, 0.78, 0.98),
    "chính giữa": (0.28, 0.28, 0.72, 0.72),
}
# Seven ways of saying the same scene; each image gets five of them.
TEMPLATES = (
    "{Count} {shape} màu {colour} ở {pos} bức ảnh.",
    "Có {count} {shape} {colour} nằm {pos} trên nền {bg}.",
    "Bức ảnh có {count} {shape} màu {colour} trên nền {bg}.",
    "Trên nền {bg} là {count} {shape} màu {colour} ở {pos}.",
    "{Count} {shape} {colour} được đặt ở {pos} khung hình.",
    "Ở {pos} bức ảnh có {count} {shape} màu {colour}.",
    "Hình ảnh cho thấy {count} {shape} màu {colour} trên một nền {bg}.",
)
# KTVIC ships underthesea-style word segmentation beside each caption; the demo's vocabulary is closed,
# so its compounds are listed here instead of running a segmenter.
COMPOUNDS = (
    "hình tam giác",
    "hình tròn",
    "hình vuông",
    "xanh lá",
    "xanh dương",
    "bức ảnh",
    "khung hình",
    "hình ảnh",
    "chính giữa",
    "cho thấy",
    "được đặt",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    pos: str
    bg: str


def segment_caption(caption: str, compounds: tuple[str, ...] = COMPOUNDS) -> str:
    """KTVIC's `segment_caption` for a closed vocabulary: the listed compounds joined by '_'."""
    for c in compounds:
        caption = caption.replace(c, c.replace(" ", "_")).replace(
            c.capitalize(), c.capitalize().replace(" ", "_")
        )
    return caption.replace(".", " .").strip()


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    count = COUNTS[scene.count - 1]
    words = {
        "count": count,
        "Count": count.capitalize(),
        "shape": scene.shape,
        "colour": scene.colour,
        "pos": scene.pos,
        "bg": scene.bg,
    }
    return [t.format(**words) for t in rng.sample(TEMPLATES, 5)]


def draw_scene(scene: Scene, rng: random.Random, size: int = 96):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.bg])
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * size for v in POSITIONS[scene.pos])
    placed: list[tuple[float, float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(50):  # rejection sampling so shapes do not overlap
            r = rng.uniform(0.065, 0.085) * size
            cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
            if all(math.hypot(cx - px, cy - py) > r + pr + 1 for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[scene.colour])
        if scene.shape == "hình tròn":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif scene.shape == "hình vuông":
            s = r * 0.9
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return image


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(SHAPES),
        rng.choice(list(COLOURS)),
        rng.randint(1, 3),
        rng.choice(list(POSITIONS)),
        rng.choice(list(BACKGROUNDS)),
    )


def shapes_example(rng: random.Random):
    """One image of the demo's shapes and its five captions."""
    scene = random_scene(rng)
    return draw_scene(scene, rng), captions_for(scene, rng)


def write_synthetic_ktvic(root: Path, n_train: int = 1500, n_test: int = 200, seed: int = 0) -> Path:
    """Write the synthetic set in KTVIC's layout: {train,test}_data.json + train-images/, public-test-images/."""
    return write_ktvic_layout(
        root, n_train, n_test, seed=seed, example=shapes_example, segment=segment_caption
    )


def write_ktvic_layout(
    root: Path,
    n_train: int,
    n_test: int,
    *,
    seed: int,
    example: Callable[[random.Random], tuple[Any, list[str]]],
    segment: Callable[[str], str],
) -> Path:
    """Write a synthetic set in KTVIC's layout from `example(rng) -> (PIL image, captions)`: one random
    stream (seeded by `seed`) draws the training images, then the test images, in order; `segment`
    gives each caption's `segment_caption`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split_file, folder, n, first_id in (
        ("train_data.json", "train-images", n_train, 0),
        ("test_data.json", "public-test-images", n_test, n_train),
    ):
        (root / folder).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = first_id + i
            image, captions = example(rng)
            filename = f"{image_id:06d}.jpg"
            image.save(root / folder / filename, quality=95)
            images.append({"id": image_id, "filename": filename})
            for caption in captions:
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "caption": caption,
                        "segment_caption": segment(caption),
                    }
                )
                ann_id += 1
        data = {"images": images, "annotations": annotations}
        (root / split_file).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


def read_train_pairs(root: Path) -> tuple[list[Path], list[list[str]]]:
    data = json.loads((root / "train_data.json").read_text(encoding="utf-8"))
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    return (
        [root / "train-images" / im["filename"] for im in data["images"]],
        [caps[im["id"]] for im in data["images"]],
    )


# --------------------------------------------------------------------------- stand-in models


def build_tiny_lm(out: Path, captions: list[str], *, seed: int = 0) -> Path:
    """The demo's stand-in LM: a 2-layer, 128-wide GPT-2 with a 400-token BPE trained on its captions."""
    from vicap.decoders import save_tiny_gpt2

    return save_tiny_gpt2(out, captions, vocab_size=400, seed=seed)


# A small ModifiedResNet (open_clip's RN family): at this size and step budget a conv tower learns shape,
# count and position far faster than a ViT (measured with linear probes on the demo's held-out images).
TINY_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {
        "context_length": 32,
        "width": 128,
        "heads": 4,
        "layers": 2,
        "mlp_ratio": 2.0,
        "pool_type": "last",
    },
}


def build_tiny_clip(
    out: Path,
    images: list[Path],
    captions: list[list[str]],
    tokenizer_dir: Path,
    *,
    steps: int = 300,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """A tiny CLIP trained contrastively on the demo's training pairs, saved as an open_clip local-dir."""
    import open_clip
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vicap.encoders import clip_preprocess_cfg, save_open_clip
    from vicap.images import load_image

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"]["vocab_size"] = len(tok)
    model = open_clip.CLIP(**cfg)
    size = cfg["vision_cfg"]["image_size"]
    preprocess_cfg = clip_preprocess_cfg(size)
    preprocess = open_clip.image_transform(
        size, is_train=False, mean=preprocess_cfg["mean"], std=preprocess_cfg["std"]
    )
    pixels = torch.stack([preprocess(load_image(p)) for p in images])
    ctx = cfg["text_cfg"]["context_length"]

    def encode_text(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        out = torch.full((len(ids), ctx), tok.eos_token_id, dtype=torch.long)
        for i, t in enumerate(ids):
            t = t[: ctx - 1] + [tok.eos_token_id]
            out[i, : len(t)] = torch.tensor(t)
        return out

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    # warm-up over 10% of the steps (at least 2, which OneCycleLR needs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=steps, pct_start=max(0.1, 2 / steps)
    )
    model.train()
    bar = tqdm(range(steps), desc="tiny CLIP", unit="step", disable=not progress)
    for _ in bar:
        idx = rng.sample(range(len(images)), min(batch_size, len(images)))
        texts = encode_text([rng.choice(captions[i]) for i in idx])
        img_f, txt_f, scale = model(pixels[idx], texts)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    # The text tower's tokenizer goes into the folder, named in text_cfg, so open_clip.get_tokenizer
    # gives the ids `encode_text` gave here (ids, then EOS as padding: the same for captions shorter
    # than the context) and text-only training (vicap.features) embeds sentences with this tower.
    tok.save_pretrained(out)
    text_cfg = {**cfg["text_cfg"], "hf_tokenizer_name": tokenizer_dir.name}
    text_cfg["tokenizer_kwargs"] = {"pad_token": tok.eos_token}
    return save_open_clip(model, {**cfg, "text_cfg": text_cfg}, preprocess_cfg, out)


# --------------------------------------------------------------------------- the demo


DEMO_RECIPE = "demo_vi_synthetic"


@dataclass(frozen=True)
class DemoSet:
    """One synthetic set of `vicap demo --dataset NAME`: how it is drawn, its default sizes, the shipped
    recipe that trains on it and where its inputs go under the demo's output folder."""

    recipe: str  # shipped recipe name
    data: str  # folder under OUT/data
    models: str  # folder under OUT for the two stand-ins
    run: str  # folder under OUT/runs
    write: Callable[[Path, int, int], Path]  # (root, n_train, n_test) -> root, KTVIC layout
    n_train: int
    n_test: int
    clip_steps: int
    blurb: str  # what `vicap demo` says about the data


def _write_scenes(root: Path, n_train: int, n_test: int) -> Path:
    from vicap.scenes import write_scenes_ktvic  # vicap.scenes builds on this module's writer

    return write_scenes_ktvic(root, n_train, n_test)


DEMO_SETS = {
    "shapes": DemoSet(
        DEMO_RECIPE,
        "ktvic-synthetic",
        "models",
        "demo",
        write_synthetic_ktvic,
        1500,
        200,
        300,
        "synthetic shapes with 5 Vietnamese captions each",
    ),
    "hard": DemoSet(
        "demo_vi_scenes",
        "ktvic-scenes",
        "models/scenes",
        "hard",
        _write_scenes,
        3000,
        300,
        300,
        "scenes of 2-4 shapes with relations, textures and clutter, 5 captions each saying different things",
    ),
}


def demo_set(dataset: str) -> DemoSet:
    from vicap.errors import UsageError

    if dataset not in DEMO_SETS:
        raise UsageError(f"--dataset {dataset!r}: no such demo set; choose one of {', '.join(DEMO_SETS)}")
    return DEMO_SETS[dataset]


def demo_recipe_path(dataset: str = "shapes") -> Path:
    """The shipped recipe of a demo set (package data: installed wheels and checkouts alike have it)."""
    from vicap.recipe import find_recipe

    return find_recipe(demo_set(dataset).recipe)


def demo_overrides(out: Path, dataset: str = "shapes") -> list[str]:
    """Recipe overrides that point a demo set's recipe at its data, stand-ins, features and run under `out`."""
    out, spec = Path(out), demo_set(dataset)
    return [
        f"encoder.model=local-dir:{out / spec.models / 'tiny-clip'}",
        f"decoder.model={out / spec.models / 'tiny-gpt2-vi'}",
        f"data.source={out / 'data' / spec.data}",
        f"data.features_dir={out / 'features'}",
        f"train.output_dir={out / 'runs' / spec.run}",
    ]


def _stage(timings: dict, name: str, done: bool, fn) -> None:
    """Run `fn` unless `done` (its output is already there), recording the stage's seconds in `timings`."""
    t = time.time()
    if done:
        log.info("%s: reusing what is on disk", name)
    else:
        fn()
    timings[name] = round(time.time() - t, 1)


def _check_settings(path: Path, settings: dict, built: bool) -> None:
    """Inputs on disk are reused only when built with the same settings (recorded in `path` when first
    built); other settings are an error rather than a run on data of another size."""
    from vicap.errors import UsageError

    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if diff := {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}:
            raise UsageError(
                f"{path}: the demo inputs there were built with "
                + ", ".join(f"{k}={was}" for k, (was, _) in diff.items())
                + ", not "
                + ", ".join(f"{k}={now}" for k, (_, now) in diff.items())
                + f"; use another output folder or delete {path.parent.parent}"
            )
    elif not built:  # inputs of a demo older than this record are reused as they are
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def build_demo_inputs(
    out: Path,
    *,
    dataset: str = "shapes",
    n_train: int | None = None,
    n_test: int | None = None,
    clip_steps: int | None = None,
    progress: bool = True,
    timings: dict | None = None,
) -> None:
    """A demo set's data and its two stand-in models under `out`, each built only if it is missing
    (the layout `demo_overrides(out, dataset)` points at); sizes default to the set's; stage seconds go
    into `timings` when given."""
    out, spec = Path(out), demo_set(dataset)
    n_train, n_test = n_train or spec.n_train, n_test or spec.n_test
    clip_steps = clip_steps or spec.clip_steps
    timings = {} if timings is None else timings
    data = out / "data" / spec.data
    lm_dir, clip_dir = out / spec.models / "tiny-gpt2-vi", out / spec.models / "tiny-clip"
    settings = {"dataset": dataset, "n_train": n_train, "n_test": n_test, "clip_steps": clip_steps}
    _check_settings(out / "data" / f"{spec.data}.settings.json", settings, (data / "test_data.json").exists())
    _stage(
        timings,
        "synthetic data",
        (data / "test_data.json").exists(),
        lambda: spec.write(data, n_train, n_test),
    )
    images, captions = read_train_pairs(data)
    _stage(
        timings,
        "tiny GPT-2",
        (lm_dir / "config.json").exists(),
        lambda: build_tiny_lm(lm_dir, [c for cs in captions for c in cs]),
    )
    _stage(
        timings,
        "tiny CLIP",
        (clip_dir / "open_clip_model.safetensors").exists(),
        lambda: build_tiny_clip(clip_dir, images, captions, lm_dir, steps=clip_steps, progress=progress),
    )


def train_and_evaluate(recipe, *, progress: bool = True, timings: dict | None = None) -> dict:
    """Train `recipe` afresh (its run folder is replaced), caption its held-out split and score it;
    returns the evaluation report. Stage seconds go into `timings` when given."""
    from vicap.evaluate import evaluate_run
    from vicap.train import train

    timings = {} if timings is None else timings
    run_dir = Path(recipe.train.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    _stage(timings, "train", False, lambda: train(recipe, progress=progress))
    report: dict = {}
    _stage(
        timings, "caption + evaluate", False, lambda: report.update(evaluate_run(run_dir, progress=progress))
    )
    return report


def run_demo(
    out: Path,
    *,
    dataset: str = "shapes",
    recipe_path: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    progress: bool = True,
    n_train: int | None = None,
    n_test: int | None = None,
    clip_steps: int | None = None,
) -> dict:
    """Build a demo set's inputs under `out`, train, evaluate; returns the evaluation report.

    The sizes (training and test images, tiny-CLIP steps) default to the set's; smaller ones give the
    same pipeline in seconds, with worse captions (the web-page test serves such a run)."""
    from vicap.recipe import load_recipe

    t0 = time.time()
    recipe = load_recipe(
        recipe_path or demo_recipe_path(dataset), [*demo_overrides(out, dataset), *overrides]
    )
    timings: dict = {}
    build_demo_inputs(
        out,
        dataset=dataset,
        n_train=n_train,
        n_test=n_test,
        clip_steps=clip_steps,
        progress=progress,
        timings=timings,
    )
    report = train_and_evaluate(recipe, progress=progress, timings=timings)
    report["timings_s"] = timings
    report["wall_s"] = round(time.time() - t0, 1)
    return report
