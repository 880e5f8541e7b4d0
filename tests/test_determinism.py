"""Same seed, same config, same process: training and captioning repeat bit for bit.

Two seeded tiny runs (tiny GPT-2 + tiny CLIP, conftest.py) must log identical losses, end with
identical weights and write identical held-out captions. Every source of randomness vicap uses is
exercised: weight init, data order, dropout, CapDec feature noise, sampled captions. A third run
with another seed shows that the comparison can fail. What this does not cover (thread count, CPU
instruction set, another torch build) is in the README's demo section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vicap.checkpoint import list_checkpoints
from vicap.evaluate import evaluate_run
from vicap.train import read_log, train


def run_once(tiny_recipe, out: Path, settings: dict[str, str], generate: list[str]) -> dict:
    run = train(tiny_recipe(**{"train.output_dir": str(out), **settings}), progress=False)
    evaluate_run(run, generate, progress=False)
    lines = (run / "captions_test.jsonl").read_text(encoding="utf-8").splitlines()
    return {
        "losses": [row["loss"] for row in read_log(run) if "loss" in row],
        "captions": [json.loads(line)["caption"] for line in lines],
        "weights": load_file(list_checkpoints(run)[-1] / "model.safetensors"),
    }


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "case, settings, generate",
    [
        ("demo setting: LM tuned, beam search", {}, []),
        (
            "frozen LM, mapper dropout, feature noise, sampled captions",
            {"decoder.tuning": "frozen", "mapper.dropout": "0.2", "train.feature_noise": "0.1"},
            ["generate.strategy=sample", "generate.top_k=20"],
        ),
    ],
)
def test_two_seeded_runs_are_identical(tiny_recipe, tmp_path: Path, case, settings, generate) -> None:
    a = run_once(tiny_recipe, tmp_path / "a", settings, generate)
    b = run_once(tiny_recipe, tmp_path / "b", settings, generate)
    assert len(a["losses"]) == 16 and len(a["captions"]) == 6, case
    assert a["losses"] == b["losses"], case
    assert a["captions"] == b["captions"], case
    assert same_weights(a["weights"], b["weights"]), case

    other = run_once(tiny_recipe, tmp_path / "c", {**settings, "train.seed": "7"}, generate)
    assert other["losses"] != a["losses"], case
    assert not same_weights(other["weights"], a["weights"]), case
