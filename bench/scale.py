"""Scale: feature extraction and training setup at two dataset sizes, from img2dataset-style shards.

For each size N (default 2,000 and 16,000 images, 5 captions each), the bench writes N synthetic
images (coloured shapes, --image-size pixels, JPEG) into webdataset tar shards of 1,000 samples with
their captions in a .json list, as img2dataset would, then runs, each in a child process of its own so
its peak RSS (`os.wait4`'s ru_maxrss) is its own:

- `vicap prepare webdataset SHARDS --option caption_key=captions` (printed, no target);
- `vicap features RECIPE` over that manifest: --repeats times with an empty store (encodes every
  image), then as often with nothing left to encode. Extraction images/s = N / (median wall time of
  the first - median of the second), so start-up, imports and model loading are not counted; the peak
  RSS is the median of the first runs' (one run's varies by a few percent);
- training setup, `vicap.train.clipcap_job` (what `vicap train` does before its first step: manifest,
  feature store, caption token cache, LM, caption model): once building the caption cache, once
  reusing it;
- the same imports and models without any data ("models only"): the floor the setup stands on.

The targets: the peak RSS of `vicap features` and of the training setup grows by less than 10% from
the small to the large size, and extraction runs at the same images/s. Finally it times `vicap
features` at the --parallel size with one process and with two (`python -m vicap.launch
--num_processes 2`, Accelerate's launcher, gloo on CPU), each with an empty store: wall time of the
whole command, reported without a target.

The models are stand-ins with the demo's shapes and random weights (speed and memory do not depend on
their values): the demo's tiny ResNet CLIP (64 px) and a 2-layer GPT-2 with a BPE trained on the
captions. On a 2-core machine the defaults take about six minutes.

    python bench/scale.py [--sizes 2000 16000] [--captions 5] [--image-size 64] [--parallel 16000]
                          [--repeats 3] [--out DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD_SAMPLES = 1000  # samples per tar shard

COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "yellow": (235, 200, 30), "green": (40, 170, 70)}
SHAPES = ("circle", "square")
PLACES = ("left", "right", "middle")
TEMPLATES = (
    "a {colour} {shape} on the {place}",
    "there is a {colour} {shape} on the {place} of the picture",
    "a picture of one {colour} {shape}",
    "{colour} {shape} on a white background",
    "on a white background is a {colour} {shape} on the {place}",
)


def _image(rng: random.Random, size: int) -> tuple[bytes, dict]:
    from PIL import Image, ImageDraw

    words = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "place": rng.choice(PLACES)}
    im = Image.new("RGB", (size, size), (245, 245, 245))
    x = {"left": 0.25, "middle": 0.5, "right": 0.75}[words["place"]] * size
    y, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.1, 0.18) * size
    draw = ImageDraw.Draw(im)
    (draw.ellipse if words["shape"] == "circle" else draw.rectangle)(
        (x - r, y - r, x + r, y + r), fill=COLOURS[words["colour"]]
    )
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return out.getvalue(), words


def write_shards(folder: Path, n: int, captions: int, size: int, seed: int = 0) -> str:
    """N samples in shards of SHARD_SAMPLES: <key>.jpg, <key>.txt (first caption), <key>.json with all
    captions under "captions"; returns the brace pattern naming the shards."""
    from webdataset import TarWriter

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = (n + SHARD_SAMPLES - 1) // SHARD_SAMPLES
    for s in range(shards):
        with open(folder / f"{s:05d}.tar", "wb") as f, TarWriter(f, encoder=False) as tar:
            for k in range(s * SHARD_SAMPLES, min(n, (s + 1) * SHARD_SAMPLES)):
                jpg, words = _image(rng, size)
                caps = [TEMPLATES[i % len(TEMPLATES)].format(**words) for i in range(captions)]
                meta = {"key": f"{k:09d}", "status": "success", "captions": caps}
                tar.write(
                    {
                        "__key__": f"{k:09d}",
                        "jpg": jpg,
                        "txt": caps[0].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def build_models(out: Path) -> tuple[Path, Path]:
    """The demo's tiny CLIP shape with random weights, and a tiny GPT-2 over the bench's captions."""
    import vicap  # noqa: F401,I001  (the torchvision guard: before open_clip imports torchvision)
    import open_clip
    import torch
    from vicap.decoders import save_tiny_gpt2
    from vicap.demo import TINY_CLIP
    from vicap.encoders import clip_preprocess_cfg, save_open_clip

    torch.manual_seed(0)
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"]["vocab_size"] = 64
    clip = save_open_clip(
        open_clip.CLIP(**cfg), cfg, clip_preprocess_cfg(cfg["vision_cfg"]["image_size"]), out / "clip"
    )
    texts = [
        t.format(shape=s, colour=c, place=p)
        for t in TEMPLATES
        for s in SHAPES
        for c in COLOURS
        for p in PLACES
    ]
    lm = save_tiny_gpt2(out / "lm", texts, vocab_size=400)
    return clip, lm


RECIPE = """\
[encoder]
name = "open_clip"
model = "local-dir:{clip}"
pretrained = ""
batch_size = 128

