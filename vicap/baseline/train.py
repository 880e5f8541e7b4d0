"""Training and evaluating the CNN+LSTM baseline on a vicap manifest.

`baseline_job` builds what differs from a ClipCap run (manifest, vocabulary, images or cached CNN
features, the CNN+LSTM and its token loss); `vicap.train.fit` trains it with the same loop, global
batches (one item = an image with all its captions), per-token loss, checkpoints and exact resume as
vicap's own runs. Evaluation captions the held-out split with beam search and hands the captions to
`vicap.evaluate.score_report` and `write_report`, the code path vicap's own runs use.

Run directory:
  baseline.toml                      the resolved recipe (kind = "baseline")
  manifest.jsonl, manifest.report.json
  vocab.json (+ spm.model)           the vocabulary
  checkpoints/step_XXXXXXXX/         vicap.checkpoint's layout: model.safetensors (decoder weights,
                                     + the CNN when it is trained or random; metadata: format, recipe
                                     JSON, step, epoch, vocabulary size) and the trainer state
  train_log.jsonl                    {"step", "epoch", "loss", "lr", "elapsed"} and {"val_loss"} rows
  report.json, report.md, captions_<split>.jsonl   from `vicap baseline evaluate`
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from data_prep.languages import get_language
from data_prep.manifest import Manifest, Record
from vicap.baseline.model import CNNLSTM, beam_search, image_transform
from vicap.baseline.recipe import BaselineRecipe, baseline_from_json, load_baseline_recipe
from vicap.baseline.vocab import EOS, Vocab, build_vocab, caption_tokens, load_vocab
from vicap.checkpoint import (
    Checkpoint,
    CheckpointError,
    RunKind,
    check_compatible,
    load_model_state,
    pick_checkpoint,
    read_checkpoint,
)
from vicap.encoders import Encoder
from vicap.images import ImageError, load_image
from vicap.metrics import map_grouped
from vicap.recipe import RecipeError
from vicap.resolve import file_identity
from vicap.train import TrainJob, fit, make_accelerator, start_run

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
    recipe: BaselineRecipe,
    model: CNNLSTM,
    manifest: Manifest,
    *,
    progress: bool,
    device="cpu",
    accelerator=None,
):
    """Regions of every manifest image through the frozen CNN, cached in vicap's feature store (one row
    of grid*grid*C floats per image, keyed by the CNN, its weights and the preprocessing; for
    cnn = "timm", vicap's timm encoder's own rows)."""
    from vicap.features import extract_features
    from vicap.pipeline import report_failures, sharing

    # cnn = "timm" is vicap's own timm encoder: its store rows are the ones a vicap run wrote
    encoder = model.encoder.vicap_encoder or _baseline_encoder(recipe, model)
    paths = [manifest.resolve_image(r) for r in manifest.records]
    store = extract_features(
        encoder,
        paths,
        recipe.data.features_dir,
        batch_size=recipe.encoder.batch_size,
        **sharing(accelerator, device, progress),
    )
    if accelerator is None or accelerator.is_main_process:
        report_failures(store, len(paths))
    return store


def _baseline_encoder(recipe: BaselineRecipe, model: CNNLSTM) -> Encoder:
    """A torchvision (or tiny) CNN's regions as a store encoder, keyed by the CNN, its weights and the
    preprocessing."""
    cfg = recipe.encoder
    if cfg.weights == "imagenet":
        import torchvision

        # the weights' own name, e.g. ResNet50_Weights.IMAGENET1K_V2, so a new default gets a new store
        weights = str(torchvision.models.get_model_weights(cfg.cnn).DEFAULT)
    elif cfg.weights == "none":
        # random weights: drawn first from the run's seed (the CNN is built before the decoder)
        weights = f"none:seed{recipe.train.seed}"
    else:
        weights = file_identity(Path(cfg.weights))
    return Encoder(
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


# --------------------------------------------------------------------------- data


def _encode(records: list[Record], language: str, segment: str, vocab: Vocab | None, max_tokens: int):
    """Tokens of every caption of `records` (segmented once), and their ids when a vocab is given."""
    out = map_grouped(lambda texts: caption_tokens(texts, language, segment), [r.captions for r in records])
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


# --------------------------------------------------------------------------- the model as training sees it


def _cnn_in_checkpoint(recipe: BaselineRecipe) -> bool:
    """The CNN is saved when it was trained, or randomly initialised (nothing else could rebuild it)."""
    return recipe.encoder.trainable or recipe.encoder.weights == "none"


class BaselineCaptioner(nn.Module):
    """The CNN+LSTM with its token loss: what `vicap.train.fit` trains (see `vicap.train.TrainableModel`)."""

    def __init__(self, model: CNNLSTM, recipe: BaselineRecipe) -> None:
        super().__init__()
        self.model = model
        self.cnn_frozen = not recipe.encoder.trainable
        self.save_cnn = _cnn_in_checkpoint(recipe)
        if self.cnn_frozen:
            model.encoder.requires_grad_(False)

    def forward(self, images, inputs, labels, image_index) -> dict[str, torch.Tensor]:
        logits = self.model(images, inputs, image_index)
        loss_sum = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return {"loss_sum": loss_sum, "tokens": (labels != -100).sum()}

    @staticmethod
    def learned_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def train(self, mode: bool = True) -> BaselineCaptioner:
        super().train(mode)
        if self.cnn_frozen:
            self.model.encoder.eval()  # frozen: BatchNorm statistics stay put
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what cannot be rebuilt from the recipe: the decoder, and the CNN when trained or random."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.model.state_dict().items()
            if k.startswith("decoder.") or self.save_cnn
        }

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith("decoder.") or self.save_cnn]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


BASELINE_RUN = RunKind(
    format=FORMAT,
    recipe_file=RECIPE_FILE,
    parse_recipe=baseline_from_json,
    model_sections=("encoder", "decoder", "vocab"),
    free_keys=("encoder.batch_size",),
)


# --------------------------------------------------------------------------- train


def baseline_job(recipe: BaselineRecipe, accelerator, *, resume: bool, progress: bool = True) -> TrainJob:
    """The baseline side of training: manifest, vocabulary, CNN+LSTM, images (or cached CNN features)."""
    from accelerate.utils import set_seed

    from vicap.pipeline import prepare_manifest

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    with accelerator.main_process_first():
        manifest = prepare_manifest(recipe, run_dir)  # the same adapter + manifest as a ClipCap run
    language, segment, max_tokens = manifest.language, recipe.data.segment, recipe.data.max_tokens
    train_records, val_records = manifest.split("train"), manifest.split("val")
    if not train_records:
        raise RecipeError(f"manifest {manifest.path} has no 'train' split")
    tokens, _ = _encode(train_records, language, segment, None, max_tokens)
    if resume and (run_dir / "vocab.json").is_file():
        vocab = load_vocab(run_dir)  # the vocabulary the checkpoint was trained with
    else:
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                build_vocab([t for toks in tokens for t in toks], recipe.vocab, run_dir)
        vocab = load_vocab(run_dir)
    train_ids = [[vocab.encode(t)[: max_tokens - 1] + [EOS] for t in toks] for toks in tokens]
    set_seed(cfg.seed)
    model = CNNLSTM(recipe.encoder, recipe.decoder, len(vocab))
    captioner = BaselineCaptioner(model, recipe)
    if recipe.encoder.trainable:
        store, pixels = None, _Pixels(recipe)
    else:
        model.encoder.eval()
        store = frozen_feature_store(recipe, model, manifest, progress=progress, accelerator=accelerator)
        pixels = None
    train_set = _dataset(recipe, manifest, train_records, train_ids, store, pixels)
    val_set = None
    if val_records:
        _, val_ids = _encode(val_records, language, segment, vocab, max_tokens)
        val_set = _dataset(recipe, manifest, val_records, val_ids, store, pixels)

    def val_captions(captioner: BaselineCaptioner, max_images: int) -> tuple[dict, dict]:
        records = val_records[: max_images or None]
        kept, caps = caption_records(
            recipe, captioner.model, vocab, manifest, records, store=store, device=accelerator.device
        )
        return {r.image_id: list(r.captions) for r in kept}, {
            r.image_id: c for r, c in zip(kept, caps, strict=True)
        }

    groups = [{"params": list(model.decoder.parameters()), "lr": cfg.lr}]
    if recipe.encoder.trainable:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.cnn_lr})
    return TrainJob(
        kind=BASELINE_RUN,
        recipe=recipe,
        run_dir=run_dir,
        model=captioner,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        param_groups=groups,
        meta={"format": FORMAT, "vocab_size": str(len(vocab))},
        summary=(
            f"{len(train_set)} images, {sum(len(c) for c in train_set.captions)} captions, "
            f"vocabulary {len(vocab)} ({vocab.kind})"
        ),
        val_captions=val_captions if val_records else None,
        language=language,
    )


def train_baseline(recipe: BaselineRecipe, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the CNN+LSTM baseline through vicap's training loop; returns the run directory."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe.train)
    set_seed(recipe.train.seed)
    ckpt = start_run(BASELINE_RUN, recipe, accelerator, resume=resume)
    job = baseline_job(recipe, accelerator, resume=ckpt is not None, progress=progress)
    return fit(job, accelerator, ckpt, progress=progress)


# --------------------------------------------------------------------------- evaluate


def load_baseline_run(
    run_dir: str | Path, overrides=(), *, checkpoint: str = "best"
) -> tuple[BaselineRecipe, CNNLSTM, Vocab, Checkpoint, str]:
    """The run's recipe (with generate/eval overrides), model at the checkpoint `checkpoint` names (see
    `vicap.checkpoint.pick_checkpoint`), vocabulary, that checkpoint and how it was chosen."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        hint = " (a vicap run: use `vicap evaluate`)" if (run_dir / "recipe.toml").is_file() else ""
        raise RecipeError(f"{run_dir}: not a baseline run directory (no {RECIPE_FILE}){hint}")
    recipe = load_baseline_recipe(run_dir / RECIPE_FILE, overrides)
    path, which = pick_checkpoint(run_dir, checkpoint)
    ckpt = read_checkpoint(path, kind=BASELINE_RUN)
    check_compatible(ckpt, recipe, BASELINE_RUN)
    vocab = load_vocab(run_dir)
    if len(vocab) != int(ckpt.meta.get("vocab_size", -1)):
        raise CheckpointError(
            f"{run_dir}: vocabulary has {len(vocab)} entries, checkpoint {ckpt.meta.get('vocab_size')}"
        )
    captioner = BaselineCaptioner(CNNLSTM(recipe.encoder, recipe.decoder, len(vocab)), recipe)
    try:
        captioner.load_trainable(load_model_state(ckpt))
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    log.info("loaded %s: %s", ckpt.path, which)
    return recipe, captioner.model.eval(), vocab, ckpt, which


