"""`vicap compare`: table (md/csv/json), published rows, chart, loss curves and gallery from run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vicap.cli import app
from vicap.compare import PUBLISHED_LABEL, comparison_rows, load_reports
from vicap.evaluate import FLOOR, HUMAN

FLOOR_SCORES = {"BLEU-4": 0.1, "ROUGE-L": 0.3, "CIDEr-D": 0.2, "chrF": 0.3}
HUMAN_SCORES = {"BLEU-4": 0.5, "ROUGE-L": 0.6, "CIDEr-D": 2.0, "chrF": 0.7}


def _fake_run(root: Path, name: str, kind: str, system: str, cider: float, images: list[Path]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    scores = {
        level: {
            system: {"BLEU-4": 0.3, "METEOR": 0.25, "ROUGE-L": 0.5, "CIDEr-D": cider, "chrF": 0.55},
            FLOOR: FLOOR_SCORES,
            HUMAN: HUMAN_SCORES,
        }
        for level in ("syllable", "word")
    }
    report = {
        "run": str(run),
        "kind": kind,
        "system": system,
        "split": "test",
        "dataset": "ktvic",
        "images": 2,
    }
    report["scores"] = scores
    (run / "report.json").write_text(json.dumps(report, ensure_ascii=False))
    log = [{"step": s, "epoch": 0, "loss": 3.0 / s} for s in (1, 2, 3)] + [
        {"step": 3, "epoch": 0, "val_loss": 1.5}
    ]
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    rows = [
        {
            "image_id": str(i),
            "image": p.name,
            "path": str(p),
            "caption": f"{name} nói về ảnh {i}",
            "references": ["một <b>"],
        }
        for i, p in enumerate(images)
    ]
    (run / "captions_test.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    )
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    images = []
    for i, colour in enumerate(("red", "blue")):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        images.append(path)
    return [
        _fake_run(tmp_path / "runs", "demo", "vicap", "vicap", 1.2, images),
        _fake_run(tmp_path / "runs", "baseline", "baseline", "CNN+LSTM (attention)", 0.8, images),
    ]


def test_rows_dedupe_shared_references_and_label_published(two_runs: list[Path]) -> None:
    rows = comparison_rows(load_reports(two_runs), ["ktvic", "coco-clipcap"], levels=["syllable"])
    names = [(r["run"], r["system"]) for r in rows]
    assert names[:4] == [
        ("demo", "vicap"),
        ("baseline", "CNN+LSTM (attention)"),
        ("reference", FLOOR),  # the same in both runs: listed once
        ("reference", HUMAN),
    ]
    published = [r for r in rows if r["kind"] == "published"]
    assert len(published) == 4 and all(
        PUBLISHED_LABEL in r["run"] and PUBLISHED_LABEL in r["source"] for r in published
    )
    clipcap = next(r for r in published if r["system"] == "ClipCap MLP + GPT-2 tuning")
    assert clipcap["CIDEr-D"] == pytest.approx(1.0835) and "0-100" in clipcap["source"]  # 108.35 / 100
    viclipcap = next(r for r in published if r["system"] == "ViClipCap")
    assert viclipcap["BLEU-4"] == 0.3431 and viclipcap["SPICE"] == 0.0829
    with pytest.raises(KeyError, match="unknown reference 'flickr'"):
        comparison_rows(load_reports(two_runs), ["flickr"])


def test_cli_compare_writes_table_chart_curves_gallery(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", *map(str, two_runs), "--reference", "ktvic", "--out", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "compare.md").read_text()
    assert "| demo | vicap | syllable |" in md and "| baseline | CNN+LSTM (attention) | word |" in md
    assert f"ViClipCap [{PUBLISHED_LABEL}]" in md and "SPICE" in md and md in res.output
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 + 2 * 2 + 2  # 2 runs x 2 levels, floor + human x 2 levels, 2 published
    assert table[0]["CIDEr-D"] == "1.2" and table[-1]["source"].startswith(PUBLISHED_LABEL)
    data = json.loads((out / "compare.json").read_text())
    assert set(data["runs"]) == {"demo", "baseline"} and "ktvic" in data["references"]
    for png in ("metrics.png", "loss_demo.png", "loss_baseline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    page = (out / "gallery.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2
    assert "demo nói về ảnh 1" in page and "baseline nói về ảnh 0" in page
    assert "một &lt;b&gt;" in page  # captions are escaped

    res = CliRunner().invoke(app, ["compare", str(tmp_path / "nowhere"), "--out", str(out)])
    assert res.exit_code == 2 and "evaluate the run first" in res.output
