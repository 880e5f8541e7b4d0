"""What `prepare` found: counts, per-split sizes, every problem, caption statistics."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from data_prep.errors import DataPrepError
from data_prep.textio import json_text, safe_text, write_atomic


@dataclass(frozen=True)
class Problem:
    """One bad input item: what kind, where (file and line or id), and what was done about it."""

    kind: str  # e.g. "missing_image", "empty_caption", "duplicate_caption_id", "nfd_text"
    file: str
    line_or_id: str
    message: str
    action: str = "skipped"  # "skipped" (dropped and counted) or "fixed" (repaired, kept)

    def format(self) -> str:
        return f"{self.kind}: {self.file} [{self.line_or_id}] {self.message} ({self.action})"


@dataclass
class PrepareReport:
    """The outcome of one `prepare` run."""

    adapter: str
    source: str
    out: str
    language: str
    counts: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no problem at all was found."""
        return not self.problems

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_dict(self) -> dict:
        """The report as JSON-ready data; file names that are not UTF-8 show as `\\udcXX` (textio)."""
        return _safe(
            {
                "adapter": self.adapter,
                "source": self.source,
                "out": self.out,
                "language": self.language,
                "counts": self.counts,
                "splits": self.splits,
                "problem_counts": self.problem_counts(),
                "problems": [asdict(p) for p in self.problems],
                "stats": self.stats,
                "elapsed_s": round(self.elapsed_s, 3),
            }
        )

    def write(self, path: str | os.PathLike) -> None:
        """Write the report as JSON, atomically (a temporary file renamed into place)."""
        write_atomic(path, json_text(self.to_dict(), indent=1) + "\n")

    def format(self, max_problems: int = 20) -> str:
        """Human-readable summary; problems listed up to `max_problems` per kind, the rest counted."""
        c = self.counts
        lines = [
            f"prepare {self.adapter} ({self.language}): {self.source} -> {self.out}",
            f"  images:   {c.get('images', 0)} written, {c.get('images_read', 0)} read, "
            f"{c.get('images_skipped', 0)} skipped",
            f"  captions: {c.get('captions', 0)} written, {c.get('captions_read', 0)} read, "
            f"{c.get('captions_skipped', 0)} skipped, {c.get('captions_fixed', 0)} fixed",
        ]
        if c.get("images"):
            lines.append(f"  captions per image: {c.get('captions', 0) / c['images']:.2f}")
        for name, s in self.splits.items():
            lines.append(f"  split {name}: {s['images']} images, {s['captions']} captions")
        lines.extend(_format_stats(self.stats))
        if self.problems:
            lines.append(
                f"  problems: {len(self.problems)} ({', '.join(f'{k} {n}' for k, n in self.problem_counts().items())})"
            )
            by_kind: dict[str, list[Problem]] = {}
            for p in self.problems:
                by_kind.setdefault(p.kind, []).append(p)
            for kind, items in by_kind.items():
                for p in items[:max_problems]:
                    lines.append("    " + p.format())
                if len(items) > max_problems:
                    lines.append(f"    ... and {len(items) - max_problems} more {kind}")
        else:
            lines.append("  problems: none")
        lines.append(f"  time: {self.elapsed_s:.2f} s")
        return safe_text("\n".join(lines))


def _safe(obj: object) -> object:
    if isinstance(obj, str):
        return safe_text(obj)
    if isinstance(obj, dict):
        return {_safe(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_safe(v) for v in obj]
    return obj


def _format_stats(stats: dict) -> list[str]:
    if not stats:  # not computed (library use without statistics)
        return []
    if not stats.get("lengths"):
        return ["  lengths: no captions written, nothing to measure"]
    lines = []
    if "vocab" in stats:
        lines.append("  vocabulary: " + ", ".join(f"{k} {v}" for k, v in stats["vocab"].items()))
    for unit, d in stats.get("lengths", {}).items():
        lines.append(
            f"  length in {unit + ':':<20} mean {d['mean']:5.1f}, min {d['min']}, p50 {d['p50']}, p90 {d['p90']}, "
            f"p99 {d['p99']}, max {d['max']}"
        )
    return lines


class DataError(DataPrepError):
    """Raised under `strict=True` when problems were found; carries the report."""

    def __init__(self, report: PrepareReport):
        self.report = report
        super().__init__(f"{len(report.problems)} problem(s) in {report.source}:\n{report.format()}")