[decoder]
model = "{lm}"
tuning = "frozen"

[mapper]
type = "mlp"
prefix_length = 4

[data]
adapter = "manifest"
source = "{manifest}"
language = "en"
segment = "none"
max_tokens = 40
features_dir = "{features}"

[train]
output_dir = "{run}"
device = "cpu"
batch_size = 64

[generate]

[eval]
"""

SETUP = """\
import json, sys, time
from vicap.recipe import load_recipe
from vicap.train import clipcap_job, make_accelerator
recipe = load_recipe(sys.argv[1], [])
t = time.perf_counter()
job = clipcap_job(recipe, make_accelerator(recipe.train), progress=False)
print(json.dumps({"captions": len(job.train_set), "setup_s": time.perf_counter() - t}))
"""

MODELS_ONLY = """\
import sys
from vicap.decoders import load_decoder
from vicap.encoders import load_encoder
from vicap.model import CaptionModel
from vicap.recipe import load_recipe
from vicap.train import make_accelerator
recipe = load_recipe(sys.argv[1], [])
make_accelerator(recipe.train)
encoder = load_encoder(recipe.encoder)
CaptionModel.from_recipe(recipe, encoder.embed_dim, load_decoder(recipe.decoder))
"""


def run(cmd: list[str], env: dict, what: str) -> tuple[float, float, str]:
    """Run `cmd`; (wall seconds, peak RSS in MiB of that process alone, stdout). Fails loudly."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its rusage is its own
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss / 1024, stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(n: int, args, models: tuple[Path, Path], root: Path, env: dict) -> dict:
    folder = root / f"n{n}"
    t = time.perf_counter()
    pattern = write_shards(folder / "shards", n, args.captions, args.image_size)
    written = time.perf_counter() - t
    manifest = folder / "manifest.jsonl"
    vicap = [sys.executable, "-m", "vicap.cli"]
    prepare = [*vicap, "prepare", "webdataset", pattern, "-o", str(manifest), "--lang", "en"]
    prep_wall, prep_rss, _ = run([*prepare, "--option", "caption_key=captions"], env, "prepare")
    recipe = folder / "recipe.toml"
    recipe.write_text(
        RECIPE.format(
            clip=models[0], lm=models[1], manifest=manifest, features=folder / "features", run=folder / "run"
        )
    )
    # The peak RSS of one run varies by a few percent (~480-505 MiB at 2,000 images on the machine this
    # was written on): each measurement of `vicap features` is the median of --repeats runs.
    colds, rsss = [], []
    for _ in range(args.repeats):
        shutil.rmtree(folder / "features", ignore_errors=True)
        wall, rss, _ = run([*vicap, "features", str(recipe)], env, "features")
        colds.append(wall)
        rsss.append(rss)
    warms = [
        run([*vicap, "features", str(recipe)], env, "features (nothing to encode)")[0]
        for _ in range(args.repeats)
    ]
    cold, feat_rss, warm = statistics.median(colds), statistics.median(rsss), statistics.median(warms)
    setup_wall, setup_rss, out = run([sys.executable, "-c", SETUP, str(recipe)], env, "training setup")
    captions = json.loads(out.splitlines()[-1])["captions"]
    setup2_wall, setup2_rss, _ = run(
        [sys.executable, "-c", SETUP, str(recipe)], env, "training setup (cached)"
    )
    floor_wall, floor_rss, _ = run([sys.executable, "-c", MODELS_ONLY, str(recipe)], env, "models only")
    return {
        "images": n,
        "captions": captions,
        "shards_written_s": written,
        "prepare_s": prep_wall,
        "prepare_rss": prep_rss,
        "features_s": cold,
        "features_rss": feat_rss,
        "features_rss_range": f"{min(rsss):.0f}-{max(rsss):.0f}",
        "features_rerun_s": warm,
        "images_per_s": n / max(cold - warm, 1e-9),
        "setup_s": setup_wall,
        "setup_rss": setup_rss,
        "setup_cached_s": setup2_wall,
        "setup_cached_rss": setup2_rss,
        "models_only_rss": floor_rss,
        "recipe": recipe,
    }


