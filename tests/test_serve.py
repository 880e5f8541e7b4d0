"""`vicap serve` end to end: the demo run served by Gradio, driven in real headless Chromium.

The run is made by the demo's own code (`vicap.demo.run_demo`: synthetic KTVIC-layout data, the
stand-in tiny GPT-2 and CLIP, the demo recipe, training, evaluation), at a small size so it takes
seconds. One server serves it for the whole module, with a 256 KiB upload limit so the over-size
case needs no large file.

Needs the serve extra (gradio, playwright) and Debian's chromium at /usr/bin/chromium; skipped
without them outside CI (`.ci/install-serve-deps` installs all three; under CI=true a missing one
fails). Screenshots are written to tests/artifacts/serve.png (and serve-batch.png, serve-webcam.png).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if os.environ.get("CI") == "true":
    # In CI the serve extra and chromium are installed by .ci/install-serve-deps: a missing one is a
    # failure, never a silent skip.
    import gradio as gr
    import playwright.sync_api as sync_api

    assert Path(os.environ.get("VICAP_CHROMIUM", "/usr/bin/chromium")).is_file(), "chromium is missing"
else:
    gr = pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("VICAP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
UPLOAD_LIMIT = 256 * 1024
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """`vicap demo`'s output folder, made by the demo's code at a small size."""
    from vicap.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(
        out,
        n_train=48,
        n_test=6,
        clip_steps=10,
        overrides=("train.epochs=2", "train.warmup_steps=2", 'eval.levels=["syllable"]'),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def second_run(demo_out: Path) -> Path:
    """A second run on the demo's data and stand-ins, with ClipCap's transformer mapper, to compare."""
    from vicap.demo import demo_recipe_path
    from vicap.recipe import load_recipe
    from vicap.train import train

    recipe = load_recipe(
        demo_recipe_path(),
        [
            f"encoder.model=local-dir:{demo_out / 'models' / 'tiny-clip'}",
            f"decoder.model={demo_out / 'models' / 'tiny-gpt2-vi'}",
            f"data.source={demo_out / 'data' / 'ktvic-synthetic'}",
            f"data.features_dir={demo_out / 'features'}",
            f"train.output_dir={demo_out / 'runs' / 'transformer'}",
            "mapper.type=transformer",
            "mapper.num_layers=1",
            "train.epochs=1",
            "train.warmup_steps=2",
        ],
    )
    return train(recipe, progress=False)


@pytest.fixture(scope="module")
def server(demo_out: Path, second_run: Path):
    """The demo run and a second run served side by side on a free localhost port in a background
    thread; both loaded once."""
    from vicap.serve import build_app, launch_options

    demo = build_app([demo_out / "runs" / "demo", second_run], max_upload_bytes=UPLOAD_LIMIT)
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(UPLOAD_LIMIT),
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextlib.contextmanager
def _browser_page(server: str, extra_args: tuple[str, ...] = (), permissions: tuple[str, ...] = ()):
    """A fresh headless Chromium (new profile dir) on the app; requests off localhost are refused."""
    profile = tempfile.mkdtemp(prefix="vicap-chromium-")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            viewport={"width": 1400, "height": 1100},
            accept_downloads=True,
            permissions=list(permissions),
        )
        try:
            pg = browser.new_page()
            pg.route(
                "**/*",
                lambda route: route.continue_() if route.request.url.startswith(server) else route.abort(),
            )
            pg.set_default_timeout(30_000)
            pg.goto(server)
            pg.wait_for_selector("#vicap-run")
            yield pg
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(server):
    with _browser_page(server) as pg:
        yield pg


@pytest.fixture
def webcam_page(server):
    """The page in a Chromium with a fake camera (Chromium's test pattern) and camera permission."""
    fake_camera = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    with _browser_page(server, fake_camera, permissions=("camera",)) as pg:
        yield pg


@pytest.fixture(scope="module")
def test_images(demo_out: Path) -> list[Path]:
    return sorted((demo_out / "data" / "ktvic-synthetic" / "public-test-images").iterdir())


def _references(demo_out: Path, image: Path) -> list[str]:
    import json

    data = json.loads((demo_out / "data" / "ktvic-synthetic" / "test_data.json").read_text(encoding="utf-8"))
    (image_id,) = [im["id"] for im in data["images"] if im["filename"] == image.name]
    return [a["caption"] for a in data["annotations"] if a["image_id"] == image_id]


def _upload(pg, path: Path, where: str = "#vicap-upload") -> None:
    pg.locator(f"{where} input[type=file]").set_input_files(str(path))
    # the file component shows the file's name once the upload has arrived
    pg.locator(where).get_by_text(path.name).first.wait_for()


def _clear_upload(pg) -> None:
    pg.locator(
        "#vicap-upload button[aria-label*='lear'], #vicap-upload button[aria-label*='emove']"
    ).first.click()


def _run_and_wait(pg, button: str, message: str, expect: str) -> str:
    """Click, wait until the request is done and its message contains `expect`; return the message.

    While a request runs, Gradio shows its queue status ("queue: 1/1 | 0.1s", "processing") over the
    previous message, so `expect` must be something only the new message says."""
    pg.click(button)
    pg.wait_for_function(
        "([sel, expect]) => { const t = document.querySelector(sel).innerText;"
        " return t.includes(expect) && !/queue:|processing/.test(t); }",
        arg=[message, expect],
    )
    return pg.locator(message).inner_text()


def _cell(pg, row: int, col: int, table: str = "#vicap-results") -> str:
    """The text of a body cell of a results table (Gradio's dataframe renders a grid of divs)."""
    cell = pg.locator(f'{table} [role=gridcell][data-testid="cell-{row}-{col}"]')
    cell.wait_for()
    return cell.inner_text().strip()


def _rows(pg, table: str, n_rows: int, n_cols: int) -> list[list[str]]:
    """The table's body once it has `n_rows` rows (and no more)."""
    pg.locator(f'{table} [role=gridcell][data-testid="cell-{n_rows - 1}-0"]').wait_for()
    assert not pg.locator(f'{table} [role=gridcell][data-testid="cell-{n_rows}-0"]').count()
    return [[_cell(pg, r, c, table) for c in range(n_cols)] for r in range(n_rows)]


def test_page_captions_an_uploaded_image(page, server: str, demo_out: Path, test_images) -> None:
    from vicap.serve import CAPTION_HEADERS

    image = test_images[0]
    references = _references(demo_out, image)
    _upload(page, image)
    page.locator("#vicap-reference textarea").fill(references[0])
    message = _run_and_wait(page, "#vicap-run", "#vicap-message", "Captioned")
    assert "demo: document frequencies from 6 images (test)" in message
    assert "transformer: document frequencies from 6 images (test)" in message
    rows = _rows(page, "#vicap-results", 2, len(CAPTION_HEADERS))
    assert [r[0] for r in rows] == ["demo", "transformer"]
    summaries = {
        "demo": "open_clip tiny-clip -> mlp mapper (prefix 4) -> tiny-gpt2-vi [full], vi",
        "transformer": "open_clip tiny-clip -> transformer mapper (prefix 4) -> tiny-gpt2-vi [full], vi",
    }
    for run, caption, bleu, cider, chrf, seconds, summary in rows:
        assert caption and any(ch.isalpha() for ch in caption), caption
        assert summary == summaries[run]
        assert float(seconds) > 0
        assert 0 <= float(bleu) <= 1 and float(cider) >= 0 and 0 < float(chrf) <= 1
    page.locator("#vicap-preview img").wait_for()  # the captioned image is shown beside the table
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

    # The demo run's caption as the reference: its own chrF is 1 and its CIDEr-D positive (document
    # frequencies come from the run's test references, so one typed reference still scores).
    caption = rows[0][1]
    page.locator("#vicap-reference textarea").fill(caption)
    _run_and_wait(page, "#vicap-run", "#vicap-message", f'reference "{caption[:40]}')
    assert _cell(page, 0, 1) == caption
    assert float(_cell(page, 0, 4)) == pytest.approx(1.0)
    assert float(_cell(page, 0, 3)) > 0

    # Decoding controls reach the model: sampling at a temperature still captions.
    page.get_by_label("sample").first.check()
    msg = _run_and_wait(page, "#vicap-run", "#vicap-message", "sample decoding")
    assert "Captioned" in msg and _cell(page, 0, 1)


def test_api_captions_for_scripts(server: str, test_images) -> None:
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    rows, message, image = client.predict(
        handle_file(str(test_images[0])), None, "greedy", 1, 1.0, 1.0, "", api_name="/caption"
    )
    assert "Captioned" in message and Path(image).is_file()
    assert [r[0] for r in rows["data"]] == ["demo", "transformer"] and rows["data"][0][1].strip()


def test_concurrent_requests_are_queued_with_the_models_loaded_once(
    server: str, test_images, monkeypatch
) -> None:
    from gradio_client import Client, handle_file

    import vicap.serve

    def no_reload(*args, **kwargs):
        raise AssertionError("a request loaded a model")

    # The server loaded its run at start-up; a request that loaded anything again would fail here.
    monkeypatch.setattr(vicap.serve, "load_run", no_reload)
    monkeypatch.setattr(vicap.serve, "load_encoder", no_reload)
    clients = [Client(server, verbose=False) for _ in range(4)]
    images = [test_images[i % len(test_images)] for i in range(8)]

    def ask(i: int):
        return clients[i % 4].predict(
            handle_file(str(images[i])), None, "greedy", 1, 1.0, 1.0, "", api_name="/caption"
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all("Captioned" in msg for _, msg, _ in answers), [msg for _, msg, _ in answers]
    # Greedy decoding: the same image gets the same caption whichever request carried it.
    by_image: dict[str, set[str]] = {}
    for img, (rows, _, _) in zip(images, answers, strict=True):
        by_image.setdefault(img.name, set()).add(rows["data"][0][1])
    assert all(len(caps) == 1 for caps in by_image.values()), by_image


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(page, test_images, tmp_path: Path) -> None:
    # An empty form.
    msg = _run_and_wait(page, "#vicap-run", "#vicap-message", "No image")
    assert msg.startswith("Error: No image: upload a photo")
    # Not an image: the message names the file (not the server's temp folder).
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a photo\n")
    _upload(page, fake)
    msg = _run_and_wait(page, "#vicap-run", "#vicap-message", "notes.jpg")
    assert msg.startswith("Error: notes.jpg: ") and "/tmp" not in msg, msg
    _clear_upload(page)
    # A truncated image.
    cut = tmp_path / "cut.jpg"
    data = test_images[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _upload(page, cut)
    msg = _run_and_wait(page, "#vicap-run", "#vicap-message", "cut.jpg")
    assert msg.startswith("Error: cut.jpg: "), msg
    _clear_upload(page)
    # The server is still there: a real image captions.
    _upload(page, test_images[1])
    _run_and_wait(page, "#vicap-run", "#vicap-message", "Captioned")
    assert _cell(page, 0, 1)


def test_an_upload_over_the_limit_is_refused_on_the_page(page, test_images, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(test_images[0].read_bytes() + os.urandom(UPLOAD_LIMIT + 1024))  # a valid JPEG, padded
    page.locator("#vicap-upload input[type=file]").set_input_files(str(big))
    # Gradio refuses it before upload, with the limit, in a toast on the page.
    toast = page.locator(".toast-body, [data-testid=toast-body]").filter(has_text="big.jpg").first
    toast.wait_for()
    assert "256" in toast.inner_text() or "exceed" in toast.inner_text().lower()
    # and the page still works
    _upload(page, test_images[0])
    _run_and_wait(page, "#vicap-run", "#vicap-message", "Captioned")


def test_batch_tab_captions_several_images_and_downloads_csv(page, test_images, tmp_path: Path) -> None:
    from vicap.serve import BATCH_HEADERS

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    page.get_by_role("tab", name="Batch").click()
    files = [test_images[0], test_images[1], broken]
    page.locator("#vicap-batch-upload input[type=file]").set_input_files([str(f) for f in files])
    for f in files:  # the list shows each file's stem and extension apart
        page.locator("#vicap-batch-upload").get_by_text(f.stem, exact=True).first.wait_for()
    msg = _run_and_wait(page, "#vicap-batch-run", "#vicap-batch-message", "Captioned")
    assert "Captioned 2 of 3 image(s) with 2 run(s)" in msg and "1 file(s) could not be used" in msg
    rows = _rows(page, "#vicap-batch-results", 5, len(BATCH_HEADERS))
    names = [files[0].name] * 2 + [files[1].name] * 2 + [broken.name]
    assert [r[0] for r in rows] == names
    for r in rows[:4]:
        assert r[1] in ("demo", "transformer") and r[2] and r[4] == ""
    assert [r[1] for r in rows[:4]] == ["demo", "transformer"] * 2
    assert rows[4][4].startswith("broken.png: unreadable image")
    page.screenshot(path=str(ARTIFACTS / "serve-batch.png"), full_page=True)
    with page.expect_download() as download:
        page.locator("#vicap-batch-csv a").first.click()
    saved = tmp_path / "captions.csv"
    download.value.save_as(saved)
    with open(saved, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == BATCH_HEADERS
    assert [r[:3] for r in table[1:]] == [r[:3] for r in rows]


def test_webcam_photo_is_captioned(webcam_page) -> None:
    pg = webcam_page
    pg.locator("#vicap-webcam").get_by_text("Click to Access Webcam").click()
    # the fake camera's stream is playing (a capture before the first frame takes nothing)
    pg.wait_for_function(
        "() => { const v = document.querySelector('#vicap-webcam video');"
        " return v && v.readyState >= 2 && v.videoWidth > 0; }"
    )
    pg.locator(
        "#vicap-webcam button[aria-label*='apture'], #vicap-webcam button.button-capture, "
        "#vicap-webcam [data-testid=capture-button]"
    ).first.click()
    pg.locator("#vicap-webcam img:visible").first.wait_for()  # the photo taken
    msg = _run_and_wait(pg, "#vicap-run", "#vicap-message", "Captioned")
    assert "with 2 run(s)" in msg
    assert _cell(pg, 0, 1) and _cell(pg, 1, 1)
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "serve-webcam.png"), full_page=True)
