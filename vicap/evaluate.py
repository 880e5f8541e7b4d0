"""Scoring captions with pycocoevalcap's scorers on tokens vicap produces for the language.

pycocoevalcap's own pipeline tokenizes with the Java PTB tokenizer, written for English (it splits
Vietnamese words at non-Latin-1 letters). vicap instead feeds the scorers the language's metric tokens
(lowercased, punctuation removed; syllables or segmented words), so no Java is needed and the protocol
is stated in every report. Cider here is pycocoevalcap's implementation, which is CIDEr-D (clipped
n-gram counts, Gaussian length penalty, sigma 6).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_prep.languages import get_language
from data_prep.manifest import Manifest

log = logging.getLogger(__name__)

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
EMPTY = "<empty>"  # stands in for an empty hypothesis (ROUGE-L divides by its length); matches nothing


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def tokenize_for_metrics(texts: list[str], language: str, level: str) -> list[str]:
    tokens = get_language(language).metric_tokens_many(texts, level)
    return [" ".join(t) or EMPTY for t in tokens]


def score(
    refs: dict[str, list[str]], hyps: dict[str, str], *, language: str, level: str = "syllable"
) -> dict[str, float]:
    """Corpus scores for hypotheses against references (same keys), on `level` metric tokens."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(refs) != set(hyps):
        raise ValueError(f"references and hypotheses cover different images ({len(refs)} vs {len(hyps)})")
    if not refs:
        raise ValueError("nothing to score")
    keys = sorted(refs)
    flat = tokenize_for_metrics([r for k in keys for r in refs[k]], language, level)
    gts, i = {}, 0
    for k in keys:
        gts[k] = flat[i : i + len(refs[k])]
        i += len(refs[k])
    res = dict(
        zip(keys, ([h] for h in tokenize_for_metrics([hyps[k] for k in keys], language, level)), strict=True)
    )
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(METRICS, [float(b) for b in bleu] + [float(rouge), float(cider)], strict=True))


def protocol(language: str, levels: tuple[str, ...]) -> dict:
    """What the scores were computed on: per level, the language's normalizer, segmenter and text rules."""
    lang = get_language(language)
    return {
        "language": language,
        "levels": {lv: lang.protocol(lv) for lv in levels},
        "scorers": f"pycocoevalcap {_pkg_version('pycocoevalcap')}: Bleu(4), Rouge (ROUGE-L), Cider (CIDEr-D)",
        "empty_hypothesis": f"scored as the token {EMPTY!r}, which matches nothing",
    }


def most_frequent_caption(manifest: Manifest, split: str = "train") -> str:
    """The single most frequent caption of a split: the floor any captioner must clear."""
    counts = Counter(c for r in manifest.split(split) for c in r.captions)
    if not counts:
        raise ValueError(f"{manifest.path}: split {split!r} has no captions")
    return counts.most_common(1)[0][0]


def write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.md").write_text(report_markdown(report), encoding="utf-8")


def score_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per system, one column per metric."""
    lines = ["| system | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    p = report["protocol"]
    out = [
        f"# vicap evaluation: {report['run']}",
        "",
        f"Split `{report['split']}`: {report['images']} images, {report['references']} reference captions. "
        f"Checkpoint step {report['step']}.",
        "",
    ]
    for level, rows in report["scores"].items():
        out += [f"## {level}-level tokens", "", score_table(rows), ""]
    out += ["## Protocol", ""] + [f"- {k}: {v}" for k, v in p.items() if k != "levels"]
    for level, rules in p["levels"].items():
        out.append(
            f"- `{level}` tokens: " + "; ".join(f"{k} {v}" for k, v in rules.items() if v and k != "level")
        )
    if report.get("skipped"):
        out += ["", f"Skipped (no features, unreadable image): {report['skipped']}"]
    if report.get("examples"):
        out += ["", "## Examples", ""] + [
            f"- `{e['image']}`: {e['caption']}  \n  ref: {e['reference']}" for e in report["examples"]
        ]
    return "\n".join(out) + "\n"


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    split: str | None = None,
    progress: bool = True,
) -> dict:
    """Caption the run's held-out split, score it beside the most-frequent-caption floor, write reports."""
    from vicap.generate import generate_captions
    from vicap.pipeline import prepare_manifest, run_features
    from vicap.runs import load_run

    run = load_run(run_dir, overrides)
    recipe = run.recipe
    split = split or recipe.eval.split
    manifest = prepare_manifest(recipe, run.run_dir)
    store = run_features(recipe, manifest, progress=progress)
    records = manifest.split(split)
    if not records:
        raise ValueError(
            f"{manifest.path}: split {split!r} is empty; splits: "
            f"{sorted({r.split for r in manifest.records})}"
        )
    if recipe.eval.max_images:
        records = records[: recipe.eval.max_images]
    scored = [r for r in records if store.has(manifest.resolve_image(r))]
    skipped = len(records) - len(scored)
    features = store.get([manifest.resolve_image(r) for r in scored])
    captions = generate_captions(
        run.model, features, recipe.generate, language=manifest.language, segment=recipe.data.segment
    )
    refs = {r.image_id: list(r.captions) for r in scored}
    hyps = {r.image_id: c for r, c in zip(scored, captions, strict=True)}
    floor = most_frequent_caption(manifest, "train")
    systems = {"vicap": hyps, "most frequent train caption": dict.fromkeys(refs, floor)}
    levels = recipe.eval.levels
    report = {
        "run": str(run.run_dir),
        "step": run.checkpoint.step,
        "split": split,
        "images": len(scored),
        "references": sum(len(v) for v in refs.values()),
        "skipped": skipped,
        "generate": recipe.to_dict()["generate"],
        "baseline_caption": floor,
        "scores": {
            lv: {name: score(refs, h, language=manifest.language, level=lv) for name, h in systems.items()}
            for lv in levels
        },
        "protocol": protocol(manifest.language, levels),
        "examples": [
            {"image": str(manifest.resolve_image(r)), "caption": c, "reference": r.captions[0]}
            for r, c in list(zip(scored, captions, strict=True))[:5]
        ],
    }
    with open(run.run_dir / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
        for r, c in zip(scored, captions, strict=True):
            f.write(
                json.dumps({"image_id": r.image_id, "image": r.image, "caption": c}, ensure_ascii=False)
                + "\n"
            )
    write_report(run.run_dir, report)
    return report
