"""An installed wheel, not the checkout: shipped recipes are package data and resolve by name.

The wheel is built from a copy of the source, installed into a fresh virtual environment that reuses
this environment's third-party packages (a .pth line naming their folder, so nothing is downloaded),
and run from an empty folder with no PYTHONPATH, so the checkout cannot be imported by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from vicap.recipe import shipped_recipes

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vicap", "data_prep")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_wheel_installs_and_runs_shipped_recipes_by_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    src, dist, target, elsewhere = (tmp_path / d for d in ("src", "dist", "venv", "elsewhere"))
    src.mkdir()  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("vicap-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vicap/recipes/")}
    assert packaged == {f"vicap/recipes/{p.name}" for p in shipped_recipes().values()}

    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
        ).stdout.strip()
    )
    # torch, transformers, ...: this environment's, after the new environment's own packages on sys.path
    (site / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp_path, env)

    elsewhere.mkdir()
    where = _run(
        [str(python), "-c", "import vicap, data_prep; print(vicap.__file__, data_prep.__file__)"],
        elsewhere,
        env,
    )
    for module_file in where.stdout.split():
        assert Path(module_file).is_relative_to(target), where.stdout
    vicap_cmd = str(target / "bin" / "vicap")
    names = sorted(shipped_recipes())
    res = _run([vicap_cmd, "validate", *names], elsewhere, env)
    assert [line.split()[:2] for line in res.stdout.splitlines()] == [["ok", n] for n in names]
    listing = _run([vicap_cmd, "list"], elsewhere, env).stdout
    assert str(target) in listing and all(f"  {n} " in listing for n in names)
    assert "--recipe" in _run([vicap_cmd, "demo", "--help"], elsewhere, env).stdout
    demo = _run(
        [str(python), "-c", "from vicap.demo import demo_recipe_path; print(demo_recipe_path())"],
        elsewhere,
        env,
    )
    assert Path(demo.stdout.strip()).is_relative_to(target)  # what `vicap demo` trains with
    assert not list(elsewhere.iterdir())  # validating wrote nothing
