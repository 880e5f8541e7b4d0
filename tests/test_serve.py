"""`vicap serve` end to end: a tiny run served by Gradio, driven in real headless Chromium.

Needs the serve extra (gradio, playwright) and Debian's chromium at /usr/bin/chromium; skipped
without them outside CI (`.ci/install-serve-deps` installs all three; under CI=true a missing one fails). The screenshot is written to
tests/artifacts/serve.png.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
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

from vicap.train import train  # noqa: E402

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
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_recipe):
    """The demo-recipe tiny run, served on a free localhost port in a background thread."""
    from vicap.serve import build_app, launch_options

    run_dir = train(tiny_recipe(**{"train.epochs": "1"}), progress=False)
    demo = build_app([run_dir])
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options()
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def page(server):
    """A fresh headless Chromium page on the app; requests off localhost are refused."""
    profile = tempfile.mkdtemp(prefix="vicap-chromium-")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100},
        )
        try:
            pg = browser.new_page()
            pg.route(
                "**/*",
                lambda route: route.continue_() if route.request.url.startswith(server) else route.abort(),
            )
            pg.set_default_timeout(20_000)
            pg.goto(server)
            pg.wait_for_selector("#vicap-run")
            yield pg
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)


def _upload(pg, path: Path) -> None:
    pg.locator("#vicap-upload input[type=file]").set_input_files(str(path))
    # the file component shows the file's name once the upload has arrived
    pg.locator("#vicap-upload").get_by_text(path.name).first.wait_for()


def _caption_cell(pg) -> str:
    return _cell(pg, 0, 1)


def _cell(pg, row: int, col: int) -> str:
    """The text of a body cell of the results table (Gradio's dataframe renders a grid of divs)."""
    cell = pg.locator(f'#vicap-results [role=gridcell][data-testid="cell-{row}-{col}"]')
    cell.wait_for()
    return cell.inner_text().strip()


def test_page_captions_an_uploaded_image(page, ktvic_dir: Path, server: str) -> None:
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    _upload(page, image)
    page.locator("#vicap-reference textarea").fill("một người đàn ông đang đứng trên đường")
    page.click("#vicap-run")
    page.locator("#vicap-message").get_by_text("Captioned").wait_for()
    caption = _caption_cell(page)
    assert caption and any(ch.isalpha() for ch in caption), caption
    assert "mlp mapper" in _cell(page, 0, 3)  # recipe summary column
    assert float(_cell(page, 0, 6)) >= 0  # chrF against the reference
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

    # a script gets the same through Gradio's API
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    rows, message = client.predict(
        handle_file(str(image)), None, "greedy", 1, 1.0, 1.0, "", api_name="/caption"
    )
    assert "Captioned" in message
    assert rows["data"][0][1].strip()


def test_page_reports_a_bad_upload_and_keeps_serving(page, ktvic_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a photo\n")
    _upload(page, fake)
    page.click("#vicap-run")
    page.locator("#vicap-message").get_by_text("Error").wait_for()
    assert "notes.jpg" in page.locator("#vicap-message").inner_text()
    # the server is still there: a real image captions
    image = sorted((ktvic_dir / "public-test-images").iterdir())[0]
    page.locator(
        "#vicap-upload button[aria-label*='lear'], #vicap-upload button[aria-label*='emove']"
    ).first.click()
    _upload(page, image)
    page.click("#vicap-run")
    page.locator("#vicap-message").get_by_text("Captioned").wait_for()
    assert _caption_cell(page)