def caption_records(
    recipe, model, vocab, manifest, records, *, store=None, device="cpu"
) -> tuple[list[Record], list[str]]:
    """Captions for `records` (those whose image can be read), decoded with recipe.generate on
    `device` (with generate.precision's autocast)."""
    from vicap.device import autocast

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
        with torch.no_grad(), autocast(torch.device(device), gen.precision):
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
    run_dir: str | Path,
    overrides=(),
    *,
    split: str | None = None,
    progress: bool = True,
    device: str | None = None,
    checkpoint: str = "best",
) -> dict:
    """Caption the held-out split with the baseline and score it exactly as `vicap evaluate` does, on
    `device` (default: the recipe's train.device), with the checkpoint `checkpoint` names."""
    from vicap.device import resolve_device
    from vicap.evaluate import held_out_records, score_report, write_report
    from vicap.pipeline import prepare_manifest

    recipe, model, vocab, ckpt, which = load_baseline_run(run_dir, overrides, checkpoint=checkpoint)
    run_dir = Path(run_dir)
    split = split or recipe.eval.split
    manifest = prepare_manifest(recipe, run_dir)
    records = held_out_records(manifest, split, recipe.eval.max_images)
    device = resolve_device(device or recipe.train.device, key="--device" if device else "train.device")
    store = None
    if not recipe.encoder.trainable:
        store = frozen_feature_store(recipe, model, manifest, progress=progress, device=device)
    kept, captions = caption_records(recipe, model, vocab, manifest, records, store=store, device=device)
    report = score_report(
        run_dir=run_dir,
        kind="baseline",
        system=f"CNN+LSTM ({recipe.decoder.type})",
        step=ckpt.step,
        checkpoint=which,
        split=split,
        manifest=manifest,
        records=kept,
        captions=captions,
        skipped=len(records) - len(kept),
        eval_cfg=recipe.eval,
        generate=recipe.to_dict()["generate"],
        device=str(device),
    )
    write_report(run_dir, report, manifest, kept, captions)
    return report


def train_baseline_file(
    path: str | Path, overrides=(), *, resume: bool = False, progress: bool = True
) -> Path:
    return train_baseline(load_baseline_recipe(path, overrides), resume=resume, progress=progress)


__all__ = [
    "evaluate_baseline",
    "load_baseline_run",
    "train_baseline",
    "train_baseline_file",
]
