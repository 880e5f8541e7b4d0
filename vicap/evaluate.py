"""Evaluating a run: caption its held-out split, score the captions, write the reports.

Scoring and reporting are separate steps: `score_report` scores one system's captions beside two
references under the same protocol (the most frequent training caption, the floor, and human agreement,
leave-one-out) and returns the report as a dict, writing nothing; `write_report` writes it into the run
as `captions_<split>.jsonl`, `report.json` and `report.md`. The metrics and their tokenization live in
`vicap.metrics`. vicap runs (`evaluate_run`) and the CNN+LSTM baseline (`vicap.baseline`) both go
through these two functions, so both are scored and reported the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from data_prep.manifest import Manifest, Record
from data_prep.textio import json_text, safe_text, write_atomic
from vicap.errors import UsageError
from vicap.metrics import COLUMNS, HUMAN, protocol, score_systems

FLOOR = "most frequent train caption"
__all__ = [
    "FLOOR",
    "HUMAN",
    "evaluate_run",
    "held_out_records",
    "most_frequent_caption",
    "report_markdown",
    "score_report",
    "score_table",
    "table_columns",
    "write_report",
]


def most_frequent_caption(manifest: Manifest, split: str = "train") -> str:
    """The single most frequent caption of a split: the floor any captioner must clear."""
    counts = Counter(c for r in manifest.split(split) for c in r.captions)
    if not counts:
        raise UsageError(f"{manifest.path}: split {split!r} has no captions")
    return counts.most_common(1)[0][0]


def table_columns(rows) -> list[str]:
    """The metric columns present in any row, in the standard order."""
    have = {m for scores in rows for m in scores}
    return [c for c in COLUMNS if c in have] + sorted(have - set(COLUMNS))


def score_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per system, one column per metric (n/a where a row lacks one)."""
    cols = table_columns(rows.values())
    lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, scores in rows.items():
        cells = [f"{scores[m]:.4f}" if scores.get(m) is not None else "n/a" for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    p = report["protocol"]
    out = [
        f"# vicap evaluation: {report['run']}"
        + (f" ({report['system']}, {report['kind']})" if report.get("kind", "vicap") != "vicap" else ""),
        "",
        f"Split `{report['split']}`: {report['images']} images, {report['references']} reference captions. "
        f"Checkpoint: {report.get('checkpoint') or 'step ' + str(report['step'])}.",
        "",
    ]
    if training := report.get("training"):
        texts = " and ".join(
            f"the {what} of `{training[key]}`"
            for key, what in (("text_source", "sentences"), ("pairs_source", "sentence pairs"))
            if training.get(key)
        )
        if training["text_only"]:
            said = f"Trained without images: on {texts} alone (CapDec-style)."
        else:
            said = f"Trained on {training['image_fraction']:.0%} of the training images' caption pairs" + (
                f" and {texts}." if texts else "."
            )
        if training.get("mix"):
            said += (
                " Each global batch: " + ", ".join(f"{v:.0%} {k}" for k, v in training["mix"].items()) + "."
            )
        out += [said, ""]
    for level, rows in report["scores"].items():
        out += [f"## {level}-level tokens", "", score_table(rows), ""]
    if any(HUMAN in rows for rows in report["scores"].values()):
        out += [
            f"`{HUMAN}`: each human caption scored against the image's other captions, averaged over "
            f"{report.get('human_rounds', 'all')} rounds (round r takes caption r mod n of every image). "
            "It has one reference fewer than the systems, which lowers BLEU, METEOR and CIDEr-D a little: "
            "read it as a floor on human agreement.",
            "",
        ]
    out += ["## Protocol", ""] + [f"- {k}: {v}" for k, v in p.items() if k not in ("levels", "metrics")]
    for level, rules in p["levels"].items():
        out.append(
            f"- `{level}` tokens: " + "; ".join(f"{k} {v}" for k, v in rules.items() if v and k != "level")
        )
    if p.get("metrics"):
        out += ["", "## Metrics", ""] + [f"- {k}: {v}" for k, v in p["metrics"].items()]
    if report.get("timing_s"):
        out += ["", "Scoring time: " + ", ".join(f"{k} {v} s" for k, v in report["timing_s"].items())]
    if report.get("skipped"):
        out += ["", f"Skipped (no features, unreadable image): {report['skipped']}"]
    if report.get("examples"):
        out += ["", "## Examples", ""] + [
            f"- `{e['image']}`: {e['caption']}  \n  ref: {e['reference']}" for e in report["examples"]
        ]
    return "\n".join(out) + "\n"


def score_report(
    *,
    run_dir: Path,
    kind: str,
    system: str,
    step: int,
    split: str,
    manifest: Manifest,
    records: list[Record],
    captions: list[str],
    skipped: int,
    eval_cfg,
    generate: dict,
    device: str = "cpu",
    checkpoint: str = "",
) -> dict:
    """The report of one system's captions of `records`, scored beside the floor and human agreement
    at each of eval_cfg's levels with its metrics. Writes nothing (see `write_report`)."""
    refs = {r.image_id: list(r.captions) for r in records}
    hyps = {r.image_id: c for r, c in zip(records, captions, strict=True)}
    floor = most_frequent_caption(manifest, "train")
    levels = tuple(eval_cfg.levels)
    t0 = time.perf_counter()
    scores, notes = score_systems(
        refs,
        {system: hyps, FLOOR: dict.fromkeys(refs, floor)},
        language=manifest.language,
        levels=levels,
        metrics=tuple(eval_cfg.metrics),
        human=eval_cfg.human,
    )
    n_caps = [len(v) for v in refs.values()]
    return {
        "run": str(run_dir),
        "kind": kind,
        "system": system,
        "step": step,
        "checkpoint": checkpoint,  # how it was chosen: best by validation score, last, a step
        "split": split,
        "dataset": manifest.meta.get("dataset", ""),
        "language": manifest.language,
        "images": len(records),
        "references": sum(n_caps),
        "references_per_image": [min(n_caps, default=0), max(n_caps, default=0)],
        "skipped": skipped,
        "generate": generate,
        "device": device,
        "precision": generate.get("precision", "fp32"),
        "baseline_caption": floor,
        "scores": scores,
        "human_rounds": max((n for n in n_caps if n >= 2), default=0) if eval_cfg.human else 0,
        "protocol": protocol(manifest.language, levels, notes),
        "timing_s": {"scoring": round(time.perf_counter() - t0, 2)},
        "examples": [
            {"image": str(manifest.resolve_image(r)), "caption": c, "reference": r.captions[0]}
            for r, c in list(zip(records, captions, strict=True))[:5]
        ],
    }


def write_report(
    out_dir: str | Path, report: dict, manifest: Manifest, records: list[Record], captions: list[str]
) -> None:
    """Write `report` (from `score_report`) into `out_dir` as report.json and report.md, and the
    captions of `records` beside their references as captions_<split>.jsonl.

    A file name that is not UTF-8 is written as its `\\udcXX` escape (`data_prep.textio`). All three
    texts are built before the first file is opened: one that cannot be built leaves the old files as
    they were.
    """
    rows = [
        {
            "image_id": r.image_id,
            "image": r.image,
            **(
                {"member": r.member} if r.member is not None else {}
            ),  # the image inside the tar shard `image`
            "path": str(manifest.resolve_image(r)),
            "caption": c,
            "references": list(r.captions),
        }
        for r, c in zip(records, captions, strict=True)
    ]
    texts = {
        f"captions_{report['split']}.jsonl": "".join(json_text(row) + "\n" for row in rows),
        "report.json": json_text(report, indent=2),
        "report.md": safe_text(report_markdown(report)),
    }
    for name, text in texts.items():
        write_atomic(Path(out_dir) / name, text)


def held_out_records(manifest, split: str, max_images: int = 0) -> list:
    """The split's records to caption and score (the first `max_images` when set); an empty split is
    an error naming the manifest and the splits it has."""
    records = manifest.split(split)
    if not records:
        raise UsageError(f"{manifest.path}: split {split!r} is empty; splits: {sorted(manifest.splits)}")
    return records[:max_images] if max_images else records


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    split: str | None = None,
    progress: bool = True,
    device: str | None = None,
    checkpoint: str = "best",
) -> dict:
    """Caption the run's held-out split, score it beside the floor and human agreement, write reports.

    Encoding and decoding run on `device` (auto, cpu, or a device name such as cuda:1; default: the recipe's
    train.device) with generate.precision; the report records both. `checkpoint`: the run's selected
    one ('best'), 'last' or a step number (see `vicap.checkpoint.pick_checkpoint`)."""
    from vicap.captioner import Captioner
    from vicap.pipeline import prepare_manifest, run_features

    captioner = Captioner.from_run(run_dir, checkpoint=checkpoint, device=device, overrides=overrides)
    run, recipe, dev = captioner.run, captioner.recipe, captioner.device
    split = split or recipe.eval.split
    manifest = prepare_manifest(recipe, run.run_dir)
    store = run_features(recipe, manifest, device=dev, progress=progress)
    records = held_out_records(manifest, split, recipe.eval.max_images)
    scored = [r for r in records if store.has(manifest.resolve_image(r))]
    features = store.get([manifest.resolve_image(r) for r in scored])
    captions = [caps[0].text for caps in captioner.caption_features(features)]
    report = score_report(
        run_dir=run.run_dir,
        kind="vicap",
        system="vicap",
        step=run.checkpoint.step,
        split=split,
        manifest=manifest,
        records=scored,
        captions=captions,
        skipped=len(records) - len(scored),
        eval_cfg=recipe.eval,
        generate=recipe.to_dict()["generate"],
        device=str(dev),
        checkpoint=run.which,
    )
    # what it was trained on, when not every pair
    if recipe.text.source or recipe.pairs.source or recipe.data.image_fraction < 1:
        report["training"] = {
            "text_only": recipe.text_only,
            "text_source": recipe.text.source,
            "pairs_source": recipe.pairs.source,
            "image_fraction": recipe.data.image_fraction,
            "mix": {k: v for k, v in recipe.mix.shares.items() if v},
        }
    write_report(run.run_dir, report, manifest, scored, captions)
    return report
