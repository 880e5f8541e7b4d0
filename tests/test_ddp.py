"""Data-parallel training on CPU (gloo): 2 processes give the same run as 1 with the same global batch,
and a 2-process run resumes from its checkpoint exactly.

The processes are started by `accelerate launch --multi_gpu --num_processes 2` (through
`python -m vicap.launch`, which is Accelerate's launcher with vicap's torchvision guard imported
first), running the real command, `vicap train`; on a machine with no GPU the processes use gloo on
CPU. (`accelerate launch --cpu` starts a single process unless it is given an MPI hostfile.)

Tolerance: the two runs do the same arithmetic except that each gradient is summed in two halves
and all-reduced, which reorders float additions (~1e-7 relative). Logged losses must agree to 1e-5
relative and final weights to 1e-4 relative / 1e-5 absolute after 16 AdamW steps.

The runs use a frozen LM and no mapper dropout or feature noise: those draw random numbers per
process, and a run on 2 processes draws them in a different order (so it trains equally well, on
different random masks).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from vicap.checkpoint import list_checkpoints
from vicap.data import GlobalBatches
from vicap.train import read_log, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe_file: Path, *args: str, nproc: int = 2) -> None:
    cmd = [
        sys.executable,
        "-m",
        "vicap.launch",  # `accelerate launch`, with vicap's torchvision guard first
        "--multi_gpu",
        f"--num_processes={nproc}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        "-m",
        "vicap.cli",
        "train",
        str(recipe_file),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Accelerate's launcher reads the user's default config under HF_HOME; the test sets everything
    # on the command line, so it points HF_HOME at an empty folder.
    env["HF_HOME"] = str(Path(recipe_file).parent / "hf_home")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if "loss" in r]


def _starts(run: Path) -> list[tuple[str, int]]:
    """(start or resume, process count) of each stretch of training, from the run's log."""
    return [(r["event"], r["processes"]) for r in read_log(run) if "event" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("group_by_image", ["false", "true"])
def test_two_processes_train_like_one_and_resume(tiny_recipe, tmp_path: Path, group_by_image: str) -> None:
    # 120 captions, global batch 16: 7 full batches and one of 8 per epoch, 2 epochs. The transformer
    # mapper exercises attention layers under DDP; batch 16 splits 8 + 8, and the last batch 4 + 4.
    # With train.group_by_image, batches of whole 5-caption images are split mid-image between the
    # processes (and between batches): each side computes that image's prefix, the step is the same.
    common = {
        "train.group_by_image": group_by_image,
        "decoder.tuning": "frozen",
        "mapper.type": "transformer",
        "mapper.num_layers": "1",
        "mapper.num_heads": "4",
        "train.lr": "3e-3",
    }
    single = train(tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "one")}), progress=False)

    recipe = tiny_recipe(**common, **{"train.output_dir": str(tmp_path / "two")})
    recipe_file = tmp_path / "ddp.toml"
    recipe_file.write_text(recipe.to_toml())
    _launch(recipe_file)  # the feature store is already filled by the single run: same folder
    double = Path(recipe.train.output_dir)
    assert _starts(single) == [("start", 1)] and _starts(double) == [("start", 2)]
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-5)
    assert len(_losses(double)) == 16
    _assert_same_weights(_weights(double), _weights(single))
    assert [c.name for c in list_checkpoints(double)] == ["step_00000008", "step_00000016"]

    # Interrupt it after epoch 1 (drop the last checkpoint and later log lines), resume on 2 processes.
    resumed = Path(shutil.copytree(double, tmp_path / "resumed"))
    shutil.rmtree(list_checkpoints(resumed)[-1])
    log = (resumed / "train_log.jsonl").read_text().splitlines()
    (resumed / "train_log.jsonl").write_text(
        "\n".join(line for line in log if json.loads(line)["step"] <= 8) + "\n"
    )
    _launch(recipe_file, f"train.output_dir={resumed}", "--resume")
    assert _starts(resumed) == [("start", 2), ("resume", 2)]
    assert _losses(resumed) == pytest.approx(_losses(single), rel=1e-5)
    _assert_same_weights(_weights(resumed), _weights(single))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_global_batches_split_the_one_process_order(world: int) -> None:
    n, batch = 23, 5  # 4 full global batches and a tail of 3
    one = GlobalBatches(n, batch, shuffle=True, seed=3)
    one.set_epoch(1)
    order = list(one)
    g = torch.Generator()
    g.manual_seed(3 + 1)  # Accelerate's seedable sampler: seed + epoch
    assert [i for b in order for i in b] == torch.randperm(n, generator=g).tolist()
    shards = []
    for rank in range(world):
        s = GlobalBatches(n, batch, shuffle=True, seed=3, rank=rank, world=world)
        s.set_epoch(1)
        shards.append(list(s))
    assert all(len(s) == len(shards[0]) for s in shards)  # every process steps together
    assert len(shards[0]) == (5 if world <= 3 else 4)  # a tail smaller than the process count is dropped
    for b in range(len(shards[0])):
        assert [i for s in shards for i in s[b]] == order[b]  # contiguous slices, in rank order
        assert (
            all(s[b] for s in shards) and max(len(s[b]) for s in shards) - min(len(s[b]) for s in shards) <= 1
        )
    resumed = GlobalBatches(n, batch, shuffle=True, seed=3, rank=world - 1, world=world)
    resumed.set_epoch(1, start=2)
    assert list(resumed) == shards[-1][2:]
    with pytest.raises(ValueError, match="batch_size = 1 is the global batch"):
        GlobalBatches(n, 1, shuffle=False, world=2)


@pytest.mark.slow
def test_self_critical_stage_on_two_processes_resumes_exactly(tiny_recipe, tmp_path: Path) -> None:
    """SCST (sampling in every process, from its own RNG) under DDP: a run killed after a save and
    resumed on two processes ends with the weights of the uninterrupted two-process run."""
    ce = train(
        tiny_recipe(**{"decoder.tuning": "frozen", "train.output_dir": str(tmp_path / "ce")}), progress=False
    )
    scst = {
        "decoder.tuning": "frozen",
        "scst.init_from": str(ce),
        "scst.samples": "3",
        "train.epochs": "1",
        "train.batch_size": "8",
        "train.save_every": "1",
        "train.keep_checkpoints": "5",
    }
    recipe_file = tmp_path / "scst.toml"
    recipe_file.write_text(tiny_recipe(**scst, **{"train.output_dir": str(tmp_path / "two")}).to_toml())
    _launch(recipe_file)
    two = tmp_path / "two"
    rows = [r for r in read_log(two) if "reward" in r]
    assert len(rows) == 3 and all(r["baseline"] >= 0 for r in rows)
    assert _starts(two) == [("start", 2)]
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for ckpt in list_checkpoints(resumed)[-2:]:  # killed after the save of step 1
        shutil.rmtree(ckpt)
    _launch(recipe_file, f"train.output_dir={resumed}", "--resume")
    assert _starts(resumed) == [("start", 2), ("resume", 2)]
    a, b = _weights(two), _weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
