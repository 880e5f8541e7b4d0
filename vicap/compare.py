"""`vicap compare`: runs side by side (vicap and baseline alike), beside published numbers.

Reads each run's `report.json` (written by `vicap evaluate` or `vicap baseline evaluate`; the same
format), and writes into the output folder:

  compare.md / compare.csv / compare.json   one row per (run, system, level); published rows when asked
  metrics.png                               a bar chart per metric across the rows of one level
  loss_<run>.png                            training and validation loss per run (from train_log.jsonl)
  gallery.html                              held-out images with each run's caption and the references

Published rows are labelled "published, not measured": they come from papers, with their own data
splits, tokenization and scorer settings, and are there for orientation, not as a like-for-like result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from vicap.errors import MissingFileError, UnknownNameError
from vicap.evaluate import FLOOR, HUMAN, table_columns

log = logging.getLogger(__name__)

PUBLISHED_LABEL = "published, not measured"

# Published tables. Values are stored on vicap's scale (BLEU/METEOR/ROUGE-L/SPICE in 0-1, CIDEr-D as
# pycocoevalcap reports it, 1.0 = "100"); `scale` says how the paper printed them.
PUBLISHED: dict[str, dict] = {
    "ktvic": {
        "source": "ViClipCap paper, KTVIC test split",
        "scale": "as published (0-1; CIDEr on pycocoevalcap's scale); tokenization and METEOR settings of the paper",
        "rows": {
            "CNN+LSTM": {
                "BLEU-4": 0.2572,
                "METEOR": 0.2995,
                "ROUGE-L": 0.4895,
                "CIDEr-D": 0.6282,
                "SPICE": 0.0782,
            },
            "ViClipCap": {
                "BLEU-4": 0.3431,
                "METEOR": 0.3194,
                "ROUGE-L": 0.5204,
                "CIDEr-D": 0.8127,
                "SPICE": 0.0829,
            },
        },
    },
    "coco-clipcap": {
        "source": "ClipCap paper (Mokady et al. 2021), COCO Karpathy test split",
        "scale": "published on a 0-100 scale (B4 32.15, CIDEr 108.35); shown divided by 100 to match vicap's columns",
        "rows": {
            "ClipCap MLP + GPT-2 tuning": {
                "BLEU-4": 0.3215,
                "METEOR": 0.271,
                "CIDEr-D": 1.0835,
                "SPICE": 0.2012,
            },
            "ClipCap Transformer, frozen GPT-2": {
                "BLEU-4": 0.3353,
                "METEOR": 0.2745,
                "CIDEr-D": 1.1308,
                "SPICE": 0.2105,
            },
        },
    },
}
REFERENCE_SYSTEMS = (FLOOR, HUMAN)
INFO_COLUMNS = ("run", "system", "kind", "level", "source", "dataset", "split", "images")


@dataclass
class RunReport:
    name: str
    run_dir: Path
    report: dict

    @property
    def kind(self) -> str:
        return self.report.get("kind", "vicap")

    @property
    def systems(self) -> list[str]:
        """The report's own system first (vicap / the baseline), then the reference rows."""
        first = [s for rows in self.report["scores"].values() for s in rows if s not in REFERENCE_SYSTEMS]
        return list(dict.fromkeys(first))


def _names(run_dirs: list[Path]) -> list[str]:
    """Short unique names: the folder name, with its parent where two runs share one."""
    names = [p.resolve().name for p in run_dirs]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(run_dirs, names, strict=True)
    ]


def load_reports(run_dirs: list[str | Path]) -> list[RunReport]:
    paths = [Path(p) for p in run_dirs]
    out = []
    for path, name in zip(paths, _names(paths), strict=True):
        report_file = path / "report.json"
        if not report_file.is_file():
            raise MissingFileError(
                f"{report_file} not found: evaluate the run first (`vicap evaluate {path}` or "
                f"`vicap baseline evaluate {path}`)"
            )
        out.append(RunReport(name, path, json.loads(report_file.read_text(encoding="utf-8"))))
    return out


