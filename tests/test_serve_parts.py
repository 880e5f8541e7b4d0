"""`vicap serve` without a browser: request handling, scoring against typed references, the command.

These need no Gradio (vicap.serve imports it only to build the page), except where marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicap.cli import app
from vicap.images import ImageError
from vicap.recipe import GenerateConfig
from vicap.serve import (
    caption_batch,
    caption_image,
    check_upload,
    decoding_config,
    load_runs,
    reference_corpus,
)
from vicap.train import train


@pytest.fixture
def served(tiny_recipe):
    """A tiny demo-recipe run, loaded as `vicap serve` loads it."""
    run_dir = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    return load_runs([run_dir])


def test_decoding_controls_are_checked() -> None:
    base = GenerateConfig()
    assert decoding_config(base, "beam", 4, 1.0, 1.0).beam_size == 4
    cfg = decoding_config(base, "sample", 1, 0.7, 0.9)
    assert (cfg.strategy, cfg.temperature, cfg.top_p, cfg.n_best) == ("sample", 0.7, 0.9, 1)
    with pytest.raises(ValueError, match="decoding must be one of greedy, beam, sample"):
        decoding_config(base, "nucleus", 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="beam size must be between 1 and 16"):
        decoding_config(base, "beam", 40, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        decoding_config(base, "sample", 1, 0.0, 1.0)


def test_uploads_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No image"):
        check_upload(None)
    with pytest.raises(ImageError, match="did not arrive"):
        check_upload(tmp_path / "gone.jpg")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 3 * 2**20)
    with pytest.raises(ImageError, match=r"big.jpg: 3.0 MB is over the 2 MB upload limit"):
        check_upload(big, max_bytes=2 * 2**20)
    assert check_upload(big) == big  # under the 20 MB default


def test_typed_reference_scores_with_the_runs_test_references(served, ktvic_dir: Path) -> None:
    (lr,) = served
    assert lr.cider is not None and "document frequencies from 6 images (test)" in lr.cider_note
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    rows, _ = caption_image(served, image, "greedy", 1, 1.0, 1.0, "")
    caption = rows[0][1]
    assert rows[0][2:5] == [None, None, None]  # no reference, no scores
    rows, msg = caption_image(served, image, "greedy", 1, 1.0, 1.0, caption)
    bleu, cider, chrf = rows[0][2:5]
    assert chrf == pytest.approx(1.0) and cider > 0
    if len(caption.split()) >= 4:
        assert bleu == pytest.approx(1.0)
    assert f'against your reference "{caption[:57]}' in msg and "more" not in msg
    # several references, one per line; an unrelated one scores lower
    rows2, msg2 = caption_image(served, image, "greedy", 1, 1.0, 1.0, f"xyz qqq\n{caption}\n")
    assert 'against your reference "xyz qqq" and 1 more' in msg2 and rows2[0][1] == caption
    rows3, _ = caption_image(served, image, "greedy", 1, 1.0, 1.0, "xyz qqq")
    assert rows3[0][3] < cider and rows3[0][4] < chrf


def test_without_a_manifest_cider_is_not_given(served, ktvic_dir: Path) -> None:
    (lr,) = served
    (lr.run.run_dir / "manifest.jsonl").unlink()
    cider, note = reference_corpus(lr.run)
    assert cider is None and note.startswith("not given: no readable manifest")
    lr.cider, lr.cider_note = cider, note
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    rows, msg = caption_image(served, image, "greedy", 1, 1.0, 1.0, "một hình tròn")
    assert rows[0][3] is None and rows[0][2] is not None and rows[0][4] is not None
    assert "not given: no readable manifest.jsonl" in msg and "/" not in msg  # no server paths


def test_batch_reports_bad_files_by_name_and_writes_csv(served, ktvic_dir: Path, tmp_path: Path) -> None:
    good = sorted((ktvic_dir / "public-test-images").iterdir())[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    rows, msg, csv_path = caption_batch(served, [*good, bad, None], "greedy", 1, 1.0, 1.0)
    assert msg.startswith("Captioned 2 of 3 image(s)") and "1 file(s) could not be used" in msg
    assert [r[0] for r in rows] == [good[0].name, good[1].name, "bad.jpg"]
    assert "bad.jpg" in rows[2][4]
    assert Path(csv_path).read_text(encoding="utf-8").splitlines()[0] == "image,run,caption,time (s),error"
    with pytest.raises(ImageError, match="No images"):
        caption_batch(served, [], "greedy", 1, 1.0, 1.0)


def test_serve_command_without_gradio_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    res = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 2  # the command line's code for a user error
    assert 'pip install -e ".[serve]"' in res.output


def test_serve_command_passes_its_options(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    import vicap.serve

    seen = {}
    monkeypatch.setattr(vicap.serve, "serve", lambda run_dirs, **kw: seen.update(run_dirs=run_dirs, **kw))
    res = CliRunner().invoke(
        app, ["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "8123", "--max-upload-mb", "5"]
    )
    assert res.exit_code == 0, res.output
    assert seen == {"run_dirs": [tmp_path], "host": "0.0.0.0", "port": 8123, "max_upload_mb": 5.0}
    # a folder that is not a run: a clear error, exit 2
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output, res.output


def test_page_messages_show_file_names_not_server_paths() -> None:
    from vicap.serve import _page_message

    e = ImageError(
        "/tmp/gradio/ab12/notes.jpg: unreadable image (UnidentifiedImageError: cannot identify image "
        "file '/tmp/gradio/ab12/notes.jpg')"
    )
    assert _page_message(e) == (
        "notes.jpg: unreadable image (UnidentifiedImageError: cannot identify image file 'notes.jpg')"
    )
    for text in (
        "beam size must be between 1 and 16, not 40",
        "see https://huggingface.co/docs/transformers",
        "greedy/beam/sample and 1/2/3",
    ):
        assert _page_message(ValueError(text)) == text  # only upload paths are rewritten


def test_runs_with_one_encoder_share_it_and_encode_an_image_once(tiny_recipe, ktvic_dir: Path) -> None:
    run_dir = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    runs = load_runs([run_dir, run_dir])
    assert [lr.name for lr in runs] == [run_dir.name, f"{run_dir.name} (2)"]
    assert runs[0].encoder is runs[1].encoder
    calls = []
    encode = runs[0].encoder.encode
    runs[0].encoder.encode = lambda pixels: calls.append(1) or encode(pixels)
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    rows, _ = caption_image(runs, image, "greedy", 1, 1.0, 1.0, "")
    assert len(calls) == 1 and rows[0][1] == rows[1][1]  # same run twice: same caption
    caption_batch(runs, [image, image], "greedy", 1, 1.0, 1.0)
    assert len(calls) == 3  # once per image
