"""Pictures for people who would rather look than read: loss curves, metric bars, a caption gallery.

matplotlib with the Agg backend (no display needed); imported lazily, with an install hint.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

from data_prep.images import TarMember

log = logging.getLogger(__name__)

CHART_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "chrF")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_train_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_curves(run_dir: Path, out: Path, *, title: str = "") -> Path | None:
    """Training loss (and validation loss, where logged) against optimizer steps; None without a log."""
    rows = read_train_log(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", lw=1.5)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def metric_bars(rows: list[dict], out: Path, *, title: str = "") -> Path:
    """One panel per metric, one bar per row; published rows hatched and labelled as such."""
    plt = _pyplot()
    metrics = [m for m in CHART_METRICS if any(isinstance(r.get(m), float) for r in rows)]

    def label(r: dict) -> str:
        if r["kind"] == "published":
            return r["run"]
        return r["system"] if r["run"] == "reference" else f"{r['run']}: {r['system']}"

    labels = [label(r) for r in rows]
    n = max(len(metrics), 1)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 0.45 * len(rows) * nrows + 1.6), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        values = [r.get(metric) if isinstance(r.get(metric), float) else 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[colours[i % len(colours)] for i in range(len(rows))])
        for bar, r in zip(bars, rows, strict=True):
            if r["kind"] == "published":
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            if not isinstance(r.get(metric), float):
                bar.set_visible(False)
        ax.set_yticks(range(len(rows)), labels if ax in axes[:, 0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(metric)
        ax.set_xlim(0, max([*values, 1e-9]) * 1.2)  # room for the value labels
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(values):
            if isinstance(rows[i].get(metric), float):
                ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle((title + "  " if title else "") + "(hatched: published, not measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _thumbnail(path: Path | TarMember, size: int = 224) -> str | None:
    """A small JPEG of the image as a data: URI, so the gallery is one self-contained file."""
    from vicap.images import ImageError, load_image

    try:
        im = load_image(path)
    except ImageError as e:
        log.warning("gallery: %s", e)
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_captions(run) -> dict[str, dict]:
    split = run.report.get("split", "test")
    path = Path(run.run_dir) / f"captions_{split}.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    manifest_dir = Path(run.run_dir)
    for r in rows:
        r.setdefault("path", str((manifest_dir / r["image"]).resolve()))
    return {str(r["image_id"]): r for r in rows}


def gallery(runs, out: Path, *, max_images: int = 24) -> Path | None:
    """HTML page: held-out images (those every run captioned, in order), each run's caption, references."""
    per_run = {run.name: _read_captions(run) for run in runs}
    per_run = {k: v for k, v in per_run.items() if v}
    if not per_run:
        return None
    first = next(iter(per_run.values()))
    ids = [i for i in first if all(i in caps for caps in per_run.values())][:max_images]
    cards = []
    for image_id in ids:
        row = first[image_id]
        path = row["path"]
        # an image inside a tar shard: its path is the shard's, "/", and the member's name
        ref = (
            TarMember(Path(path[: -len(row["member"]) - 1]), row["member"])
            if row.get("member")
            else Path(path)
        )
        src = _thumbnail(ref)
        img = (
            f'<img src="{src}" alt="{html.escape(image_id)}">'
            if src
            else "<div class='missing'>image unreadable</div>"
        )
        caps = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(caps[image_id]['caption'])}</td></tr>"
            for name, caps in per_run.items()
        )
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row.get("references", []))
        cards.append(
            f"<div class='card'>{img}<div><p class='id'>{html.escape(image_id)}</p>"
            f"<table>{caps}</table><p class='refs-title'>references</p><ul>{refs}</ul></div></div>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vicap gallery</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.card {{ display: flex; gap: 1.2em; border-bottom: 1px solid #ddd; padding: 1em 0; }}
.card img {{ width: 224px; height: auto; object-fit: contain; background: #f4f4f4; }}
th {{ text-align: left; padding-right: 1em; white-space: nowrap; color: #555; }}
.id {{ color: #888; font-size: 0.8em; margin: 0; }}
.refs-title {{ margin: 0.6em 0 0 0; color: #555; }}
ul {{ margin: 0.2em 0; color: #444; }}
</style></head><body>
<h1>Held-out captions</h1>
<p>{len(ids)} images captioned by every run ({", ".join(html.escape(n) for n in per_run)}), with their
human reference captions.</p>
{"".join(cards)}
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out
