"""Training and evaluating the CNN+LSTM baseline on a vicap manifest.

Setup (manifest, vocabulary, images or cached CNN features, model) -> loop (teacher forcing,
AdamW, warmup + linear decay, clipping; one step = a batch of images with all their captions) ->
save (safetensors + the resolved recipe). Evaluation captions the held-out split with beam search and
hands the captions to `vicap.evaluate.caption_report`, the code path vicap's own runs use.

Run directory:
  baseline.toml                      the resolved recipe (kind = "baseline")
  manifest.jsonl, prepare_report.json
  vocab.json (+ spm.model)           the vocabulary
  checkpoints/step_XXXXXXXX/model.safetensors   decoder weights (+ the CNN when it is trained);
                                     metadata: format, recipe JSON, step, epoch, vocabulary size
  train_log.jsonl                    {"step", "epoch", "loss", "lr", "elapsed"} and {"val_loss"} rows
  report.json, report.md, captions_<split>.jsonl   from `vicap baseline evaluate`
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from vicap.baseline.model import CNNLSTM, beam_search, image_transform
from vicap.baseline.recipe import BaselineRecipe, baseline_from_json, load_baseline_recipe
from vicap.baseline.vocab import EOS, Vocab, build_vocab, caption_tokens, load_vocab
from vicap.checkpoint import CheckpointError
from vicap.encoders import Encoder, file_digest
from vicap.images import ImageError, load_image
from vicap.recipe import RecipeError

log = logging.getLogger(__name__)

FORMAT = "vicap-baseline-1"
RECIPE_FILE = "baseline.toml"


# --------------------------------------------------------------------------- images


class _Flat(torch.nn.Module):
    """CNN regions flattened to one row per image, so vicap's feature store can hold them."""

    def __init__(self, model: CNNLSTM) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).flatten(1)


def frozen_feature_store(
    recipe: BaselineRecipe, model: CNNLSTM, manifest: Manifest, *, progress: bool, device
):
    """Regions of every manifest image through the frozen CNN, cached in vicap's feature store (one row
    of grid*grid*C floats per image, keyed by the CNN, its weights and the preprocessing)."""
    from vicap.features import extract_features

    cfg = recipe.encoder
    if cfg.weights == "imagenet":
        import torchvision

        # the weights' own name, e.g. ResNet50_Weights.IMAGENET1K_V2, so a new default gets a new store
        weights = str(torchvision.models.get_model_weights(cfg.cnn).DEFAULT)
    elif cfg.weights == "none":
        # random weights: drawn first from the run's seed (the CNN is built before the decoder)
        weights = f"none:seed{recipe.train.seed}"
    else:
        weights = f"file:{file_digest(Path(cfg.weights))[:16]}"
    encoder = Encoder(
        model=_Flat(model).eval(),
        preprocess=image_transform(cfg),
        embed_dim=model.encoder.grid**2 * model.encoder.channels,
        identity={
            "kind": "vicap-baseline-cnn",
            "cnn": cfg.cnn,
            "weights": weights,
            "image_size": cfg.image_size,
            "grid": cfg.grid,
        },
    )
    paths = [manifest.resolve_image(r) for r in manifest.records]
    store = extract_features(
        encoder, paths, recipe.data.features_dir, batch_size=cfg.batch_size, device=device, progress=progress
    )
    if store.failures:
        log.warning("%d image(s) could not be read and are skipped", len(store.failures))
    return store


class _Pixels:
    """Loads and preprocesses images on demand (trainable CNN); unreadable ones come back as None."""

    def __init__(self, recipe: BaselineRecipe) -> None:
        self.transform = image_transform(recipe.encoder)

    def __call__(self, path: Path) -> torch.Tensor | None:
        try:
            return self.transform(load_image(path))
        except ImageError as e:
            log.warning("%s", e)
            return None


@dataclass
class _Item:
    image: torch.Tensor | None
    captions: list[list[int]]


class ImageCaptions(Dataset):
    """One item per image: its pixels (or cached features) and all of its encoded captions."""

    def __init__(self, images: list, captions: list[list[list[int]]], load) -> None:
        self.images, self.captions, self.load = images, captions, load

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> _Item:
        return _Item(self.load(self.images[i]), self.captions[i])


