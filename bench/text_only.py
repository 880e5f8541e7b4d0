"""Captioning images after training on text alone (CapDec-style), on the demo's data, offline.

    python bench/text_only.py [--out DIR] [--dataset shapes|hard] [--noise 0.126 ...] [--images N] [--epochs N]

The demo's shapes set and stand-ins (`vicap.demo.build_demo_inputs`: 1,500 training images with five
Vietnamese captions each, 200 held out, a tiny CLIP trained contrastively on the training pairs and a
tiny GPT-2) are built once under --out (`--dataset hard`: the harder scenes of `vicap.scenes`, 3,000 +
300 images, recipe `demo_vi_scenes`, whose scores have headroom). The training captions are written
one a line to OUT/data/<set>-train-captions.txt, the input of the `text` adapter. Then, all from the
set's shipped recipe (`demo_vi_synthetic`) with L2-normalized features (`encoder.normalize = true`, which text training
needs), each trained and scored on the same 200 held-out images:

- paired: every training image with its captions (the ceiling);
- text-only: the captions' text alone (`data.image_fraction = 0`, `text.source`): the mapper reads
  each sentence's own noisy text embedding; at test time it reads image embeddings. One run per
  --noise std (CapDec's best variance 0.016 is std 0.126), Gaussian, and one uniform at the first;
- 10% paired: a tenth of the training images with their captions, alone;
- 10% paired + text: the same tenth, plus every training caption as text (at the first --noise std).

Every run gets about the paired run's number of optimizer steps (`train.epochs` scaled by its number
of training items), so a small set is not also an undertrained one. The bench prints held-out CIDEr-D
(syllable level) of each run beside the most-frequent-caption floor, with text-only as a multiple of
the floor and a share of the paired run, and writes OUT/text_only_<set>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vicap  # noqa: E402,F401  (the torchvision guard, before transformers)
from vicap.runtime import apply_thread_policy  # noqa: E402

apply_thread_policy()  # before torch loads: vicap's CPU thread policy, as the `vicap` command has it

LEVEL = "syllable"
METRIC = "CIDEr-D"


def build(out: Path, dataset: str, images: int | None) -> tuple[Path, int, int]:
    """Demo data and stand-ins under `out`; the training captions as a text corpus. Returns the
    corpus file, the number of training captions and of distinct ones."""
    from vicap.demo import DEMO_SETS, build_demo_inputs, read_train_pairs

    sizes = {"n_train": images, "n_test": max(images // 10, 1)} if images else {}
    build_demo_inputs(out, dataset=dataset, progress=False, **sizes)
    _, captions = read_train_pairs(out / "data" / DEMO_SETS[dataset].data)
    lines = [c for cs in captions for c in cs]
    corpus = out / "data" / f"{DEMO_SETS[dataset].data}-train-captions.txt"
    corpus.write_text("".join(c + "\n" for c in lines), encoding="utf-8")
    return corpus, len(lines), len(set(lines))


def run(out: Path, dataset: str, name: str, overrides: list[str], epochs: int, val_every: int) -> dict:
    """Train and score one setting; returns its figures and wall time."""
    from vicap.demo import demo_overrides, demo_recipe_path, train_and_evaluate
    from vicap.evaluate import FLOOR
    from vicap.recipe import load_recipe

    recipe = load_recipe(
        demo_recipe_path(dataset),
        [
            *demo_overrides(out, dataset),
            f"train.output_dir={out / 'runs' / dataset / name}",
            "encoder.normalize=true",
            f"train.epochs={epochs}",
            f"train.val_every={val_every}",  # as often, in steps, as the paired run's once an epoch
            *overrides,
        ],
    )
    t0 = time.time()
    report = train_and_evaluate(recipe, progress=False)
    rows = report["scores"][LEVEL]
    result = {
        "name": name,
        "overrides": overrides,
        "epochs": epochs,
        METRIC: rows["vicap"][METRIC],
        "floor": rows[FLOOR][METRIC],
        "wall_s": round(time.time() - t0, 1),
        "example": report["examples"][0],
    }
    print(f"  {name}: {METRIC} {result[METRIC]:.3f} ({result['wall_s']:.0f} s)", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.126], help="feature noise std(s)")
    ap.add_argument(
        "--dataset", default="shapes", help="demo set: shapes (the demo's) or hard (vicap.scenes)"
    )
    ap.add_argument("--images", type=int, default=None, help="training images (default: the set's)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the paired run (the recipe's: 6)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vicap-text-only-"))
    corpus, n_captions, n_distinct = build(out, args.dataset, args.images)
    print(f"{out}: {n_captions} training captions ({n_distinct} distinct) as text corpus {corpus}")
    text = [f"text.source={corpus}", "data.image_fraction=0"]
    sigma = args.noise[0]

    def epochs_for(items: int) -> int:  # about the paired run's optimizer steps
        return max(args.epochs, round(args.epochs * n_captions / max(items, 1)))

    val_every = max(1, round(0.95 * n_captions / 64))  # the recipe: val_fraction 0.05, batch 64

    def run_(name: str, overrides: list[str], epochs: int) -> dict:
        return run(out, args.dataset, name, overrides, epochs, val_every)

    results = [run_("paired", [], args.epochs)]
    for s in args.noise:
        noise = [f"train.feature_noise={s}"] if s else []
        results.append(run_(f"text-only noise {s}", text + noise, epochs_for(n_distinct)))
    if sigma:
        uniform = [f"train.feature_noise={sigma}", "train.feature_noise_kind=uniform"]
        results.append(run_(f"text-only uniform {sigma}", text + uniform, epochs_for(n_distinct)))
    tenth = ["data.image_fraction=0.1"]
    results.append(run_("10% paired", tenth, epochs_for(n_captions // 10)))
    mixed = [f"text.source={corpus}", f"train.feature_noise={sigma}", *tenth]
    results.append(
        run_(f"10% paired + text (noise {sigma})", mixed, epochs_for(n_captions // 10 + n_distinct))
    )

    floor, paired = results[0]["floor"], results[0][METRIC] or float("nan")
    print(f"\nheld-out {METRIC} ({LEVEL} level), {args.dataset} set, {out}")
    print(f"| run | epochs | {METRIC} | x floor | % of paired |")
    print("|---|---|---|---|---|")
    print(
        f"| most frequent training caption (floor) | - | {floor:.3f} | 1.00 | {100 * floor / paired:.0f}% |"
    )
    for r in results:
        print(
            f"| {r['name']} | {r['epochs']} | {r[METRIC]:.3f} | {r[METRIC] / (floor or float('nan')):.2f} | "
            f"{100 * r[METRIC] / paired:.0f}% |"
        )
    (out / f"text_only_{args.dataset}.json").write_text(
        json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
