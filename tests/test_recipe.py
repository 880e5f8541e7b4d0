"""Recipes: every shipped recipe validates by name; bad recipes fail before any weights load, naming
file and key; caption lengths that do not fit the LM fail when the model is built, naming the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicap.baseline import recipe as baseline_recipe
from vicap.cli import app
from vicap.recipe import (
    SECTIONS,
    SHIPPED_DIR,
    RecipeError,
    find_recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
    shipped_recipes,
)

SHIPPED = shipped_recipes()
# Baseline (CNN+LSTM) recipes have their own schema, validated in tests/test_baseline.py.
RECIPES = sorted(name for name in SHIPPED if not name.startswith("baseline_"))
DEMO = find_recipe("demo_vi_synthetic")


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.encoder.model and recipe.decoder.model
    first = SHIPPED[name].read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{name} must start with a comment giving its command and targets"


def test_recipes_exist() -> None:
    assert DEMO == SHIPPED_DIR / "demo_vi_synthetic.toml" and "demo_vi_synthetic" in RECIPES
    assert {"vi_ktvic_lora", "en_coco_clipcap_transformer", "baseline_ktvic"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes_do_not_repeat_their_file_name(name: str) -> None:
    """`name` and `train.output_dir` come from the file name; a shipped file writes them only to differ."""
    data = tomllib.loads(SHIPPED[name].read_text(encoding="utf-8"))
    assert data.get("name") != name
    assert data.get("train", {}).get("output_dir") != f"runs/{name}"
    assert data.get("description"), "`vicap list` shows each shipped recipe's description"
    text = SHIPPED[name].read_text(encoding="utf-8")
    assert "recipes/" not in text, "commands name shipped recipes by name, not by a checkout path"


def test_names_and_run_dirs_default_to_the_file_name(tmp_path: Path) -> None:
    r = load_recipe("vi_ktvic_lora")
    assert (r.name, r.train.output_dir) == ("vi_ktvic_lora", "runs/vi_ktvic_lora")
    # the resolved recipe (what a run directory and its checkpoints record) writes both
    assert 'name = "vi_ktvic_lora"' in r.to_toml() and 'output_dir = "runs/vi_ktvic_lora"' in r.to_toml()
    assert load_recipe("demo_vi_synthetic").train.output_dir == "demo_out/runs/demo"  # set in the file
    mine = tmp_path / "my_lora.toml"
    mine.write_bytes(find_recipe("vi_ktvic_lora").read_bytes())
    r = load_recipe(mine, ["train.output_dir=elsewhere"])
    assert (r.name, r.train.output_dir) == ("my_lora", "elsewhere")
    b = baseline_recipe.load_baseline_recipe("baseline_ktvic")
    assert (b.name, b.train.output_dir) == ("baseline_ktvic", "runs/baseline_ktvic")


@pytest.mark.parametrize(
    ("case", "spec", "expected"),
    [
        ("shipped name", "vi_ktvic_lora", SHIPPED_DIR / "vi_ktvic_lora.toml"),
        ("shipped name with .toml", "vi_ktvic_lora.toml", SHIPPED_DIR / "vi_ktvic_lora.toml"),
        ("an existing file wins", "local/vi_ktvic_lora.toml", Path("local/vi_ktvic_lora.toml")),
        ("an existing file in cwd wins", "vi_uitviic_lora.toml", Path("vi_uitviic_lora.toml")),
        ("typo", "vi_ktvic_lorra", "no shipped recipe of that name (did you mean 'vi_ktvic_lora'"),
        ("unknown", "zzz", "zzz: no such recipe file, and no shipped recipe of that name; `vicap list`"),
        (
            "old checkout path",
            "recipes/vi_ktvic_lora.toml",
            "recipes/vi_ktvic_lora.toml: recipe file not found; did you mean the shipped recipe 'vi_ktvic_lora'",
        ),
        ("missing file", "some/where.toml", "some/where.toml: recipe file not found"),
        ("a folder", "local", "local: a folder, not a recipe file"),
    ],
)
def test_find_recipe(tmp_path: Path, monkeypatch, case: str, spec: str, expected: Path | str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "vi_ktvic_lora.toml").write_text("# mine\n")
    (tmp_path / "vi_uitviic_lora.toml").write_text("# mine\n")
    if isinstance(expected, Path):
        assert find_recipe(spec) == expected
    else:
        with pytest.raises(RecipeError) as e:
            find_recipe(spec)
        assert expected in str(e.value)


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("unknown key", ["train.lrr=1e-4"], "unknown key 'train.lrr' (did you mean 'lr'?)"),
        ("negative lr", ["train.lr=-1.0"], "train.lr = -1.0: must be > 0"),
        ("float for int", ["train.epochs=2.5"], "train.epochs: expected an integer, got 2.5"),
        ("bool for int", ["train.epochs=true"], "train.epochs: expected an integer, got True"),
        ("int for bool", ["encoder.normalize=1"], "encoder.normalize: expected true or false"),
        ("bad choice", ["decoder.tuning=partial"], "decoder.tuning = 'partial': must be one of frozen, full"),
        (
            "bad strategy",
            ["generate.strategy=nucleus"],
            "generate.strategy = 'nucleus': must be one of greedy",
        ),
        ("bad level", ['eval.levels=["syllable", "char"]'], "eval.levels = 'char': must be one of syllable"),
        ("bad segment", ["data.segment=morph"], "data.segment = 'morph': must be one of none, word"),
        ("zero prefix", ["mapper.prefix_length=0"], "mapper.prefix_length = 0: must be > 0"),
        (
            "gguf_file not .gguf",
            ["decoder.gguf_file=model.bin"],
            "decoder.gguf_file = 'model.bin': must name a .gguf file inside the folder decoder.model names",
        ),
        (
            "two GGUF files",
            ["decoder.model=a.gguf", "decoder.gguf_file=b.gguf"],
            "decoder.gguf_file = 'b.gguf': decoder.model = 'a.gguf' names a GGUF file already",
        ),
        ("unknown section", ["trian.lr=1"], "unknown key 'trian'"),
        # seeds: numpy (seeded by Accelerate's set_seed) takes 0 .. 2**32 - 1
        ("negative seed", ["train.seed=-1"], "train.seed = -1: must be in [0, 2**32 - 1 = 4294967295]"),
        ("seed too large", ["train.seed=4294967296"], "train.seed = 4294967296: must be in [0, 2**32 - 1"),
        ("negative sampling seed", ["generate.seed=-5"], "generate.seed = -5: must be in [0, 2**32 - 1"),
        # non-finite floats (TOML has inf and nan): one check in the parser for every float field
        ("inf lr", ["train.lr=inf"], "train.lr = inf: must be a finite number"),
        ("nan lr", ["train.lr=nan"], "train.lr = nan: must be a finite number"),
        ("-inf dropout", ["mapper.dropout=-inf"], "mapper.dropout = -inf: must be a finite number"),
        # registry names, checked without loading any weights
        (
            "unknown mapper",
            ["mapper.type=mpl"],
            "mapper.type = 'mpl': must be one of attention, mlp, transformer",
        ),
        (
            "unknown encoder",
            ["encoder.name=openclip"],
            "encoder.name = 'openclip': must be one of hf_clip, hf_vision, open_clip, timm",
        ),
        (
            "unknown adapter",
            ["data.adapter=ktvik"],
            "data.adapter = 'ktvik': must be one of manifest, coco, flickr8k",
        ),
        ("language name", ["data.language=Vietnamese"], "data.language = 'Vietnamese': not a language code"),
        (
            "regional code of a registered language",
            ["data.language=vi-VN"],
            "data.language = 'vi-VN': would get the generic fallback, not the rules registered for 'vi'; write 'vi'",
        ),
        # encoder.pretrained where the model carries its own weights
        (
            "pretrained with a local folder",
            ["encoder.model=local-dir:/models/clip", "encoder.pretrained=/tmp/other.pth"],
            "encoder.pretrained = '/tmp/other.pth': encoder.model = 'local-dir:/models/clip' carries its own",
        ),
        (
            "pretrained with a hub repo",
            ["encoder.model=hf-hub:org/clip", "encoder.pretrained=laion2b_s34b_b79k"],
            "encoder.pretrained = 'laion2b_s34b_b79k': encoder.model = 'hf-hub:org/clip' carries its own",
        ),
        (
            "pretrained with hf_clip",
            ["encoder.name=hf_clip", "encoder.model=openai/clip-vit-base-patch32", "encoder.pretrained=x.pt"],
            "encoder.pretrained = 'x.pt': hf_clip models carry their own weights",
        ),
        (
            "pretrained with hf_vision",
            ["encoder.name=hf_vision", "encoder.model=facebook/dinov2-small", "encoder.pretrained=x.pt"],
            "encoder.pretrained = 'x.pt': hf_vision models carry their own weights",
        ),
        (
            "timm model name without a weights file",
            ["encoder.name=timm", "encoder.model=efficientnet_lite0"],
            "encoder.pretrained = '': timm model 'efficientnet_lite0' needs its weights as a local file",
        ),
        (
            "timm weights that are no weights file",
            ["encoder.name=timm", "encoder.model=efficientnet_lite0", "encoder.pretrained=w.npz"],
            "encoder.pretrained = 'w.npz': timm model 'efficientnet_lite0' needs its weights as a local file",
        ),
        (
            "pretrained with a timm folder",
            ["encoder.name=timm", "encoder.model=local-dir:/models/effnet", "encoder.pretrained=w.pth"],
            "encoder.pretrained = 'w.pth': encoder.model = 'local-dir:/models/effnet' carries its own weights",
        ),
        # [generate] keys the chosen strategy does not read (the demo recipe decodes with beam)
        (
            "sampling keys under beam",
            ["generate.temperature=50.0"],
            "generate.temperature = 50.0: only strategy 'sample' uses it, and this recipe decodes with 'beam'",
        ),
        (
            "beam keys set with greedy",
            ["generate.strategy=greedy", "generate.beam_size=8"],
            "generate.beam_size = 8: only strategy 'beam' uses it, and this recipe decodes with 'greedy'",
        ),
        (
            "length penalty set with sample",
            ["generate.strategy=sample", "generate.length_penalty=5.0"],
            "generate.length_penalty = 5.0: only strategy 'beam' uses it",
        ),
        (
            "top_p set with greedy",
            ["generate.strategy=greedy", "generate.top_p=0.01"],
            "generate.top_p = 0.01: only strategy 'sample' uses it",
        ),
        (
            "word segments for a language without a segmenter",
            ["data.language=fr", "data.segment=word"],
            "data.segment = 'word': language 'fr' has no 'word' segmenter (modes: none, char)",
        ),
    ],
)
def test_bad_values_name_file_and_key(case: str, overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("demo_vi_synthetic", overrides)
    assert str(err.value).startswith(str(DEMO))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # the file's beam_size = 3 belongs to its beam strategy: switching strategy drops it
        (["generate.strategy=greedy"], {"strategy": "greedy", "beam_size": 5}),
        (
            ["generate.strategy=sample", "generate.top_k=20"],
            {"strategy": "sample", "top_k": 20, "beam_size": 5},
        ),
        (["generate.beam_size=4"], {"strategy": "beam", "beam_size": 4}),
        (["generate.strategy=beam", "generate.beam_size=2"], {"strategy": "beam", "beam_size": 2}),
    ],
)
def test_switching_strategy_drops_the_recipes_keys_of_the_old_one(overrides, expected) -> None:
    assert load_recipe(DEMO).generate.beam_size == 3
    gen = load_recipe(DEMO, overrides).generate
    assert {k: getattr(gen, k) for k in expected} == expected


def test_close_registry_names_are_suggested() -> None:
    with pytest.raises(RecipeError, match=r"\(did you mean 'mlp'\?\)"):
        load_recipe(DEMO, ["mapper.type=mpl"])


@pytest.mark.parametrize("code", ["en", "vi", "generic", "th", "pt-BR", "zh_Hant"])
def test_language_codes_registered_or_generic(code: str) -> None:
    assert load_recipe(DEMO, [f"data.language={code}"]).data.language == code


def _float_keys(sections: dict[str, type]) -> list[str]:
    return [
        f"{name}.{f.name}"
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if f.type in (float, "float")
    ]


@pytest.mark.parametrize("key", _float_keys(SECTIONS))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_rejects_non_finite_values(key: str, value: str) -> None:
    with pytest.raises(RecipeError, match=rf"{key} = {value}: must be a finite number"):
        load_recipe(DEMO, [f"{key}={value}"])


@pytest.mark.parametrize("key", _float_keys(baseline_recipe.SECTIONS))
def test_every_baseline_float_rejects_non_finite_values(key: str) -> None:
    with pytest.raises(RecipeError, match=rf"{key} = inf: must be a finite number"):
        baseline_recipe.load_baseline_recipe("baseline_demo_vi_synthetic", [f"{key}=inf"])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text(DEMO.read_text(encoding="utf-8").replace("[mapper]\n", "[mapper]\nprefix_lenght = 3\n"))
    with pytest.raises(
        RecipeError, match=r"r\.toml: unknown key 'mapper\.prefix_lenght' \(did you mean 'prefix_length'\?\)"
    ):
        load_recipe(p)


@pytest.mark.parametrize(
    ("case", "content", "message"),
    [
        (
            "not UTF-8",
            "description = 'caf\xe9'\n".encode("latin-1"),
            "not UTF-8 text (byte 0xe9 at offset 18)",
        ),
        ("bad TOML", b"[encoder\n", "not valid TOML"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path: Path, case: str, content: bytes, message: str) -> None:
    p = tmp_path / "r.toml"
    p.write_bytes(content)
    for load in (load_recipe, baseline_recipe.load_baseline_recipe):
        with pytest.raises(RecipeError) as e:
            load(p)
        assert str(e.value).startswith(f"{p}: {message}")
    assert not baseline_recipe.is_baseline_recipe(p)  # so `vicap validate` reports it as above


def test_missing_sections(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text("[encoder]\nmodel = 'RN50'\n")
    with pytest.raises(RecipeError, match=r"missing section\(s\): \[decoder\]"):
        load_recipe(p)


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


# --------------------------------------------------------------------------- the LM's positions


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        # the tiny GPT-2 has 64 learned positions; the tiny recipe's prefix takes 2 of them
        ("training captions", {"data.max_tokens": "63"}, "data.max_tokens = 63: the prefix (2) + start"),
        (
            "generated captions",
            {"generate.max_new_tokens": "200", "generate.min_new_tokens": "200"},
            "generate.max_new_tokens = 200: the prefix (2) + start tokens (0) + 200 caption tokens need 202 "
            "positions, but the LM",
        ),
        ("prefix alone", {"mapper.prefix_length": "64"}, "lower mapper.prefix_length"),
        ("fits exactly", {"data.max_tokens": "62", "generate.max_new_tokens": "62"}, None),
    ],
)
def test_lengths_beyond_the_lm_positions(
    tiny_recipe, case: str, overrides: dict, message: str | None
) -> None:
    from vicap.decoders import load_decoder
    from vicap.model import CaptionModel

    recipe = tiny_recipe(**overrides)
    decoder = load_decoder(recipe.decoder)
    if message is None:
        CaptionModel.from_recipe(recipe, 24, decoder)
        return
    with pytest.raises(RecipeError) as e:
        CaptionModel.from_recipe(recipe, 24, decoder)
    assert message in str(e.value) and "has 64 positions" in str(e.value)


@pytest.mark.parametrize(
    ("sets", "code", "message"),
    [
        ([], 0, "lengths fit the LM's 64 positions"),
        (
            ["generate.max_new_tokens=200"],
            1,
            "generate.max_new_tokens = 200: the prefix (2) + start tokens (0)",
        ),
        (["data.max_tokens=63"], 1, "data.max_tokens = 63: the prefix (2)"),
        (["decoder.model=gpt2-not-downloaded"], 0, "lengths not checked (the LM: not on this machine)"),
        (["decoder.model={tmp}/lm.gguf"], 0, "lengths not checked (the LM: a GGUF file)"),
        (["decoder.model={tmp}/missing"], 0, "lengths not checked (the LM: decoder.model = "),
    ],
)
def test_validate_checks_lengths_against_the_lm_without_its_weights(
    tmp_path, ktvic_dir, tiny_lm_dir, tiny_clip_dir, sets, code, message
) -> None:
    from tests.conftest import tiny_recipe_overrides

    overrides = tiny_recipe_overrides(tmp_path, ktvic_dir, tiny_lm_dir, tiny_clip_dir)
    weights = next(tiny_lm_dir.glob("*.safetensors"))
    weights.rename(weights.with_suffix(".away"))  # no weights: validate reads config and tokenizer only
    try:
        (tmp_path / "lm.gguf").write_bytes(b"GGUF")
        args = [a for o in [*overrides, *sets] for a in ("--set", o.format(tmp=tmp_path))]
        res = CliRunner().invoke(app, ["validate", "demo_vi_synthetic", *args])
    finally:
        weights.with_suffix(".away").rename(weights)
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output


def test_generation_checks_its_own_settings(tiny_recipe) -> None:
    """Settings handed to generation directly (the web page, notebooks) are checked before decoding."""
    import torch

    from vicap.decoders import load_decoder
    from vicap.generate import generate_captions
    from vicap.model import CaptionModel

    recipe = tiny_recipe()
    model = CaptionModel.from_recipe(recipe, 24, load_decoder(recipe.decoder))
    cfg = dataclasses.replace(recipe.generate, max_new_tokens=63)
    with pytest.raises(
        RecipeError, match="generate.max_new_tokens = 63: .* set generate.max_new_tokens to at most 62"
    ):
        generate_captions(model, torch.zeros(1, 24), cfg, language="vi")


def test_rotary_lms_have_no_hard_limit(tmp_path: Path) -> None:
    from tests.conftest import save_tiny_llama
    from vicap.decoders import load_decoder
    from vicap.model import CaptionModel, position_limit
    from vicap.recipe import DecoderConfig, MapperConfig

    decoder = load_decoder(DecoderConfig(model=str(save_tiny_llama(tmp_path / "llama", ["a b c"]))))
    assert position_limit(decoder.lm) is None  # max_position_embeddings = 128, but rotary
    CaptionModel(MapperConfig(prefix_length=2), 24, decoder, "frozen").check_length("data.max_tokens", 1000)


# --------------------------------------------------------------------------- the CLI


def test_cli_validate_and_list() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", *SHIPPED])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("ok ") == len(SHIPPED)
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0, listing.output
    for name, path in SHIPPED.items():
        description = tomllib.loads(path.read_text(encoding="utf-8"))["description"]
        assert f"  {name} " in listing.output and description in listing.output


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "latin1.toml").write_bytes(
        DEMO.read_text(encoding="utf-8").replace("description = ", "description = 'café' #").encode("latin-1")
    )
    return tmp_path


@pytest.mark.parametrize(
    ("case", "args", "code", "message"),
    [
        (
            "validate: not UTF-8",
            ["validate", "{tmp}/latin1.toml"],
            1,
            "latin1.toml: not UTF-8 text (byte 0xe9",
        ),
        ("train: not UTF-8", ["train", "{tmp}/latin1.toml"], 2, "latin1.toml: not UTF-8 text (byte 0xe9"),
        ("validate: seed", ["validate", "demo_vi_synthetic", "--set", "train.seed=-1"], 1, "train.seed = -1"),
        ("train: seed", ["train", "demo_vi_synthetic", "train.seed=-1"], 2, "train.seed = -1: must be in"),
        (
            "validate: inf",
            ["validate", "vi_ktvic_lora", "--set", "train.lr=inf"],
            1,
            "train.lr = inf: must be",
        ),
        (
            "validate: mapper",
            ["validate", "vi_ktvic_lora", "--set", "mapper.type=mpl"],
            1,
            "mapper.type = 'mpl'",
        ),
        (
            "validate: sampling under beam",
            ["validate", "demo_vi_synthetic", "--set", "generate.top_k=2"],
            1,
            "generate.top_k = 2: only strategy 'sample' uses it",
        ),
        ("features: mapper", ["features", "vi_ktvic_lora", "mapper.type=mpl"], 2, "mapper.type = 'mpl'"),
        ("train: encoder", ["train", "vi_ktvic_lora", "encoder.name=clip"], 2, "encoder.name = 'clip'"),
        ("validate: unknown name", ["validate", "vi_ktvic_lorra"], 1, "did you mean 'vi_ktvic_lora'"),
        ("train: unknown name", ["train", "vi_ktvic_lorra"], 2, "no shipped recipe of that name"),
        ("baseline train: name", ["baseline", "train", "baseline_ktvc"], 2, "did you mean 'baseline_ktvic'"),
        (
            "baseline train: sampling",
            ["baseline", "train", "baseline_ktvic", "--set", "generate.strategy=sample"],
            2,
            "generate.strategy = 'sample': the baseline decodes with greedy or beam search only",
        ),
        ("demo: recipe", ["demo", "--out", "{tmp}/demo", "--recipe", "nope"], 2, "nope: no such recipe file"),
    ],
)
def test_cli_bad_recipes(bad_files: Path, case: str, args: list[str], code: int, message: str) -> None:
    res = CliRunner().invoke(app, [a.replace("{tmp}", str(bad_files)) for a in args])
    assert res.exit_code == code, res.output
    assert message in res.stderr and "error: " in res.stderr
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (bad_files / "demo").exists()  # nothing was built for a recipe that does not load