def parallel(recipe: Path, root: Path, env: dict) -> tuple[float, float]:
    """Wall time of `vicap features` on an empty store with 1 and with 2 processes."""
    walls = []
    for nproc in (1, 2):
        features = root / f"features-{nproc}p"
        shutil.rmtree(features, ignore_errors=True)
        sets = ["--set", f"data.features_dir={features}"]
        if nproc == 1:
            cmd = [sys.executable, "-m", "vicap.cli", "features", str(recipe), *sets]
        else:
            cmd = [
                *(
                    sys.executable,
                    "-m",
                    "vicap.launch",
                    "--multi_gpu",
                    "--num_processes=2",
                    "--num_machines=1",
                ),
                *("--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"),
                *("-m", "vicap.cli", "features", str(recipe), *sets),
            ]
        walls.append(run(cmd, env, f"features with {nproc} process(es)")[0])
    return walls[0], walls[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 16000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--captions", type=int, default=5, help="captions per image")
    ap.add_argument("--image-size", type=int, default=64, help="synthetic image side, pixels")
    ap.add_argument(
        "--parallel", type=int, default=16000, help="size of the 1- vs 2-process run (one of --sizes)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of `vicap features` per size (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.parallel not in args.sizes:
        ap.error("--parallel must be one of --sizes")
    root = args.out or Path(tempfile.mkdtemp(prefix="vicap-scale-"))
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(root / "hf_home"),  # Accelerate's launcher reads no user config
    )
    try:
        models = build_models(root / "models")
        rows = [measure(n, args, models, root, env) for n in args.sizes]
        one, two = parallel(next(r["recipe"] for r in rows if r["images"] == args.parallel), root, env)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    small, large = rows

    def growth(key: str) -> str:
        return f"{100 * (large[key] - small[key]) / small[key]:+.1f}%"

    print(
        f"python bench/scale.py --sizes {args.sizes[0]} {args.sizes[1]} --captions {args.captions} "
        f"--image-size {args.image_size} --parallel {args.parallel} --repeats {args.repeats} --threads {args.threads}"
    )
    print(f"{'':42}{small['images']:>12,}{large['images']:>12,}  growth")
    lines = [
        ("captions", "captions", "{:,}"),
        ("writing the shards (s)", "shards_written_s", "{:.1f}"),
        ("vicap prepare (s)", "prepare_s", "{:.1f}"),
        ("vicap prepare peak RSS (MiB)", "prepare_rss", "{:.0f}"),
        ("vicap features, all to encode (s)", "features_s", "{:.1f}"),
        ("vicap features, none to encode (s)", "features_rerun_s", "{:.1f}"),
        ("extraction images/s", "images_per_s", "{:.0f}"),
        ("vicap features peak RSS (MiB), median", "features_rss", "{:.0f}"),
        ("training setup, caption cache built (s)", "setup_s", "{:.1f}"),
        ("training setup peak RSS (MiB)", "setup_rss", "{:.0f}"),
        ("training setup, cache reused (s)", "setup_cached_s", "{:.1f}"),
        ("training setup peak RSS, cache reused", "setup_cached_rss", "{:.0f}"),
        ("models only peak RSS (MiB)", "models_only_rss", "{:.0f}"),
    ]
    for label, key, fmt in lines:
        print(f"{label:42}{fmt.format(small[key]):>12}{fmt.format(large[key]):>12}  {growth(key)}")
    print(
        f"vicap features peak RSS, min-max of {args.repeats} runs: {small['features_rss_range']} -> {large['features_rss_range']}"
    )
    for label, key in (("training setup", "setup_rss"), ("training setup, cache reused", "setup_cached_rss")):
        data = [r[key] - r["models_only_rss"] for r in rows]
        print(f"{label} beyond models only (MiB): {data[0]:.0f} -> {data[1]:.0f}")
    print(
        f"vicap features at {args.parallel:,} images, whole command: 1 process {one:.1f} s, 2 processes {two:.1f} s"
    )


if __name__ == "__main__":
    main()
