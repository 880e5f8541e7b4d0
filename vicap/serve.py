"""`vicap serve`: a Gradio page for trying trained runs side by side (optional extra: `pip install -e ".[serve]"`).

Every run named on the command line is loaded once at start-up (recipe, checkpoint, image encoder);
requests reuse them. The page has:

- Caption: upload an image (or take one with the webcam), pick the decoding (greedy / beam size /
  sampling temperature and top-p), and read each run's caption side by side with its recipe summary
  and the time it took, beside the image. With a reference caption typed in (one per line for several), each caption
  is scored against it: BLEU-4 and chrF on the run language's metric tokens, and CIDEr-D with its
  document frequencies taken from the run's held-out references (the image counted as one more
  document), because CIDEr-D of one image scored on its own is 0 whatever the caption.
- Batch: several images at once, one row per image and run, downloadable as CSV.

Scripts use Gradio's API: endpoints `/caption` and `/caption_batch` (see the page's "Use via API").
Bad input (no file, not an image, truncated, too large, too much reference text, too many files) is a
message on the page that names the file by its own name, never a server path; the server goes on.
What one request may hand in is capped (`Limits`, each a `vicap serve` option), and checked before
any work: an image's bytes, then its header's pixel count, before it is decoded. The server's files
(uploads, CSVs) live in Gradio's cache, which it sweeps (`CACHE_SWEEP`) and empties at shutdown.
Requests are queued, one at a time per event, so the models are never run concurrently.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vicap.captioner import Captioner
from vicap.encoders import Encoder
from vicap.errors import UsageError
from vicap.images import ImageError, load_image
from vicap.metrics import Scorer, tokenize_hypotheses, tokenize_references
from vicap.metrics.cider import CiderD
from vicap.recipe import GenerateConfig, Recipe
from vicap.resolve import display_name
from vicap.runs import Run

log = logging.getLogger(__name__)

# Every CACHE_SWEEP[0] seconds Gradio deletes this server's cached files (uploads, webcam photos, CSVs)
# older than CACHE_SWEEP[1] seconds, and all of them at shutdown: an hour is long enough to read a
# result and download its CSV, and uploads no longer pile up on the server's disk.
CACHE_SWEEP = (600, 3600)
STRATEGIES = ("greedy", "beam", "sample")
SCORE_COLUMNS = ("BLEU-4", "CIDEr-D", "chrF")
CAPTION_HEADERS = ["run", "caption", *SCORE_COLUMNS, "time (s)", "recipe"]
CAPTION_WIDTHS = ["9%", "33%", "8%", "8%", "7%", "7%", "28%"]
BATCH_HEADERS = ["image", "run", "caption", "time (s)", "error"]


class RequestError(ValueError):
    """A request the page refuses; the message is fit for the page (no server paths)."""


@dataclass(frozen=True)
class Limits:
    """What one request may hand the server; each is a `vicap serve` option. Scoring typed references
    costs memory and time that grow with the text (6.8 MB of it took 3 GB and 26 s, most of the
    memory never returned), so the reference box is capped well above any real use."""

    upload_bytes: int = 20 * 2**20  # per image (--max-upload-mb)
    reference_chars: int = 10_000  # characters in the reference box, newlines included
    reference_lines: int = 50  # reference captions (non-blank lines)
    batch_files: int = 64  # images per batch request

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"limit {f.name} must be at least 1, not {getattr(self, f.name)}")


def recipe_summary(recipe: Recipe) -> str:
    enc, dec, mapper = recipe.encoder, recipe.decoder, recipe.mapper
    encoder = f"{enc.name} {display_name(enc.model)}" + (" (patch tokens)" if enc.patch_tokens else "")
    return (
        f"{encoder} -> {mapper.type} mapper (prefix {mapper.prefix_length}) -> {display_name(dec.model)}"
        f" [{dec.tuning}], {recipe.data.language}"
    )


@dataclass
class LoadedRun:
    name: str
    captioner: Captioner
    cider: CiderD | None = None  # the held-out references' document frequencies, for CIDEr-D
    cider_note: str = ""  # where they came from, or why CIDEr-D is not given

    @property
    def run(self) -> Run:
        return self.captioner.run

    @property
    def encoder(self) -> Encoder:
        return self.captioner.encoder

    @property
    def recipe(self) -> Recipe:
        return self.captioner.recipe

    @property
    def summary(self) -> str:
        return recipe_summary(self.recipe)


def load_runs(
    run_dirs: list[str | Path], *, device: str | None = None, checkpoint: str = "best"
) -> list[LoadedRun]:
    """Load every run once (at the checkpoint `checkpoint` names: each run's selected one by default),
    and each distinct image encoder once (runs with the same [encoder] section share it), on `device`
    (default: each recipe's train.device). Names are the run folders' names, made unique."""
    if not run_dirs:
        raise UsageError("name at least one run directory")
    loaded: list[LoadedRun] = []
    seen: dict[str, int] = {}
    encoders: dict[tuple[str, str], Encoder] = {}
    for d in run_dirs:
        captioner = Captioner.from_run(d, checkpoint=checkpoint, device=device)
        key = (repr(captioner.recipe.encoder), str(captioner.device))
        if key in encoders:
            captioner = Captioner(captioner.run, device=device, encoder=encoders[key])
        # loaded and on the device now, at start-up, not by the first request
        encoders[key], _ = captioner.encoder, captioner.model
        name = Path(d).resolve().name or str(d)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} ({seen[name]})"
        cider, note = reference_corpus(captioner.run)
        loaded.append(LoadedRun(name, captioner, cider, note))
        log.info("serving %s: %s; CIDEr-D: %s", name, recipe_summary(captioner.recipe), note)
    return loaded


def reference_corpus(run: Run) -> tuple[CiderD | None, str]:
    """CIDEr-D's reference side for typed references: the run's held-out split (eval.split, else
    every split) from its manifest, in the run language's metric tokens. (None, why) without one."""
    from data_prep.manifest import read_manifest

    recipe = run.recipe
    path = Path(recipe.data.source) if recipe.data.adapter == "manifest" else run.run_dir / "manifest.jsonl"
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:  # the note is shown on the page: file name only
        log.warning("run %s: no CIDEr-D for typed references: %s", run.run_dir, e)
        return None, f"not given: no readable {path.name} for its document frequencies ({type(e).__name__})"
    records = manifest.split(recipe.eval.split) or manifest.records
    records = [r for r in records if r.captions]
    if not records:
        return None, f"not given: {path.name} has no captions for its document frequencies"
    gts = tokenize_references(
        {r.image_id: r.captions for r in records}, recipe.data.language, recipe.eval.levels[0]
    )
    split = recipe.eval.split if manifest.split(recipe.eval.split) else "all splits"
    return CiderD(gts), f"document frequencies from {len(gts)} images ({split}) of {path.name}"


def decoding_config(
    base: GenerateConfig, strategy: str, beam_size: float, temperature: float, top_p: float
) -> GenerateConfig:
    """The run's [generate] settings with the page's decoding controls applied."""
    if strategy not in STRATEGIES:
        raise RequestError(f"decoding must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    beam_size = int(beam_size)
    if strategy == "beam" and not 1 <= beam_size <= 16:
        raise RequestError(f"beam size must be between 1 and 16, not {beam_size}")
    if strategy == "sample" and not (float(temperature) > 0 and 0 < float(top_p) <= 1):
        raise RequestError("sampling needs temperature > 0 and 0 < top-p <= 1")
    # the page's controls for the chosen strategy only: the others are not read, so not set
    controls = {
        "beam": {"beam_size": beam_size},
        "sample": {"temperature": float(temperature), "top_p": float(top_p)},
    }
    return base.switched(strategy, **controls.get(strategy, {}), n_best=1, batch_size=1)


def check_upload(path: str | Path | None, max_bytes: int = Limits.upload_bytes) -> Path:
    """The upload's path, or ImageError with a message fit for the page."""
    if path is None or str(path) == "":
        raise ImageError("No image: upload a photo (or take one with the webcam) first.")
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path.name}: the upload did not arrive; try again.")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(
            f"{path.name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB upload limit."
        )
    return path


def read_references(text: str | None, limits: Limits = Limits()) -> list[str]:
    """The typed reference captions, one per non-blank line, or RequestError when the box holds more
    than the server takes (checked on the raw text first, before anything is split or copied)."""
    text = text or ""
    if len(text) > limits.reference_chars:
        raise RequestError(
            f"the reference text is {len(text):,} characters, over this server's limit of "
            f"{limits.reference_chars:,} (vicap serve --max-reference-chars); nothing was captioned."
        )
    references = [line.strip() for line in text.splitlines() if line.strip()]
    if len(references) > limits.reference_lines:
        raise RequestError(
            f"the reference text has {len(references):,} captions (non-blank lines), over this server's "
            f"limit of {limits.reference_lines:,} (vicap serve --max-reference-lines); nothing was captioned."
        )
    return references


def score_caption(lr: LoadedRun, caption: str, references: list[str]) -> dict[str, float]:
    """BLEU-4, CIDEr-D and chrF of one caption against the typed reference(s), on the run's tokens."""
    language, level = lr.recipe.data.language, lr.recipe.eval.levels[0]
    gts = tokenize_references({"image": references}, language, level)
    res = tokenize_hypotheses({"image": caption}, language, level)
    with Scorer(language, ("BLEU", "chrF")) as scorer:
        scores = scorer.score_tokens(gts, res)
    if lr.cider is not None:
        scores["CIDEr-D"] = lr.cider.score_new_image(res["image"][0], gts["image"])
    return {c: scores[c] for c in SCORE_COLUMNS if c in scores}


@torch.no_grad()
def caption_with(
    lr: LoadedRun, image, cfg: GenerateConfig, features: dict[int, torch.Tensor] | None = None
) -> tuple[str, float]:
    """(caption, seconds) for one decoded PIL image. `features` caches the image's features per
    encoder for one request, so runs sharing an encoder encode it once (the first one's time
    includes the encoding)."""
    start = time.perf_counter()
    features = {} if features is None else features
    cap = lr.captioner
    if id(cap.encoder) not in features:
        features[id(cap.encoder)] = cap.encode(cap.preprocess(image).unsqueeze(0), cfg)
    caps = cap.caption_features(features[id(cap.encoder)], cfg)
    return caps[0][0].text, time.perf_counter() - start


def caption_image(
    runs: list[LoadedRun],
    path: str | Path | None,
    strategy: str = "beam",
    beam_size: float = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    reference: str = "",
    *,
    limits: Limits = Limits(),
) -> tuple[list[list], str]:
    """One image through every run: (table rows as CAPTION_HEADERS, message). Raises ImageError or
    RequestError (checked before any image is decoded).

    `reference`: optional reference caption(s), one per line."""
    references = read_references(reference, limits)
    image = load_image(check_upload(path, limits.upload_bytes))  # bytes, then the header's pixels
    rows, features = [], {}
    for lr in runs:
        cfg = decoding_config(lr.recipe.generate, strategy, beam_size, temperature, top_p)
        text, seconds = caption_with(lr, image, cfg, features)
        scores = score_caption(lr, text, references) if references else {}
        rows.append(
            [lr.name, text]
            + [round(scores[c], 4) if c in scores else None for c in SCORE_COLUMNS]
            + [round(seconds, 3), lr.summary]
        )
    msg = f"Captioned {Path(path).name} with {len(runs)} run(s), {strategy} decoding."
    if references:
        first = references[0] if len(references[0]) <= 60 else references[0][:57] + "..."
        more = f" and {len(references) - 1} more" if len(references) > 1 else ""
        msg += (
            f' Scored against your reference "{first}"{more} on each run\'s language tokens; '
            "CIDEr-D: " + "; ".join(f"{lr.name}: {lr.cider_note}" for lr in runs) + "."
        )
    elif reference:
        msg += " The reference box holds only blank space, so nothing was scored."
    return rows, msg


def caption_batch(
    runs: list[LoadedRun],
    paths: list[str | Path] | None,
    strategy: str = "beam",
    beam_size: float = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    csv_dir: str | Path,
    limits: Limits = Limits(),
) -> tuple[list[list], str, str]:
    """Several images through every run: (rows as BATCH_HEADERS, message, CSV path).

    The CSV is one new file in `csv_dir` (the page passes Gradio's cache, which it sweeps), written
    only once every image is done: a refused or failed request leaves nothing behind."""
    paths = [p for p in (paths or []) if p]
    if not paths:
        raise ImageError("No images: upload one or more photos first.")
    if len(paths) > limits.batch_files:
        raise RequestError(
            f"{len(paths)} images is over this server's limit of {limits.batch_files} per batch "
            "(vicap serve --max-batch-files); nothing was captioned."
        )
    cfgs = [decoding_config(lr.recipe.generate, strategy, beam_size, temperature, top_p) for lr in runs]
    rows, bad = [], 0
    for p in paths:
        name = Path(p).name
        try:
            image = load_image(check_upload(p, limits.upload_bytes))
        except ImageError as e:
            bad += 1
            rows.append([name, "", "", None, _page_message(e)])
            continue
        features = {}
        for lr, cfg in zip(runs, cfgs, strict=True):
            text, seconds = caption_with(lr, image, cfg, features)
            rows.append([name, lr.name, text, round(seconds, 3), ""])
    fd, out = tempfile.mkstemp(prefix="captions-", suffix=".csv", dir=csv_dir)
    with open(fd, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(BATCH_HEADERS)
        w.writerows(rows)
    msg = f"Captioned {len(paths) - bad} of {len(paths)} image(s) with {len(runs)} run(s)."
    if bad:
        msg += f" {bad} file(s) could not be used: see the error column."
    return rows, msg, out


def _upload_roots() -> list[str]:
    """Folders uploads live in: Gradio's temp dir (GRADIO_TEMP_DIR, else <tmp>/gradio) and the system's,
    each as given and with links resolved (Gradio resolves <tmp>/gradio: /var is /private/var on macOS).
    Longest first, so a root inside another is rewritten whole."""
    roots = {
        form.rstrip("/\\")
        for r in (os.environ.get("GRADIO_TEMP_DIR", ""), tempfile.gettempdir())
        if r
        for form in (r, os.path.abspath(r), os.path.realpath(r))
    }
    return sorted(roots, key=len, reverse=True)


def _page_message(e: Exception) -> str:
    """The error for the page: an uploaded file is named by its own name, not the server's temp path.
    Only vicap's own refusals (ImageError, RequestError) are worded for the page; anything else is
    named by its type, its text (which may hold any path) going to the log."""
    if not isinstance(e, ImageError | RequestError):
        return f"captioning failed ({type(e).__name__}); the server's log has the details"
    text = str(e)
    for root in _upload_roots():
        text = re.sub(re.escape(root) + r"(?:[/\\][^/\\\s'\"]+)*[/\\]([^/\\\s'\"]+)", r"\1", text)
    return text


def _uploaded_paths(payload):
    """What an upload component hands the handler: the path(s) Gradio stored the upload(s) at, the
    file left unopened. Gradio's own preprocessing decodes a webcam photo that is not RGB in full and
    saves a converted copy (a 144 MP PNG of a few hundred KB cost 690 MB) before vicap could refuse
    it, and leaves an empty temp file per uploaded file; vicap checks the bytes and then the header's
    pixel count itself (check_upload, load_image)."""
    import gradio as gr
    from gradio.data_classes import ListFiles

    if payload is None:
        return None
    if isinstance(payload, ListFiles):
        return [_uploaded_paths(f) for f in payload.root]
    if not payload.path:  # a data: URL, which Gradio would decode in full to save it
        raise gr.Error("Send the image as an uploaded file (a data: URL is not accepted).")
    return payload.path


def _unopened(component):
    """The upload component with its preprocessing replaced by _uploaded_paths. (An override on the
    instance: Gradio writes a .pyi file beside any module that subclasses a component.)"""
    component.preprocess = _uploaded_paths
    return component


def _refusal(what: str, e: Exception) -> str:
    """The page's message for a failed request; an unexpected failure is logged in full, never shown."""
    if not isinstance(e, ImageError | RequestError):
        log.exception("%s request failed", what)
    return f"**Error:** {_page_message(e)}"


def _controls(gr, runs: list[LoadedRun]):
    """Decoding controls, starting from the first run's [generate] settings."""
    base = runs[0].recipe.generate
    with gr.Row():
        strategy = gr.Radio(
            list(STRATEGIES), value=base.strategy if base.strategy in STRATEGIES else "beam", label="decoding"
        )
        beam = gr.Slider(1, 16, value=base.beam_size, step=1, label="beam size (beam)")
        temp = gr.Slider(0.1, 2.0, value=base.temperature, step=0.05, label="temperature (sample)")
        top_p = gr.Slider(0.05, 1.0, value=base.top_p, step=0.05, label="top-p (sample)")
    return strategy, beam, temp, top_p


def _caption_tab(gr, runs: list[LoadedRun], limits: Limits) -> None:
    def on_caption(upload, webcam, strategy, beam_size, temperature, top_p, reference):
        path = upload or webcam
        try:
            rows, msg = caption_image(
                runs, path, strategy, beam_size, temperature, top_p, reference, limits=limits
            )
        except Exception as e:  # keep serving
            return [], _refusal("caption", e), None
        return rows, msg, str(path)

    with gr.Row():
        upload = _unopened(
            gr.File(label="image", file_types=["image"], type="filepath", elem_id="vicap-upload")
        )
        webcam = _unopened(
            gr.Image(label="or take a photo", sources=["webcam"], type="filepath", elem_id="vicap-webcam")
        )
    strategy, beam, temp, top_p = _controls(gr, runs)
    reference = gr.Textbox(
        label=(
            "reference caption (optional; one per line for several, up to "
            f"{limits.reference_lines} lines and {limits.reference_chars:,} characters): "
            "scores each caption against it"
        ),
        lines=1,
        elem_id="vicap-reference",
    )
    go = gr.Button("Caption", variant="primary", elem_id="vicap-run")
    message = gr.Markdown(elem_id="vicap-message")
    with gr.Row():
        preview = gr.Image(
            label="captioned image", interactive=False, scale=1, height=240, elem_id="vicap-preview"
        )
        table = gr.Dataframe(
            headers=CAPTION_HEADERS,
            value=[],
            label="captions",
            wrap=True,
            column_widths=CAPTION_WIDTHS,
            scale=4,
            elem_id="vicap-results",
        )
    inputs = [upload, webcam, strategy, beam, temp, top_p, reference]
    go.click(on_caption, inputs, [table, message, preview], api_name="caption")


def _batch_tab(gr, runs: list[LoadedRun], limits: Limits) -> None:
    def on_batch(files, strategy, beam_size, temperature, top_p):
        try:
            decoding = (strategy, beam_size, temperature, top_p)
            # the CSV goes straight into Gradio's cache, which serves it from there and sweeps it
            rows, msg, csv_path = caption_batch(
                runs, files, *decoding, csv_dir=csv.GRADIO_CACHE, limits=limits
            )
        except Exception as e:  # keep serving
            return [], _refusal("batch", e), None
        return rows, msg, csv_path

    files = _unopened(
        gr.File(
            label=f"images (up to {limits.batch_files})",
            file_count="multiple",
            file_types=["image"],
            type="filepath",
            elem_id="vicap-batch-upload",
        )
    )
    strategy, beam, temp, top_p = _controls(gr, runs)
    go = gr.Button("Caption all", variant="primary", elem_id="vicap-batch-run")
    message = gr.Markdown(elem_id="vicap-batch-message")
    table = gr.Dataframe(
        headers=BATCH_HEADERS, value=[], label="captions", wrap=True, elem_id="vicap-batch-results"
    )
    csv = gr.File(label="CSV", elem_id="vicap-batch-csv")
    go.click(on_batch, [files, strategy, beam, temp, top_p], [table, message, csv], api_name="caption_batch")


def build_app(
    run_dirs: list[str | Path] | None = None,
    *,
    runs: list[LoadedRun] | None = None,
    limits: Limits = Limits(),
    device: str | None = None,
    checkpoint: str = "best",
):
    """The Gradio Blocks app (queued) for the given runs; loads them once (on `device`, at
    `checkpoint`) unless `runs` is given."""
    import gradio as gr

    runs = runs if runs is not None else load_runs(list(run_dirs or []), device=device, checkpoint=checkpoint)
    with gr.Blocks(title="vicap captioners", analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(
            "# vicap: try the captioners\n" + "\n".join(f"- **{lr.name}**: {lr.summary}" for lr in runs)
        )
        with gr.Tab("Caption"):
            _caption_tab(gr, runs, limits)
        with gr.Tab("Batch"):
            _batch_tab(gr, runs, limits)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_options(limits: Limits = Limits()) -> dict:
    """Keyword arguments for `Blocks.launch`: system fonts only (the page never reaches out to font
    servers, so it works offline), no server-side rendering process, the upload size limit, and
    only vicap's own messages shown (show_error=False: an unexpected error's text, which may hold a
    server path, stays in the log; the page says "Error")."""
    import gradio as gr

    theme = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {
        "theme": theme,
        "ssr_mode": False,
        "max_file_size": limits.upload_bytes,
        "share": False,
        "show_error": False,
    }


def serve(
    run_dirs: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    limits: Limits = Limits(),
    block: bool = True,
    device: str | None = None,
    checkpoint: str = "best",
):
    """Load the runs, build the app and serve it on host:port (blocking unless block=False)."""
    demo = build_app(run_dirs, limits=limits, device=device, checkpoint=checkpoint)
    demo.launch(
        server_name=host,
        server_port=port,
        inbrowser=False,
        prevent_thread_lock=not block,
        **launch_options(limits),
    )
    return demo
