"""`vicap serve` without a browser: request handling, scoring against typed references, the command.

These need no Gradio (vicap.serve imports it only to build the page), except where marked.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicap.cli import app
from vicap.images import ImageError
from vicap.recipe import GenerateConfig
from vicap.serve import (
    Limits,
    RequestError,
    caption_batch,
    caption_image,
    check_upload,
    decoding_config,
    load_runs,
    read_references,
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
    # the page always sends every control; only the chosen strategy's are set, the run's values of
    # another strategy's keys go back to their defaults (as --set generate.strategy=... does)
    run = GenerateConfig(strategy="beam", beam_size=3, length_penalty=0.7)
    greedy = decoding_config(run, "greedy", 8, 0.5, 0.5)
    assert (greedy.beam_size, greedy.length_penalty, greedy.temperature, greedy.top_p) == (5, 1.0, 1.0, 1.0)
    beam = decoding_config(run, "beam", 4, 0.5, 0.5)
    assert (beam.beam_size, beam.length_penalty, beam.temperature) == (4, 0.7, 1.0)


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
    out = tmp_path / "cache"
    out.mkdir()
    rows, msg, csv_path = caption_batch(served, [*good, bad, None], "greedy", 1, 1.0, 1.0, csv_dir=out)
    assert msg.startswith("Captioned 2 of 3 image(s)") and "1 file(s) could not be used" in msg
    assert [r[0] for r in rows] == [good[0].name, good[1].name, "bad.jpg"]
    assert "bad.jpg" in rows[2][4]
    assert list(out.iterdir()) == [Path(csv_path)]  # one file, no folder
    assert Path(csv_path).read_text(encoding="utf-8").splitlines()[0] == "image,run,caption,time (s),error"
    # a refused request leaves nothing: its checks come before any file is written
    with pytest.raises(RequestError, match="beam size"):
        caption_batch(served, good, "beam", 40, 1.0, 1.0, csv_dir=out)
    assert list(out.iterdir()) == [Path(csv_path)]


BATCH_REFUSALS = [
    # (case, number of files, files per batch allowed, expected error)
    ("no files", 0, 3, r"No images: upload one or more photos first"),
    (
        "one over the limit",
        4,
        3,
        r"4 images is over this server's limit of 3 per batch \(vicap serve --max-batch-files\)",
    ),
    ("far over the default", 65, Limits.batch_files, r"65 images is over this server's limit of 64"),
]


@pytest.mark.parametrize(
    ("case", "n_files", "allowed", "expected"), BATCH_REFUSALS, ids=[c[0] for c in BATCH_REFUSALS]
)
def test_batch_requests_over_the_limits_are_refused_before_any_work(
    case, n_files, allowed, expected, ktvic_dir: Path, tmp_path: Path
) -> None:
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    # no runs: a refusal that got as far as decoding or captioning would not raise these errors
    with pytest.raises((ImageError, RequestError), match=expected):
        caption_batch(
            [], [image] * n_files, "greedy", 1, 1.0, 1.0, csv_dir=tmp_path, limits=Limits(batch_files=allowed)
        )
    assert not list(tmp_path.iterdir())  # no CSV, no folder


SMALL = Limits(reference_chars=60, reference_lines=3)
REFERENCES = [
    # (case, text in the reference box, references scored, or the error the page shows)
    ("empty", "", []),
    ("whitespace only", " \t  \n \u3000 ", []),
    ("thousands of empty lines, under the character limit", "\n" * 59, []),
    ("empty lines over the character limit", "\n" * 61, "61 characters, over this server's limit of 60"),
    ("blank lines between references", "\n a b \n\n\n c d\n", ["a b", "c d"]),
    ("at both limits", "x" * 18 + "\n" + "y" * 18 + "\n" + "z" * 22, ["x" * 18, "y" * 18, "z" * 22]),
    (
        "one character over",
        "w" * 61,
        r"61 characters, over this server's limit of 60 \(vicap serve --max-reference-chars\)",
    ),
    (
        "one line over",
        "a\nb\n\nc\nd",
        r"4 captions \(non-blank lines\), over this server's limit of 3 \(vicap serve --max-reference-lines\)",
    ),
    ("megabytes", "một con mèo\n" * 500_000, "6,000,000 characters"),
]


@pytest.mark.parametrize(("case", "text", "expected"), REFERENCES, ids=[c[0] for c in REFERENCES])
def test_reference_text_is_capped(case, text, expected) -> None:
    if isinstance(expected, list):
        assert read_references(text, SMALL) == expected
        return
    with pytest.raises(RequestError, match=expected):
        read_references(text, SMALL)
    # the page refuses it before the image: no image given, and the reference is the error
    with pytest.raises(RequestError, match=expected):
        caption_image([], None, "greedy", 1, 1.0, 1.0, text, limits=SMALL)


def test_default_reference_limits() -> None:
    assert len(read_references("một con mèo ngồi trên ghế\n" * 50)) == 50
    with pytest.raises(RequestError, match="51 captions"):
        read_references("một con mèo\n" * 51)
    with pytest.raises(RequestError, match="10,001 characters, over this server's limit of 10,000"):
        read_references("x" * 10_001)


def test_a_blank_reference_is_said_to_score_nothing(served, ktvic_dir: Path) -> None:
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    for text in (" \t ", "\n" * 5000):
        rows, msg = caption_image(served, image, "greedy", 1, 1.0, 1.0, text)
        assert rows[0][1] and rows[0][2:5] == [None, None, None]
        assert msg.endswith("The reference box holds only blank space, so nothing was scored."), msg
    _, msg = caption_image(served, image, "greedy", 1, 1.0, 1.0, "")
    assert "reference" not in msg


def test_limits_are_checked() -> None:
    for field in ("upload_bytes", "reference_chars", "reference_lines", "batch_files"):
        with pytest.raises(ValueError, match=f"limit {field} must be at least 1, not 0"):
            Limits(**{field: 0})


def png_header(width: int, height: int) -> bytes:
    """A small grayscale PNG file whose header says width x height (one row of pixel data): what
    an upload's size on disk does not tell."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))


