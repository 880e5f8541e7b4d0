"""`vicap serve` end to end: the demo run served by Gradio, driven in real headless Chromium.

The run is made by the demo's own code (`vicap.demo.run_demo`: synthetic KTVIC-layout data, the
stand-in tiny GPT-2 and CLIP, the demo recipe, training, evaluation), at a small size so it takes
seconds. One server serves it for the whole module, with small limits (256 KiB uploads, 2,000
reference characters, 8 reference lines, 3 images a batch) so the over-limit cases need no large
input, and its own Gradio cache folder, so the tests can see every file a request leaves.

Needs the serve extra (gradio, playwright) and Debian's chromium at /usr/bin/chromium; skipped
without them outside CI (`.ci/install-serve-deps` installs all three; under CI=true a missing one
fails). Screenshots are written to tests/artifacts/serve.png (and serve-batch.png, serve-webcam.png).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_serve_parts import png_header

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
LIMITS = dict(upload_bytes=UPLOAD_LIMIT, reference_chars=2000, reference_lines=8, batch_files=3)
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
def gradio_cache(tmp_path_factory):
    """The server's Gradio cache folder (uploads, webcam photos, CSVs), for this module only."""
    cache = tmp_path_factory.mktemp("gradio-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(cache))
        yield cache


def _launch(run_dirs: list[Path]):
    """`vicap serve`'s app for the runs, on a free localhost port in a background thread: (app, url)."""
    from vicap.serve import Limits, build_app, launch_options

    limits = Limits(**LIMITS)
    demo = build_app(run_dirs, limits=limits)
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(limits),
    )
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(demo_out: Path, second_run: Path, gradio_cache: Path):
    """The demo run and a second run served side by side; both loaded once."""
    demo, url = _launch([demo_out / "runs" / "demo", second_run])
    try:
        yield url
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

    import vicap.captioner

    def no_reload(*args, **kwargs):
        raise AssertionError("a request loaded a model")

    # The server loaded its run at start-up; a request that loaded anything again would fail here.
    monkeypatch.setattr(vicap.captioner, "load_run", no_reload)
    monkeypatch.setattr(vicap.captioner, "load_encoder", no_reload)
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


REFERENCE_CASES = [
    # (case, reference typed in the box, what the message says)
    (
        "one character over",
        "x" * 2001,
        "Error: the reference text is 2,001 characters, over this server's limit of 2,000",
    ),
    (
        "one line over",
        "con mèo\n" * 9,
        "Error: the reference text has 9 captions (non-blank lines), over this server's limit of 8",
    ),
    ("only spaces", "     ", "The reference box holds only blank space, so nothing was scored."),
    (
        "hundreds of empty lines",
        "\n" * 500,
        "The reference box holds only blank space, so nothing was scored.",
    ),
]


@pytest.mark.parametrize(
    ("case", "reference", "expected"), REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES]
)
def test_reference_text_over_the_limits_is_refused_on_the_page(
    case, reference, expected, page, test_images
) -> None:
    assert "up to 8 lines and 2,000 characters" in page.locator("#vicap-reference").inner_text()
    _upload(page, test_images[0])
    page.locator("#vicap-reference textarea").fill(reference)
    assert page.locator("#vicap-reference textarea").input_value() == reference  # the box cuts nothing
    msg = _run_and_wait(page, "#vicap-run", "#vicap-message", expected)
    if msg.startswith("Error:"):
        assert msg.endswith("nothing was captioned."), msg
        assert not page.locator('#vicap-results [role=gridcell][data-testid="cell-0-0"]').count()
    else:  # captioned, unscored
        assert msg.startswith("Captioned") and _cell(page, 0, 1) and _cell(page, 0, 2) == ""


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


