"""The layers of the code base: lower layers never import higher ones.

data_prep (languages, adapters, manifests) knows nothing of vicap; vicap.metrics sits below the
pipeline (evaluation, generation, serving and training call it, never the other way round); the
stores and formats (recipe, checkpoint, features, errors) never import the training loop, the CLI or
the web page.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package or module -> what it must not import (a name and everything under it)
LAYERS = {
    "data_prep": ("vicap",),
    "vicap.metrics": ("vicap.evaluate", "vicap.generate", "vicap.serve", "vicap.train"),
    "vicap.errors": ("vicap.recipe", "vicap.train", "vicap.cli", "torch"),
    "vicap.recipe": ("vicap.train", "vicap.cli", "vicap.serve", "vicap.evaluate"),
    "vicap.checkpoint": ("vicap.train", "vicap.cli", "vicap.serve", "vicap.evaluate"),
    "vicap.features": ("vicap.train", "vicap.cli", "vicap.serve", "vicap.evaluate"),
}


def imports_of(source: str, package: str, forbidden: tuple[str, ...]) -> set[str]:
    """The names in `forbidden` that `source` (a module of `package`) imports, in any form, anywhere."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .. import evaluate
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {m for m in forbidden for n in names if n == m or n.startswith(m + ".")}
    return found


UPWARD = LAYERS["vicap.metrics"]


@pytest.mark.parametrize(
    ("case", "source", "expected"),
    [
        ("from-import", "from vicap.evaluate import score", {"vicap.evaluate"}),
        ("plain import", "import vicap.generate", {"vicap.generate"}),
        ("module from package", "from vicap import serve", {"vicap.serve"}),
        ("relative", "from .. import train", {"vicap.train"}),
        ("inside a function", "def f():\n    from vicap.evaluate import x\n", {"vicap.evaluate"}),
        ("downward is fine", "from vicap.metrics.cider import CiderD\nimport data_prep.languages", set()),
        ("a longer name is another module", "import vicap.trainer_utils", set()),
    ],
)
def test_imports_of_finds_every_form(case: str, source: str, expected: set[str]) -> None:
    assert imports_of(source, "vicap.metrics", UPWARD) == expected, case


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_import_runs_up_the_layers(layer: str) -> None:
    path = REPO.joinpath(*layer.split("."))
    modules = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    assert modules and all(p.is_file() for p in modules)
    found = {}
    for p in modules:
        package = ".".join(p.relative_to(REPO).with_suffix("").parts[:-1])
        hits = imports_of(p.read_text(encoding="utf-8"), package, LAYERS[layer])
        if hits:
            found[str(p.relative_to(REPO))] = hits
    assert found == {}