UPLOADS = [
    # (case, file name, file contents, expected error on the page)
    ("no file", None, None, r"^No image: upload a photo"),
    (
        "over the byte limit",
        "big.jpg",
        b"\xff" * 3 * 2**19,
        r"^big.jpg: 1.5 MB is over the 1 MB upload limit\.$",
    ),
    ("not an image", "notes.png", b"not a photo", r"^notes.png: unreadable image \(UnidentifiedImageError"),
    # refused from its header, its pixels never decoded
    (
        "144 MP, header only",
        "huge.png",
        png_header(12000, 12000),
        r"^huge.png: 12000x12000 is over the 100,000,000-pixel limit$",
    ),
]


@pytest.mark.parametrize(("case", "name", "data", "expected"), UPLOADS, ids=[c[0] for c in UPLOADS])
def test_bad_uploads_are_refused_with_their_own_name(
    case, name, data, expected, monkeypatch, tmp_path: Path
) -> None:
    from vicap.serve import _page_message

    def no_decode(*args, **kwargs):
        raise AssertionError("an upload was decoded before vicap's checks")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    path = None
    if name:
        path = tmp_path / "gradio" / "0123abcd" / name  # where Gradio keeps an upload
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    # no runs: a refusal that got as far as captioning would not raise
    with pytest.raises(ImageError) as e:
        caption_image([], path, "greedy", 1, 1.0, 1.0, "", limits=Limits(upload_bytes=2**20))
    message = _page_message(e.value)
    assert re.search(expected, message), message
    assert "/" not in message


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
        app,
        [
            "serve",
            str(tmp_path),
            "--host",
            "0.0.0.0",
            "--port",
            "8123",
            "--max-upload-mb",
            "5",
            "--device",
            "cpu",
            "--checkpoint",
            "last",
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen == {
        "run_dirs": [tmp_path],
        "host": "0.0.0.0",
        "port": 8123,
        "limits": Limits(upload_bytes=5 * 2**20),
        "device": "cpu",
        "checkpoint": "last",
    }
    limits = ["--max-reference-chars", "300", "--max-reference-lines", "4", "--max-batch-files", "2"]
    res = CliRunner().invoke(app, ["serve", str(tmp_path), *limits])
    assert res.exit_code == 0, res.output
    assert seen["limits"] == Limits(reference_chars=300, reference_lines=4, batch_files=2)
    for option in ("--max-reference-chars", "--max-reference-lines", "--max-batch-files"):
        res = CliRunner().invoke(app, ["serve", str(tmp_path), option, "0"])
        assert res.exit_code == 2 and option in res.output, res.output
    # a folder that is not a run: a clear error, exit 2
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output, res.output


def test_page_messages_show_file_names_not_server_paths(monkeypatch, tmp_path: Path) -> None:
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
        assert _page_message(RequestError(text)) == text  # only upload paths are rewritten
    # Gradio's cache reached through a link (as /var is /private/var on macOS)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "link"))
    e = ImageError(f"{tmp_path / 'real' / 'ab12' / 'cam.png'}: 9x9 is over the 1-pixel limit")
    assert _page_message(e) == "cam.png: 9x9 is over the 1-pixel limit"
    # anything vicap did not word for the page is named by its type only
    for e in (
        RuntimeError(f"cannot load {tmp_path}/model.safetensors"),
        ValueError("/srv/x: bad"),
        KeyError("k"),
    ):
        assert _page_message(e) == f"captioning failed ({type(e).__name__}); the server's log has the details"


def test_upload_components_hand_over_the_path_unopened(monkeypatch, tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import FileData, ImageData, ListFiles

    from vicap.serve import _unopened

    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(12000, 12000))

    def no_open(*args, **kwargs):
        raise AssertionError("an upload was opened before vicap's checks")

    monkeypatch.setattr("PIL.Image.open", no_open)
    webcam = _unopened(gr.Image(type="filepath", sources=["webcam"]))  # Gradio's converts non-RGB in full
    assert webcam.preprocess(ImageData(path=str(huge), orig_name="huge.png")) == str(huge)
    assert webcam.preprocess(None) is None
    files = _unopened(gr.File(type="filepath", file_count="multiple"))
    listed = ListFiles(root=[FileData(path=str(huge)), FileData(path=str(huge))])
    assert files.preprocess(listed) == [str(huge)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.png"]  # nothing written beside it
    with pytest.raises(gr.Error, match="uploaded file"):
        webcam.preprocess(ImageData(url="data:image/png;base64,AAAA"))


def test_runs_with_one_encoder_share_it_and_encode_an_image_once(
    tiny_recipe, ktvic_dir: Path, tmp_path: Path
) -> None:
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
    caption_batch(runs, [image, image], "greedy", 1, 1.0, 1.0, csv_dir=tmp_path)
    assert len(calls) == 3  # once per image