API_CASES = [
    # (case, endpoint, its inputs (files by name; "captioned": the upload is used, the webcam's ignored),
    #  the message, CSV files the request leaves)
    (
        "webcam: not an image",
        "/caption",
        (None, "notes.png", ""),
        r"^\*\*Error:\*\* notes.png: unreadable image",
        0,
    ),
    (
        "webcam: 144 MP in a small file",
        "/caption",
        (None, "huge.png", ""),
        r"^\*\*Error:\*\* huge.png: 12000x12000 is over the 100,000,000-pixel limit$",
        0,
    ),
    ("upload: 144 MP", "/caption", ("huge.png", None, ""), r"huge.png: 12000x12000 is over", 0),
    ("reference over the limit", "/caption", ("good.jpg", None, "x" * 2001), r"2,001 characters, over", 0),
    ("captioned", "/caption", ("good.jpg", "huge.png", "con mèo"), r"^Captioned good\.jpg", 0),
    (
        "batch over the limit",
        "/caption_batch",
        (["good.jpg"] * 4,),
        r"4 images is over this server's limit of 3",
        0,
    ),
    (
        "batch with a bad file",
        "/caption_batch",
        (["good.jpg", "notes.png"],),
        r"^Captioned 1 of 2 image\(s\)",
        1,
    ),
]


@pytest.mark.parametrize(
    ("case", "endpoint", "inputs", "expected", "n_csv"), API_CASES, ids=[c[0] for c in API_CASES]
)
def test_requests_name_files_never_server_paths_and_leave_only_their_uploads(
    case, endpoint, inputs, expected, n_csv, server: str, gradio_cache: Path, test_images, tmp_path: Path
) -> None:
    from gradio_client import Client, handle_file

    (tmp_path / "notes.png").write_text("not an image\n")
    (tmp_path / "huge.png").write_bytes(png_header(12000, 12000))
    shutil.copy(test_images[0], tmp_path / "good.jpg")

    def file(name):
        return None if name is None else handle_file(str(tmp_path / name))

    if endpoint == "/caption":
        args = [file(inputs[0]), file(inputs[1]), "greedy", 1, 1.0, 1.0, inputs[2]]
    else:
        args = [[file(n) for n in inputs[0]], "greedy", 1, 1.0, 1.0]
    before = _files(gradio_cache)
    out = Client(server, verbose=False).predict(*args, api_name=endpoint)
    message = out[1]
    assert re.search(expected, message), message
    assert "/" not in message.replace("(s)", "")  # no path of any kind
    left = _files(gradio_cache) - before
    uploads = {p for p in left if len(p.parts) == 2 and p.parts[1] in {"good.jpg", "notes.png", "huge.png"}}
    csvs = {p for p in left if len(p.parts) == 1 and re.fullmatch(r"captions-\w+\.csv", p.name)}
    assert left == uploads | csvs and len(csvs) == n_csv, sorted(left)


def test_webcam_photo_over_the_pixel_limit_is_refused_before_it_is_decoded(webcam_page, monkeypatch) -> None:
    from PIL import ImageFile

    import data_prep.images

    monkeypatch.setattr(data_prep.images, "MAX_PIXELS", 1000)  # any camera frame is over it
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    pg = webcam_page
    pg.locator("#vicap-webcam").get_by_text("Click to Access Webcam").click()
    pg.wait_for_function(
        "() => { const v = document.querySelector('#vicap-webcam video');"
        " return v && v.readyState >= 2 && v.videoWidth > 0; }"
    )
    pg.locator(
        "#vicap-webcam button[aria-label*='apture'], #vicap-webcam button.button-capture, "
        "#vicap-webcam [data-testid=capture-button]"
    ).first.click()
    pg.locator("#vicap-webcam img:visible").first.wait_for()
    msg = _run_and_wait(pg, "#vicap-run", "#vicap-message", "pixel limit")
    assert re.fullmatch(r"Error: [\w.-]+\.png: \d+x\d+ is over the 1,000-pixel limit", msg), msg
    assert decoded == []  # neither Gradio nor vicap decoded the photo to refuse it


def test_the_server_deletes_its_files_when_it_stops(
    demo_out: Path, gradio_cache: Path, test_images, tmp_path
) -> None:
    from gradio_client import Client, handle_file

    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(cache))
        demo, url = _launch([demo_out / "runs" / "demo"])
        try:
            client = Client(url, verbose=False)
            image = handle_file(str(test_images[2]))
            _, msg, csv_path = client.predict([image], "greedy", 1, 1.0, 1.0, api_name="/caption_batch")
            _, msg2, _ = client.predict(image, None, "greedy", 1, 1.0, 1.0, "", api_name="/caption")
            assert msg.startswith("Captioned 1 of 1") and msg2.startswith("Captioned"), (msg, msg2)
            assert {p.suffix for p in _files(cache)} == {".jpg", ".csv"}
        finally:
            demo.close()
    assert _files(cache) == set()