def comparison_rows(
    runs: list[RunReport], references: list[str] = (), levels: list[str] | None = None
) -> list[dict]:
    """Rows of the comparison table. A reference system (floor, human) that scores the same in several
    runs (same data and protocol) is listed once."""
    rows: list[dict] = []
    seen_refs: set[tuple] = set()
    all_levels = list(dict.fromkeys(lv for run in runs for lv in run.report["scores"]))
    # Grouped by level: every run's own system first, then the reference rows (floor, human).
    ordered = [
        (level, run, system, scores)
        for level in all_levels
        if not levels or level in levels
        for refs_last in (False, True)
        for run in runs
        for system, scores in run.report["scores"].get(level, {}).items()
        if (system in REFERENCE_SYSTEMS) == refs_last
    ]
    for level, run, system, scores in ordered:
        rep = run.report
        label = run.name
        if system in REFERENCE_SYSTEMS:
            key = (system, level, rep.get("dataset"), rep.get("split"), json.dumps(scores, sort_keys=True))
            if key in seen_refs:
                continue
            seen_refs.add(key)
            label = "reference"
        rows.append(
            {
                "run": label,
                "system": system,
                "kind": "reference" if system in REFERENCE_SYSTEMS else run.kind,
                "level": level,
                "source": "measured",
                "dataset": rep.get("dataset", ""),
                "split": rep.get("split", ""),
                "images": rep.get("images", ""),
                **scores,
            }
        )
    for name in references:
        if name not in PUBLISHED:
            raise UnknownNameError(f"unknown reference {name!r}; known: {', '.join(PUBLISHED)}")
        table = PUBLISHED[name]
        for system, scores in table["rows"].items():
            rows.append(
                {
                    "run": f"{system} [{PUBLISHED_LABEL}]",
                    "system": system,
                    "kind": "published",
                    "level": "as published",
                    "source": f"{PUBLISHED_LABEL}: {table['source']}; {table['scale']}",
                    "dataset": name,
                    "split": "",
                    "images": "",
                    **scores,
                }
            )
    return rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def rows_markdown(rows: list[dict], references: list[str] = ()) -> str:
    cols = table_columns([{k: v for k, v in r.items() if k not in INFO_COLUMNS} for r in rows])
    lines = [
        "| run | system | level | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---:|" * len(cols),
    ]
    for r in rows:
        cells = [_fmt(r[c]) if c in r else "–" for c in cols]
        lines.append(f"| {r['run']} | {r['system']} | {r['level']} | " + " | ".join(cells) + " |")
    notes = [
        "",
        "Scores: BLEU, METEOR, ROUGE-L, SPICE and chrF on 0-1; CIDEr-D on pycocoevalcap's scale (1.0 = 100 in "
        "papers). `–`: not computed for that row (see the run's report.md for why).",
    ]
    for name in references:
        t = PUBLISHED[name]
        notes.append(f"Rows marked [{PUBLISHED_LABEL}]: {t['source']}; {t['scale']}.")
    return "\n".join(lines + notes) + "\n"


def rows_csv(rows: list[dict]) -> str:
    cols = list(INFO_COLUMNS) + table_columns(
        [{k: v for k, v in r.items() if k not in INFO_COLUMNS} for r in rows]
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    references: list[str] = (),
    levels: list[str] | None = None,
    chart_level: str | None = None,
    gallery_images: int = 24,
) -> dict:
    """Write the comparison table, charts and gallery; returns {"rows", "files", "markdown"}."""
    from vicap import plots

    runs = load_reports(run_dirs)
    rows = comparison_rows(runs, list(references), levels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = rows_markdown(rows, list(references))
    files = {"markdown": out / "compare.md", "csv": out / "compare.csv", "json": out / "compare.json"}
    files["markdown"].write_text(md, encoding="utf-8")
    files["csv"].write_text(rows_csv(rows), encoding="utf-8")
    meta = {
        "runs": {r.name: str(r.run_dir) for r in runs},
        "references": {n: {k: PUBLISHED[n][k] for k in ("source", "scale")} for n in references},
        "rows": rows,
    }
    files["json"].write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    measured_levels = [lv for r in runs for lv in r.report["scores"]]
    level = chart_level or (measured_levels[0] if measured_levels else None)
    chart_rows = [r for r in rows if r["level"] in (level, "as published")]
    files["chart"] = plots.metric_bars(chart_rows, out / "metrics.png", title=f"{level}-level tokens")
    for run in runs:
        png = plots.loss_curves(run.run_dir, out / f"loss_{run.name.replace('/', '_')}.png", title=run.name)
        if png is not None:
            files[f"loss {run.name}"] = png
    gallery = plots.gallery(runs, out / "gallery.html", max_images=gallery_images)
    if gallery is not None:
        files["gallery"] = gallery
    return {"rows": rows, "files": files, "markdown": md}
