"""GGUF decoders (vicap.gguf_files): tiny GGUF files written here with the gguf package's GGUFWriter, a
Llama laid out as SmolLM2's files are (byte-level BPE, Q8_0 blocks) and a Gemma 3 as Gemma's are
(SentencePiece vocabulary, BOS added, scaled embeddings), loaded through `load_decoder`, trained and
captioned; converted once into vicap's cache; and the files vicap cannot use, refused by name."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests import builders
from tests.conftest import as_sets, tiny_recipe_overrides
from vicap import gguf_files
from vicap.cli import app
from vicap.decoders import load_decoder
from vicap.errors import ModelLoadError
from vicap.evaluate import evaluate_run
from vicap.recipe import DecoderConfig
from vicap.runs import load_run
from vicap.train import read_log, train

BUILDERS = {"llama": builders.build_gguf_llama, "gemma3": builders.build_gguf_gemma3}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, ktvic_dir: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (the .gguf file, the transformers model it was written from)."""
    root = tmp_path_factory.mktemp("gguf")
    texts = builders.ktvic_captions(ktvic_dir)
    return {name: build(root / f"tiny-{name}.gguf", texts) for name, build in BUILDERS.items()}


# (file, LM class, eos, prompt ids, max |logit difference| from the model it was written from)
LOADED = [
    ("llama", "LlamaForCausalLM", 0, [], 0.05),  # Q8_0 blocks: close, not equal
    ("gemma3", "Gemma3ForCausalLM", 1, [2], 1e-5),  # float32: the same model
]


@pytest.mark.parametrize(("name", "cls", "eos", "prompt", "tolerance"), LOADED)
def test_a_gguf_file_loads_as_the_model_it_was_written_from(
    ggufs, ktvic_dir: Path, name, cls, eos, prompt, tolerance
) -> None:
    path, original = ggufs[name]
    dec = load_decoder(DecoderConfig(model=str(path)))
    assert type(dec.lm).__name__ == cls
    assert (dec.eos_token_id, dec.prompt_ids, dec.hidden_size) == (eos, prompt, 32)
    caption = builders.ktvic_captions(ktvic_dir)[0]
    ids = dec.tokenizer(caption)["input_ids"]
    assert dec.tokenizer.decode(ids, skip_special_tokens=True) == caption
    batch = torch.tensor([ids])
    with torch.no_grad():
        diff = (dec.lm(batch).logits - original(batch).logits).abs().max()
    assert diff < tolerance


