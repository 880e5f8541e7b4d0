"""train.group_by_length: global batches of similar caption lengths, every caption once an epoch.

The grouping only reorders: each run of 50 global batches holds the captions the shuffle put there,
sorted longest first, so padding falls while batches stay random mixtures; processes still take
contiguous slices of the same global batches, and a resume mid-epoch continues the same order.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from vicap.data import GlobalBatches, length_grouped
from vicap.recipe import RecipeError
from vicap.train import read_log, train


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 40, size=n)


def test_grouping_reorders_within_runs_of_the_shuffle() -> None:
    n, batch = 1000, 8
    lengths = _lengths(n)
    g = torch.Generator()
    g.manual_seed(5)
    shuffled = torch.randperm(n, generator=g).tolist()
    grouped = length_grouped(shuffled, lengths, batch, megabatch=10)
    assert sorted(grouped) == list(range(n))  # every caption once
    for i in range(0, n, 80):  # each run: the shuffle's captions, longest first
        run = grouped[i : i + 80]
        assert set(run) == set(shuffled[i : i + 80])
        assert list(lengths[run]) == sorted(lengths[run], reverse=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_batches_cover_the_epoch_split_and_resume(world: int) -> None:
    n, batch = 997, 16
    lengths = _lengths(n, 1)
    shards = []
    for rank in range(world):
        s = GlobalBatches(n, batch, shuffle=True, seed=3, rank=rank, world=world, lengths=lengths)
        s.set_epoch(2)
        shards.append(list(s))
    seen = [i for b in range(len(shards[0])) for s in shards for i in s[b]]
    assert sorted(seen) == list(range(n))  # 997 = 62 x 16 + 5: the tail is kept (5 >= world)
    resumed = GlobalBatches(n, batch, shuffle=True, seed=3, rank=world - 1, world=world, lengths=lengths)
    resumed.set_epoch(2, start=7)
    assert list(resumed) == shards[-1][7:]


def test_grouping_lowers_padding() -> None:
    n, batch = 4000, 32
    lengths = _lengths(n, 2)
    plain = GlobalBatches(n, batch, shuffle=True, seed=0)
    grouped = GlobalBatches(n, batch, shuffle=True, seed=0, lengths=lengths)
    before, after = plain.padding(lengths), grouped.padding(lengths)
    assert 0.3 < before < 0.6 and after < 0.05, (before, after)
    # padding() counts what a batch is padded to: a hand count on one small case
    tiny = GlobalBatches(4, 2, shuffle=False)
    assert tiny.padding(np.array([1, 3, 2, 2])) == pytest.approx(1 - 8 / 10)


def test_training_with_grouping_logs_padding_and_trains(tiny_recipe, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="vicap.train"):
        run = train(
            tiny_recipe(**{"train.group_by_length": "true", "decoder.tuning": "frozen"}), progress=False
        )
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("padding: "))
    grouped, plain = (float(x) for x in re.findall(r"(\d+\.\d)%", line))
    assert grouped < plain
    assert [r["step"] for r in read_log(run) if "loss" in r] == list(range(1, 17))


def test_grouping_needs_captions(tiny_recipe, tmp_path) -> None:
    ce = train(tiny_recipe(**{"train.epochs": "1", "train.output_dir": str(tmp_path / "ce")}), progress=False)
    scst = {
        "scst.init_from": str(ce),
        "train.group_by_length": "true",
        "train.output_dir": str(tmp_path / "s"),
    }
    with pytest.raises(RecipeError, match="train.group_by_length = true"):
        train(tiny_recipe(**scst), progress=False)
