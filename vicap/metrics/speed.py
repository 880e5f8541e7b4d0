"""How long scoring takes, on real captions: one human caption per image against the others.

    python -m vicap.metrics.speed ../shared/data/uit-viic/uitviic_captions_*2017.json --lang vi

Reads COCO-format caption files (`annotations[]` with `image_id` and `caption`), takes each image's
first caption as the hypothesis and its other captions as references (one leave-one-out round), and
times tokenization, each metric family alone, and all of them together (METEOR's JVM runs beside the
Python scorers). Generation is not part of it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import vicap  # noqa: F401  (torchvision guard before anything else)
from vicap.metrics import FAMILIES, Scorer, leave_one_out, tokenize_references


def read_coco_captions(paths: list[Path]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for a in data["annotations"]:
            refs.setdefault(f"{path.name}:{a['image_id']}", []).append(a["caption"])
    return refs


def time_scoring(
    refs: dict[str, list[str]], language: str, levels: list[str], families: list[str]
) -> list[dict]:
    """Seconds per level for tokenization, each metric family alone, and all families together (what
    `vicap evaluate` does per system: METEOR's JVM works while Python scores the rest)."""
    rows = []
    for level in levels:
        t0 = time.perf_counter()
        gts = tokenize_references(refs, language, level)
        rows.append({"level": level, "step": "tokenize", "seconds": time.perf_counter() - t0, "value": None})
        round_refs, round_hyps = leave_one_out(gts)[0]
        for fam in families:
            with Scorer(language, [fam]) as scorer:
                if not scorer.families:
                    rows.append({"level": level, "step": fam, "seconds": None, "value": scorer.notes[fam]})
                    continue
                t0 = time.perf_counter()
                value = scorer.score_tokens(round_refs, round_hyps)
                rows.append(
                    {"level": level, "step": fam, "seconds": time.perf_counter() - t0, "value": value}
                )
        with Scorer(language, families) as scorer:
            t0 = time.perf_counter()
            scorer.score_tokens(round_refs, round_hyps)
            rows.append(
                {"level": level, "step": "together", "seconds": time.perf_counter() - t0, "value": None}
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="COCO-format caption files")
    ap.add_argument("--lang", default="vi")
    ap.add_argument("--levels", default="syllable,word")
    ap.add_argument("--metrics", default=",".join(FAMILIES))
    args = ap.parse_args()
    refs = read_coco_captions(args.files)
    n_caps = sum(len(v) for v in refs.values())
    print(f"{len(refs)} images, {n_caps} captions; hypothesis = first caption, references = the others")
    for row in time_scoring(refs, args.lang, args.levels.split(","), args.metrics.split(",")):
        secs = row["seconds"]
        shown = "" if row["value"] is None else json.dumps(row["value"], ensure_ascii=False)
        print(f"{row['level']:9s} {row['step']:9s} {'-' if secs is None else f'{secs:6.2f} s'}  {shown}")


if __name__ == "__main__":
    main()