def test_a_gguf_file_is_converted_once_into_the_cache(ggufs, tmp_path: Path, caplog, monkeypatch) -> None:
    path, _ = ggufs["gemma3"]
    monkeypatch.setenv("VICAP_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="vicap.gguf_files"):
        first = load_decoder(DecoderConfig(model=str(path)))
    folders = sorted((tmp_path / "cache" / "gguf").iterdir())
    assert [f.name[16:] for f in folders] == ["-float32"]  # 16 hex digits of the file's sha256
    assert {"config.json", "model.safetensors", "tokenizer.json", "vicap_gguf.json"} <= {
        p.name for p in folders[0].iterdir()
    }
    source = json.loads((folders[0] / "vicap_gguf.json").read_text())
    assert (source["architecture"], source["dtype"], source["sha256"][:16]) == (
        "gemma3",
        "float32",
        folders[0].name[:16],
    )
    assert "converting GGUF file" in caplog.text and str(folders[0]) in caplog.text

    # later loads read the folder: the GGUF reader is never called again, even for a copy elsewhere
    caplog.clear()
    monkeypatch.setattr(gguf_files, "check_gguf", lambda ref: pytest.fail("read the GGUF file again"))
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    with caplog.at_level(logging.INFO, logger="vicap.gguf_files"):
        again = load_decoder(DecoderConfig(model=str(copy)))
    assert "already converted" in caplog.text and "converting" not in caplog.text
    for a, b in zip(first.lm.parameters(), again.lm.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.undo()

    # another dtype is another conversion
    monkeypatch.setenv("VICAP_CACHE", str(tmp_path / "cache"))
    bf16 = load_decoder(DecoderConfig(model=str(path), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.lm.parameters())
    assert sorted(f.name[16:] for f in (tmp_path / "cache" / "gguf").iterdir()) == ["-bfloat16", "-float32"]


def test_a_conversion_that_fails_leaves_nothing_in_the_cache(ggufs, tmp_path: Path, monkeypatch) -> None:
    from transformers import PreTrainedTokenizerBase

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("VICAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(Exception, match="No space left"):
        load_decoder(DecoderConfig(model=str(ggufs["gemma3"][0])))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the model written before it is gone too


def test_a_folder_and_decoder_gguf_file_name_the_same_file(ggufs) -> None:
    path, _ = ggufs["llama"]
    by_file = load_decoder(DecoderConfig(model=str(path)))
    in_folder = load_decoder(DecoderConfig(model=str(path.parent), gguf_file=path.name))
    for a, b in zip(by_file.lm.parameters(), in_folder.lm.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("name", "tuning"), [("llama", "frozen"), ("gemma3", "lora")])
def test_a_gguf_decoder_trains_and_captions(ggufs, tiny_recipe, name: str, tuning: str) -> None:
    path, _ = ggufs[name]
    recipe = tiny_recipe(
        **{"decoder.model": str(path), "decoder.tuning": tuning, "train.epochs": "2", "train.lr": "5e-3"}
    )
    run = train(recipe, progress=False)
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert len(losses) == 16 and losses[-1] < losses[0]
    assert load_run(run).recipe.decoder.model == str(path)
    report = evaluate_run(run, ["generate.strategy=beam"], progress=False)
    assert report["images"] == 6
    assert not any(t in e["caption"] for e in report["examples"] for t in ("<bos>", "<eos>", "<|endoftext|>"))


def _write_bert(tmp: Path) -> Path:
    """A GGUF file of an architecture transformers does not read from GGUF as a causal LM."""
    import gguf

    writer = gguf.GGUFWriter(tmp / "bert.gguf", "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp / "bert.gguf"


def _truncated(tmp: Path, ggufs) -> Path:
    data = ggufs["llama"][0].read_bytes()
    (tmp / "cut.gguf").write_bytes(data[: len(data) // 2])
    return tmp / "cut.gguf"


# (case, (tmp, ggufs) -> (decoder.model, decoder.gguf_file), what the error says)
BAD = [
    (
        "no such file",
        lambda t, g: (str(t / "none.gguf"), ""),
        "GGUF file not found (looked for {tmp}/none.gguf)",
    ),
    ("a folder named .gguf", lambda t, g: (str(t / "adir.gguf"), ""), "GGUF is a folder, not a file"),
    (
        "not in the folder",
        lambda t, g: (str(t), "none.gguf"),
        "with decoder.gguf_file = 'none.gguf': GGUF file not found (looked for {tmp}/none.gguf)",
    ),
    (
        "gguf_file with a hub id",
        lambda t, g: ("org/repo", "m.gguf"),
        "decoder.gguf_file = 'm.gguf' needs decoder.model to be a local folder",
    ),
    (
        "not GGUF",
        lambda t, g: (str(t / "zip.gguf"), ""),
        "zip.gguf is not a GGUF file (it starts with b'PK\\x03\\x04'",
    ),
    ("empty", lambda t, g: (str(t / "empty.gguf"), ""), "empty.gguf is not a GGUF file (it starts with b''"),
    (
        "truncated",
        lambda t, g: (str(_truncated(t, g)), ""),
        "cut.gguf could not be read as GGUF (truncated or damaged?)",
    ),
    (
        "unsupported architecture",
        lambda t, g: (str(_write_bert(t)), ""),
        "holds a 'bert' model, which transformers cannot read from GGUF as a causal LM; it reads ",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD)
def test_files_vicap_cannot_use_are_refused_by_name(ggufs, tmp_path: Path, case, make, message) -> None:
    (tmp_path / "adir.gguf").mkdir()
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04 a zip file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    model, gguf_file = make(tmp_path, ggufs)
    with pytest.raises(ModelLoadError) as e:
        load_decoder(DecoderConfig(model=model, gguf_file=gguf_file))
    assert message.format(tmp=tmp_path) in str(e.value)
    if case == "unsupported architecture":
        assert "gemma3" in str(e.value) and "llama" in str(e.value) and "t5" not in str(e.value)


def test_without_the_gguf_package_the_error_says_how_to_install_it(ggufs, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VICAP_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    path, _ = ggufs["llama"]
    with pytest.raises(
        ModelLoadError, match=r"needs the gguf package; install it with `pip install 'vicap\[gguf\]'`"
    ):
        load_decoder(DecoderConfig(model=str(path)))


def test_cli_names_the_file_it_cannot_use(tmp_path: Path, ktvic_dir: Path, tiny_clip_dir: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    overrides = tiny_recipe_overrides(tmp_path, ktvic_dir, bad, tiny_clip_dir)
    res = CliRunner().invoke(app, ["train", "demo_vi_synthetic", *as_sets(overrides)])
    assert res.exit_code == 2, res.output
    assert f"error: decoder.model = '{bad}': {bad} is not a GGUF file" in res.stderr
    assert "Traceback" not in res.output