def collate(items: list[_Item]) -> dict[str, torch.Tensor]:
    """Images stacked once; captions padded to the batch's longest, each pointing at its image.
    inputs = <bos> w1 .. wn (pad 0), labels = w1 .. wn <eos> (-100 on padding)."""
    from vicap.baseline.vocab import BOS

    items = [it for it in items if it.image is not None]
    images = torch.stack([it.image for it in items])
    caps = [(i, c) for i, it in enumerate(items) for c in it.captions]
    T = max(len(c) for _, c in caps)
    inputs = torch.zeros(len(caps), T, dtype=torch.long)
    labels = torch.full((len(caps), T), -100, dtype=torch.long)
    for row, (_, c) in enumerate(caps):
        inputs[row, : len(c)] = torch.tensor([BOS, *c[:-1]])
        labels[row, : len(c)] = torch.tensor(c)
    return {
        "images": images,
        "inputs": inputs,
        "labels": labels,
        "image_index": torch.tensor([i for i, _ in caps]),
    }


def _loss(model: CNNLSTM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["images"], batch["inputs"], batch["image_index"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- data


def _encode(records: list[Record], language: str, segment: str, vocab: Vocab | None, max_tokens: int):
    """Tokens of every caption of `records` (segmented once), and their ids when a vocab is given."""
    flat = caption_tokens([c for r in records for c in r.captions], language, segment)
    out, i = [], 0
    for r in records:
        toks = flat[i : i + len(r.captions)]
        i += len(r.captions)
        out.append(toks)
    if vocab is None:
        return out, None
    ids = [[vocab.encode(t)[: max_tokens - 1] + [EOS] for t in toks] for toks in out]
    return out, ids


def _dataset(recipe, manifest, records, ids, store, pixels) -> ImageCaptions:
    if store is not None:
        keep = [(r, c) for r, c in zip(records, ids, strict=True) if store.has(manifest.resolve_image(r))]
        return ImageCaptions(
            [store.row(manifest.resolve_image(r)) for r, _ in keep],
            [c for _, c in keep],
            lambda row: torch.from_numpy(store.features[row].copy()),
        )
    return ImageCaptions([manifest.resolve_image(r) for r in records], ids, pixels)


# --------------------------------------------------------------------------- checkpoints


def _cnn_in_checkpoint(recipe: BaselineRecipe) -> bool:
    """The CNN is saved when it was trained, or randomly initialised (nothing else could rebuild it)."""
    return recipe.encoder.trainable or recipe.encoder.weights == "none"


def _state_to_save(model: CNNLSTM, recipe: BaselineRecipe) -> dict[str, torch.Tensor]:
    """Only what cannot be rebuilt from the recipe: the decoder, and the CNN when trained or random."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("decoder.") or _cnn_in_checkpoint(recipe)
    }


def save_baseline_checkpoint(
    run_dir: Path, model, recipe: BaselineRecipe, vocab_size: int, step: int, epoch: int
):
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "format": FORMAT,
        "recipe": recipe.to_json(),
        "step": str(step),
        "epoch": str(epoch),
        "vocab_size": str(vocab_size),
    }
    save_file(_state_to_save(model, recipe), tmp / "model.safetensors", metadata=meta)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    found = sorted((Path(run_dir) / "checkpoints").glob("step_????????"))
    for old in found[: -recipe.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _latest_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    found = sorted(
        p
        for p in (Path(run_dir) / "checkpoints").glob("step_????????")
        if (p / "model.safetensors").is_file()
    )
    if not found:
        raise CheckpointError(
            f"{run_dir}: no baseline checkpoints (looked in {Path(run_dir) / 'checkpoints'})"
        )
    path = found[-1] / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return state, meta


# --------------------------------------------------------------------------- train


def train_baseline(recipe: BaselineRecipe, *, progress: bool = True) -> Path:
    """Train the CNN+LSTM baseline; returns the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from vicap.pipeline import prepare_manifest
    from vicap.train import linear_warmup_decay

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"{run_dir} already holds checkpoints; choose another train.output_dir")
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    set_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(recipe.to_toml(), encoding="utf-8")

    # ---------------------------------------------------------------- setup
    manifest = prepare_manifest(recipe, run_dir)  # the same adapter + manifest as a ClipCap run
    language, segment = manifest.language, recipe.data.segment
    train_records, val_records = manifest.split("train"), manifest.split("val")
    if not train_records:
        raise ValueError(f"manifest {manifest.path} has no 'train' split")
    tokens, _ = _encode(train_records, language, segment, None, recipe.data.max_tokens)
    vocab = build_vocab([t for toks in tokens for t in toks], recipe.vocab, run_dir)
    max_tokens = recipe.data.max_tokens
    train_ids = [[vocab.encode(t)[: max_tokens - 1] + [EOS] for t in toks] for toks in tokens]
    set_seed(cfg.seed)
    model = CNNLSTM(recipe.encoder, recipe.decoder, len(vocab))
    if recipe.encoder.trainable:
        store, pixels = None, _Pixels(recipe)
    else:
        model.encoder.requires_grad_(False).eval()
        store, pixels = (
            frozen_feature_store(recipe, model, manifest, progress=progress, device=accelerator.device),
            None,
        )
    g = torch.Generator().manual_seed(cfg.seed)
    train_set = _dataset(recipe, manifest, train_records, train_ids, store, pixels)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=g)
    val_loader = None
    if val_records:
        _, val_ids = _encode(val_records, language, segment, vocab, max_tokens)
        val_set = _dataset(recipe, manifest, val_records, val_ids, store, pixels)
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    groups = [{"params": list(model.decoder.parameters()), "lr": cfg.lr}]
    if recipe.encoder.trainable:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.cnn_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total_steps = len(loader) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(cfg.warmup_steps, total_steps)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "baseline %s: %d images, %d captions, vocabulary %d (%s), %d steps, %s trainable parameters",
        run_dir,
        len(train_set),
        sum(len(c) for c in train_set.captions),
        len(vocab),
        vocab.kind,
        total_steps,
        f"{n_params:,}",
    )

    # ---------------------------------------------------------------- loop
    log_file = (run_dir / "train_log.jsonl").open("w", encoding="utf-8")
    bar = tqdm(total=total_steps, desc="baseline", unit="step", disable=not progress)
    step, running, seen, t0 = 0, 0.0, 0, time.time()

    def train_mode() -> None:
        model.train()
        if not recipe.encoder.trainable:
            accelerator.unwrap_model(model).encoder.eval()  # frozen: BatchNorm statistics stay put

    train_mode()
    for epoch in range(cfg.epochs):
        for batch in loader:
            loss = _loss(model, batch)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running, seen = running + float(loss.detach()), seen + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch, "loss": round(running / seen, 6)}
                row.update(lr=scheduler.get_last_lr()[0], elapsed=round(time.time() - t0, 2))
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{running / seen:.4f}", epoch=epoch)
                running, seen = 0.0, 0
        if val_loader is not None:
            model.eval()
            with torch.no_grad():
                losses = [(float(_loss(model, b)), int((b["labels"] != -100).sum())) for b in val_loader]
            val = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))
            log_file.write(json.dumps({"step": step, "epoch": epoch, "val_loss": round(val, 6)}) + "\n")
            log_file.flush()
            log.info("epoch %d: val loss %.4f", epoch, val)
            train_mode()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_baseline_checkpoint(
                run_dir, accelerator.unwrap_model(model), recipe, len(vocab), step, epoch
            )
    bar.close()
    log_file.close()
    return run_dir


