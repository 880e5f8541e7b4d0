"""Training: one readable loop through Hugging Face Accelerate.

The same command runs on one CPU, one GPU, or under `accelerate launch` on many. Sections:
setup (recipe, data, features, model) -> loop (AdamW, warmup + linear decay, clipping) -> save.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vicap.checkpoint import (
    check_compatible,
    list_checkpoints,
    load_model_state,
    load_trainer_state,
    read_checkpoint,
    save_checkpoint,
)
from vicap.data import Collator, build_pairs
from vicap.decoders import load_decoder
from vicap.model import CaptionModel
from vicap.pipeline import prepare_manifest, run_features
from vicap.recipe import Recipe

log = logging.getLogger(__name__)


def linear_warmup_decay(warmup: int, total: int):
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total` (HF's linear schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@torch.no_grad()
def mean_loss(model, loader, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        out = model(**batch)
        n = batch["attention_mask"].sum()
        total += float(accelerator.reduce(out["loss"].detach() * n, "sum"))
        count += int(accelerator.reduce(n, "sum"))
    model.train()
    return total / max(count, 1)


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the recipe's mapper (and LM when tuned); returns the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    # ---------------------------------------------------------------- setup
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue, or choose "
            "another train.output_dir"
        )
    ckpt = read_checkpoint(existing[-1]) if resume and existing else None
    if ckpt is not None:
        check_compatible(ckpt, recipe)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    accelerator.wait_for_everyone()

    manifest = prepare_manifest(recipe, run_dir)
    store = run_features(recipe, manifest, device=accelerator.device, progress=progress and main)
    decoder = load_decoder(recipe.decoder)
    set_seed(cfg.seed)  # again: feature extraction may or may not have drawn from the RNG
    model = CaptionModel(recipe.mapper, store.dim, decoder, recipe.decoder.tuning)

    def loader_for(split: str, shuffle: bool) -> DataLoader | None:
        records = manifest.split(split)
        if not records:
            return None
        pairs = build_pairs(
            manifest, records, store, decoder, segment=recipe.data.segment, max_tokens=recipe.data.max_tokens
        )
        return DataLoader(
            pairs,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            drop_last=False,
            collate_fn=Collator(store, decoder.pad_token_id),
        )

    train_loader = loader_for("train", shuffle=True)
    if train_loader is None:
        raise ValueError(f"manifest {manifest.path} has no 'train' split")
    val_loader = loader_for("val", shuffle=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # ceil(batches / grad_accum) optimizer steps per epoch, per process
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(cfg.warmup_steps, total_steps)
    )
    if ckpt is not None:
        model.load_trainable(load_model_state(ckpt))
        load_trainer_state(ckpt, optimizer, scheduler)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    pairs = train_loader.dataset
    log.info(
        "training %s: %d captions of %d images, %d steps (%d/epoch), %s trainable of %s parameters",
        run_dir,
        len(pairs),
        len(set(pairs.rows.tolist())),
        total_steps,
        steps_per_epoch,
        f"{n_trainable:,}",
        f"{n_total:,}",
    )

    # ---------------------------------------------------------------- loop
    step = ckpt.step if ckpt else 0
    log_file = (run_dir / "train_log.jsonl").open("a", encoding="utf-8") if main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    running, seen, t0 = 0.0, 0, time.time()

    def log_line(**row) -> None:
        if log_file is not None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    def save(epoch: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(
                run_dir,
                model_state=accelerator.unwrap_model(model).trainable_state_dict(),
                recipe=recipe,
                encoder_dim=store.dim,
                step=step,
                epoch=epoch,
                optimizer=optimizer,
                scheduler=scheduler,
                keep=cfg.keep_checkpoints,
            )

    model.train()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        done_in_epoch = (step - epoch * steps_per_epoch) * cfg.grad_accum
        batches = (
            accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        )
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch)["loss"]
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()  # a no-op while accumulating
                if accelerator.sync_gradients:
                    scheduler.step()  # unwrapped: one step per optimizer step, whatever the process count
                optimizer.zero_grad(set_to_none=True)
            running += float(loss.detach())
            seen += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                avg = running / seen
                bar.set_postfix(loss=f"{avg:.4f}", epoch=epoch)
                log_line(
                    step=step,
                    epoch=epoch,
                    loss=round(avg, 6),
                    lr=scheduler.get_last_lr()[0],
                    elapsed=round(time.time() - t0, 2),
                )
                running, seen = 0.0, 0
            if cfg.save_every and step % cfg.save_every == 0:
                save(epoch)
        if val_loader is not None:
            val = mean_loss(model, val_loader, accelerator)
            log_line(step=step, epoch=epoch, val_loss=round(val, 6))
            log.info("epoch %d: val loss %.4f", epoch, val)
        if not cfg.save_every or step % cfg.save_every:
            save(epoch)
    bar.close()
    if log_file is not None:
        log_file.close()
    accelerator.wait_for_everyone()
    return run_dir


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
