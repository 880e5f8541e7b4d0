"""Recipes: every shipped file validates; bad files fail before any model loads, naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicap.cli import app
from vicap.recipe import RecipeError, load_recipe, parse_override, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
# Baseline (CNN+LSTM) recipes have their own schema, validated in tests/test_baseline.py.
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.toml") if not p.name.startswith("baseline_"))
DEMO = REPO / "recipes" / "demo_vi_synthetic.toml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.encoder.model and recipe.decoder.model
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment giving its command and targets"


def test_recipes_exist() -> None:
    assert DEMO in RECIPES


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(DEMO.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-4", "unknown key 'train.lrr' (did you mean 'lr'?)"),
        ("train.lr=-1.0", "train.lr = -1.0: must be > 0"),
        ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
        ("train.epochs=true", "train.epochs: expected an integer, got True"),
        ("encoder.normalize=1", "encoder.normalize: expected true or false"),
        ("decoder.tuning=partial", "decoder.tuning = 'partial': must be one of frozen, full"),
        ("generate.strategy=nucleus", "generate.strategy = 'nucleus': must be one of greedy, beam"),
        ('eval.levels=["syllable", "char"]', "eval.levels = 'char': must be one of syllable, word"),
        ("data.segment=morph", "data.segment = 'morph': must be one of none, word"),
        ("mapper.prefix_length=0", "mapper.prefix_length = 0: must be > 0"),
        ("trian.lr=1", "unknown key 'trian'"),
    ],
)
def test_bad_values_name_file_and_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, [override])
    assert str(err.value).startswith(str(DEMO))
    assert message in str(err.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text(DEMO.read_text(encoding="utf-8").replace("[mapper]\n", "[mapper]\nprefix_lenght = 3\n"))
    with pytest.raises(
        RecipeError, match=r"r\.toml: unknown key 'mapper\.prefix_lenght' \(did you mean 'prefix_length'\?\)"
    ):
        load_recipe(p)


def test_missing_section_and_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text("[encoder]\nmodel = 'RN50'\n")
    with pytest.raises(RecipeError, match=r"missing section\(s\): \[decoder\]"):
        load_recipe(p)
    p.write_text("[encoder\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("decoder.model=gpt2") == (["decoder", "model"], "gpt2")
    assert parse_override("decoder.model=NlpHUST/gpt2-vietnamese") == (
        ["decoder", "model"],
        "NlpHUST/gpt2-vietnamese",
    )
    assert parse_override('eval.levels=["word"]') == (["eval", "levels"], ["word"])
    r = load_recipe(DEMO, ["train.lr=1e-4", "train.epochs=3", "generate.beam_size=2"])
    assert (r.train.lr, r.train.epochs, r.generate.beam_size) == (1e-4, 3, 2)
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(DEMO, ["train.lr"])


def test_round_trip_toml_and_json(tmp_path: Path) -> None:
    r = load_recipe(DEMO, ["train.lr=3e-4", 'eval.levels=["syllable", "word"]'])
    p = tmp_path / "resolved.toml"
    p.write_text(r.to_toml(), encoding="utf-8")
    assert load_recipe(p) == r
    assert recipe_from_dict(r.to_dict()) == r
    assert r.replace(**{"train.seed": 7}).train.seed == 7


def test_recipe_is_frozen() -> None:
    r = load_recipe(DEMO)
    with pytest.raises(AttributeError):
        r.train.lr = 1.0  # type: ignore[misc]


def test_cli_validate() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", *map(str, RECIPES)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("ok ") == len(RECIPES)
    bad = runner.invoke(app, ["validate", str(DEMO), "--set", "train.batch_size=0"])
    assert bad.exit_code == 1
    assert "train.batch_size = 0: must be > 0" in bad.output
