"""Scoring captions on tokens vicap produces for the language, with a recorded protocol.

pycocoevalcap's own pipeline tokenizes with the Java PTB tokenizer, written for English (it splits
Vietnamese words at non-Latin-1 letters). vicap instead feeds the scorers the language's metric tokens
(lowercased, punctuation removed; syllables or segmented words) and, for English, a PTB-compatible
tokenizer, so English scores equal the standard pipeline's and every report states its protocol. The
metrics themselves live in `vicap.metrics` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, chrF).

Beside each system a report scores two references under the same protocol: the most frequent
training caption (the floor) and human agreement, each human caption scored against the image's other
captions (leave-one-out).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from vicap.errors import UsageError
from vicap.metrics import (
    COLUMNS,
    EMPTY,
    FAMILIES,
    FAST_FAMILIES,
    Scorer,
    metric_tokens,
    tokenizer_description,
    uses_ptb,
)

log = logging.getLogger(__name__)

# The columns `score` returns by default (pure Python, no Java): BLEU-1..4, ROUGE-L, CIDEr-D.
METRICS = tuple(c for fam in FAST_FAMILIES for c in FAMILIES[fam])
FLOOR = "most frequent train caption"
HUMAN = "human (leave-one-out)"
__all__ = [
    "COLUMNS",
    "EMPTY",
    "FLOOR",
    "HUMAN",
    "METRICS",
    "evaluate_run",
    "most_frequent_caption",
    "protocol",
    "score",
    "score_systems",
    "score_table",
    "tokenize_for_metrics",
]


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def tokenize_for_metrics(texts: list[str], language: str, level: str) -> list[str]:
    """Each caption as the space-joined tokens the metrics see (EMPTY for a caption with none)."""
    return [" ".join(t) or EMPTY for t in metric_tokens(texts, language, level)]


def _check_keys(refs: dict, hyps: dict) -> None:
    if set(refs) != set(hyps):
        raise ValueError(f"references and hypotheses cover different images ({len(refs)} vs {len(hyps)})")
    if not refs:
        raise ValueError("nothing to score")


def _tokenized_refs(refs: dict[str, list[str]], language: str, level: str) -> dict[str, list[str]]:
    keys = sorted(refs)
    flat = tokenize_for_metrics([r for k in keys for r in refs[k]], language, level)
    out, i = {}, 0
    for k in keys:
        out[k] = flat[i : i + len(refs[k])]
        i += len(refs[k])
    return out


def _tokenized_hyps(hyps: dict[str, str], language: str, level: str) -> dict[str, list[str]]:
    keys = sorted(hyps)
    return dict(
        zip(keys, ([h] for h in tokenize_for_metrics([hyps[k] for k in keys], language, level)), strict=True)
    )


def score(
    refs: dict[str, list[str]],
    hyps: dict[str, str],
    *,
    language: str,
    level: str = "syllable",
    metrics: tuple[str, ...] | list[str] = FAST_FAMILIES,
) -> dict[str, float]:
    """Corpus scores for hypotheses against references (same keys), on `level` metric tokens.

    `metrics` names families (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, chrF); one that cannot run here
    (no Java, not defined for the language) is left out of the result, with a logged reason.
    """
    _check_keys(refs, hyps)
    with Scorer(language, metrics) as scorer:
        return scorer.score_tokens(
            _tokenized_refs(refs, language, level), _tokenized_hyps(hyps, language, level)
        )


def leave_one_out(gts: dict[str, list[str]]) -> list[tuple[dict[str, list[str]], dict[str, list[str]]]]:
    """Human-agreement rounds: in round r each image with n >= 2 captions offers caption r mod n as the
    hypothesis and its other n - 1 captions as references. There are as many rounds as the most
    captions any image has, so every caption is a hypothesis once (or more, on images with fewer)."""
    usable = {k: v for k, v in gts.items() if len(v) >= 2}
    rounds = []
    for r in range(max((len(v) for v in usable.values()), default=0)):
        refs, hyps = {}, {}
        for k, caps in usable.items():
            i = r % len(caps)
            hyps[k] = [caps[i]]
            refs[k] = caps[:i] + caps[i + 1 :]
        rounds.append((refs, hyps))
    return rounds


def human_agreement(scorer: Scorer, gts: dict[str, list[str]]) -> dict[str, float] | None:
    """Mean over leave-one-out rounds of the scores of human captions against the others."""
    rounds = leave_one_out(gts)
    if not rounds:
        return None
    per_round = [scorer.score_tokens(refs, hyps) for refs, hyps in rounds]
    return {m: sum(s[m] for s in per_round) / len(per_round) for m in per_round[0]}


def score_systems(
    refs: dict[str, list[str]],
    systems: dict[str, dict[str, str]],
    *,
    language: str,
    levels: tuple[str, ...] | list[str] = ("syllable",),
    metrics: tuple[str, ...] | list[str] = FAST_FAMILIES,
    human: bool = True,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Scores of each system (and, when `human`, of the human captions, leave-one-out) at each level.

    References are tokenized once per level and shared by all systems; one METEOR process serves all.
    Returns ({level: {system: {column: value}}}, {metric family: how it was computed or why not}).
    """
    for name, hyps in systems.items():
        try:
            _check_keys(refs, hyps)
        except ValueError as e:
            raise ValueError(f"system {name!r}: {e}") from None
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with Scorer(language, metrics) as scorer:
        for level in levels:
            gts = _tokenized_refs(refs, language, level)
            rows = {
                name: scorer.score_tokens(gts, _tokenized_hyps(h, language, level))
                for name, h in systems.items()
            }
            if human:
                agreement = human_agreement(scorer, gts)
                if agreement is not None:
                    rows[HUMAN] = agreement
            scores[level] = rows
        notes = dict(scorer.notes)
    return scores, notes


