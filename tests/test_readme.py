"""The README's two set-up commands stay what CI and newcomers actually run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_two_setup_commands() -> None:
    demo, tests = setup_commands()
    assert demo.endswith("vicap demo")
    assert "torch==2.13.0" in demo and "torch==2.13.0" in tests
    assert tests.endswith("pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = setup_commands()
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
