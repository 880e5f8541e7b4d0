"""bench/quality.py's command line: --set / --compare overrides are checked by the recipe's own validation
before anything is built, and the side-by-side table of a plain and an option row (tiny fake reports)."""

from __future__ import annotations

import sys

import pytest

from bench import quality


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.group_by_imag=true"], "--set: "),
        (["--set", "train.lr=-1"], "train.lr"),
        (["--compare", "train.mixed_precision=bf17"], "--compare: "),
        (["--compare", "nonsense"], "must look like section.key=value"),
        (["--set", "train.lr=1e-3", "--compare", "encoder.nope=1"], "encoder.nope"),
        (["--set", "train.seed=5"], "train.seed is set by the bench"),
        (["--compare", "train.output_dir=/tmp/x"], "train.output_dir is set by the bench"),
        (["--set", "data.source=/tmp/x"], "data.source is set by the bench"),
    ],
)
def test_bad_override_is_an_error_before_anything_runs(monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        quality.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing built


def _row(scores: list[float], overrides: list[str]) -> dict:
    reports = [{"scores": {"syllable": {"vicap": {"CIDEr-D": x}}}} for x in scores]
    timings = {f"seed {i}": {"train": 10.0 + i} for i in range(len(scores))}
    return {"overrides": overrides, "reports": reports, "timings": timings}


@pytest.mark.parametrize(
    ("option", "inside"),
    [
        ([1.00, 1.05, 1.10], "yes"),  # mean 1.05 within [1.0, 1.2]
        ([0.90, 0.95, 0.91], "NO"),  # mean 0.92 below the plain seeds' lowest
    ],
)
def test_compare_table(option, inside):
    plain = _row([1.0, 1.1, 1.2], ["train.epochs=1"])
    text = quality.compare_table(
        [0, 1, 2], plain, _row(option, ["train.epochs=1", "train.group_by_image=true"])
    )
    assert "| plain | 1.000 | 1.100 | 1.200 | 1.100 ± 0.100 | 11.0 |" in text
    assert "| train.group_by_image=true | " in text  # the option row is named by its own overrides
    assert f"option mean within the plain seeds' spread [1.000, 1.200]: {inside}" in text