# --------------------------------------------------------------------------- evaluate


def load_baseline_run(run_dir: str | Path, overrides=()) -> tuple[BaselineRecipe, CNNLSTM, Vocab, int]:
    """The run's recipe (with generate/eval overrides), model at its last checkpoint, vocabulary, step."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        hint = " (a vicap run: use `vicap evaluate`)" if (run_dir / "recipe.toml").is_file() else ""
        raise RecipeError(f"{run_dir}: not a baseline run directory (no {RECIPE_FILE}){hint}")
    recipe = load_baseline_recipe(run_dir / RECIPE_FILE, overrides)
    state, meta = _latest_checkpoint(run_dir)
    trained = baseline_from_json(meta["recipe"])
    for section in ("encoder", "decoder", "vocab"):
        if getattr(trained, section) != getattr(recipe, section):
            raise CheckpointError(f"{run_dir}: [{section}] differs between {RECIPE_FILE} and the checkpoint")
    vocab = load_vocab(run_dir)
    if len(vocab) != int(meta["vocab_size"]):
        raise CheckpointError(
            f"{run_dir}: vocabulary has {len(vocab)} entries, checkpoint {meta['vocab_size']}"
        )
    model = CNNLSTM(recipe.encoder, recipe.decoder, len(vocab))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("decoder.") or _cnn_in_checkpoint(recipe)]
    if missing or unexpected:
        raise CheckpointError(
            f"{run_dir}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return recipe, model.eval(), vocab, int(meta["step"])


def caption_records(
    recipe, model, vocab, manifest, records, *, store=None, device="cpu"
) -> tuple[list[Record], list[str]]:
    """Captions for `records` (those whose image can be read), decoded with recipe.generate."""
    gen = recipe.generate
    beam = 1 if gen.strategy == "greedy" else gen.beam_size
    lang = get_language(manifest.language)
    pixels = None if store is not None else _Pixels(recipe)
    model.to(device)
    kept, captions = [], []
    for i in range(0, len(records), gen.batch_size):
        chunk = records[i : i + gen.batch_size]
        if store is not None:
            chunk = [r for r in chunk if store.has(manifest.resolve_image(r))]
            if not chunk:
                continue
            x = store.get([manifest.resolve_image(r) for r in chunk])
        else:
            loaded = [(r, pixels(manifest.resolve_image(r))) for r in chunk]
            chunk = [r for r, p in loaded if p is not None]
            if not chunk:
                continue
            x = torch.stack([p for _, p in loaded if p is not None])
        with torch.no_grad():
            feats = model.features(x.to(device))
            ids = beam_search(
                model.decoder,
                feats,
                beam_size=beam,
                max_len=gen.max_new_tokens,
                length_penalty=gen.length_penalty,
            )
        for r, seq in zip(chunk, ids, strict=True):
            text = vocab.decode(seq)
            captions.append(lang.desegment(text) if recipe.data.segment != "none" else text)
            kept.append(r)
    return kept, captions


def evaluate_baseline(
    run_dir: str | Path, overrides=(), *, split: str | None = None, progress: bool = True
) -> dict:
    """Caption the held-out split with the baseline and score it exactly as `vicap evaluate` does."""
    from accelerate import Accelerator

    from vicap.evaluate import caption_report, held_out_records
    from vicap.pipeline import prepare_manifest

    recipe, model, vocab, step = load_baseline_run(run_dir, overrides)
    run_dir = Path(run_dir)
    split = split or recipe.eval.split
    manifest = prepare_manifest(recipe, run_dir)
    records = held_out_records(manifest, split, recipe.eval.max_images)
    device = Accelerator(cpu=recipe.train.device == "cpu").device
    store = None
    if not recipe.encoder.trainable:
        store = frozen_feature_store(recipe, model, manifest, progress=progress, device=device)
    kept, captions = caption_records(recipe, model, vocab, manifest, records, store=store, device=device)
    return caption_report(
        run_dir=run_dir,
        kind="baseline",
        system=f"CNN+LSTM ({recipe.decoder.type})",
        step=step,
        split=split,
        manifest=manifest,
        records=kept,
        captions=captions,
        skipped=len(records) - len(kept),
        eval_cfg=recipe.eval,
        generate=recipe.to_dict()["generate"],
    )


def train_baseline_file(path: str | Path, overrides=(), *, progress: bool = True) -> Path:
    return train_baseline(load_baseline_recipe(path, overrides), progress=progress)


__all__ = [
    "evaluate_baseline",
    "load_baseline_run",
    "train_baseline",
    "train_baseline_file",
]