def protocol(language: str, levels: tuple[str, ...] | list[str], notes: dict[str, str] | None = None) -> dict:
    """What the scores were computed on: per level, the language's normalizer, segmenter and text rules."""
    lang = get_language(language)
    levels_info = {}
    for lv in levels:
        info = lang.protocol(lv)
        if uses_ptb(language, lv):  # English: pycocoevalcap's pipeline, not the language's rules
            info.update(
                normalizer="none (Unicode NFC only)",
                segmentation="PTB tokenizer",
                punctuation="pycocoevalcap's PTB punctuation tokens removed (brackets stay as -lrb- -rrb- ...)",
            )
        info["tokenizer"] = tokenizer_description(language, lv)
        levels_info[lv] = info
    out = {
        "language": language,
        "levels": levels_info,
        "scorers": f"pycocoevalcap {_pkg_version('pycocoevalcap')} (BLEU, ROUGE-L; METEOR 1.5 and SPICE 1.0 jars), "
        "CIDEr-D as pycocoevalcap computes it (vicap.metrics.cider), chrF (vicap.metrics.chrf)",
        "empty_hypothesis": f"scored as the token {EMPTY!r}, which matches nothing (empty text for chrF)",
    }
    if notes:
        out["metrics"] = dict(notes)
    return out


def most_frequent_caption(manifest: Manifest, split: str = "train") -> str:
    """The single most frequent caption of a split: the floor any captioner must clear."""
    counts = Counter(c for r in manifest.split(split) for c in r.captions)
    if not counts:
        raise UsageError(f"{manifest.path}: split {split!r} has no captions")
    return counts.most_common(1)[0][0]


def write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.md").write_text(report_markdown(report), encoding="utf-8")


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
        f"Checkpoint step {report['step']}.",
        "",
    ]
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


def caption_report(
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
) -> dict:
    """Score one system's captions of `records` beside the floor and human agreement; write
    `captions_<split>.jsonl`, `report.json` and `report.md` into `run_dir`. Shared by vicap and the
    CNN+LSTM baseline, so both are scored and reported the same way."""
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
    report = {
        "run": str(run_dir),
        "kind": kind,
        "system": system,
        "step": step,
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
    with open(Path(run_dir) / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
        for r, c in zip(records, captions, strict=True):
            row = {
                "image_id": r.image_id,
                "image": r.image,
                "path": str(manifest.resolve_image(r)),
                "caption": c,
                "references": list(r.captions),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_report(Path(run_dir), report)
    return report


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
) -> dict:
    """Caption the run's held-out split, score it beside the floor and human agreement, write reports.

    Encoding and decoding run on `device` (auto, cpu, or a device name such as cuda:1; default: the recipe's
    train.device) with generate.precision; the report records both."""
    from vicap.device import autocast, resolve_device
    from vicap.generate import generate_captions
    from vicap.pipeline import prepare_manifest, run_features
    from vicap.runs import load_run

    run = load_run(run_dir, overrides)
    recipe = run.recipe
    dev = resolve_device(device or recipe.train.device, key="--device" if device else "train.device")
    split = split or recipe.eval.split
    manifest = prepare_manifest(recipe, run.run_dir)
    store = run_features(recipe, manifest, device=dev, progress=progress)
    records = held_out_records(manifest, split, recipe.eval.max_images)
    scored = [r for r in records if store.has(manifest.resolve_image(r))]
    features = store.get([manifest.resolve_image(r) for r in scored])
    model = run.model.to(dev)
    with autocast(dev, recipe.generate.precision):
        captions = generate_captions(
            model, features, recipe.generate, language=manifest.language, segment=recipe.data.segment
        )
    return caption_report(
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
    )
