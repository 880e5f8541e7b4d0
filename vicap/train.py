"""Training: one readable loop through Hugging Face Accelerate.

The same command runs on one CPU, one GPU, or under `accelerate launch` on many. Sections:
setup (recipe, data, features, model) -> loop (AdamW, warmup + linear decay, clipping) -> save.

Scale, and why a recipe trains the same on 1 or N processes:
- `train.batch_size` is the global batch. `GlobalBatches` cuts one seeded shuffle into global batches
  and gives each process a contiguous slice, so N processes see exactly the captions one process
  would, step for step.
- Every learned token of an optimizer step weighs the same: each micro-batch's summed token loss is
  divided by the token count of the whole step (all accumulation micro-batches on all processes,
  one all-reduce of a scalar), then multiplied by N because DDP averages gradients over processes.
  The gradient is then exactly d(mean token loss of the global batch), whatever the split.
- The scheduler is stepped unwrapped, once per optimizer step, whatever the process count.
- Gradient accumulation is done here (DDP's no_sync on all but the last micro-batch), not by
  Accelerate, because the normalisation above needs the whole step's token count up front.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
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
from vicap.data import Collator, GlobalBatches, build_pairs, optimizer_steps
from vicap.decoders import load_decoder
from vicap.mappers import MAPPERS
from vicap.model import CaptionModel
from vicap.pipeline import prepare_manifest, run_features
from vicap.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def linear_warmup_decay(warmup: int, total: int):
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total` (HF's linear schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def build_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; PyTorch's fused implementation where the parameters allow
    it (one kernel for the whole update instead of a pass per op: ~3x faster on CPU for ClipCap's 54M
    mapper parameters), the default implementation otherwise. Same update rule, same state dict."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def optimizer_step(
    model, optimizer, scheduler, window: list[dict], accelerator, *, grad_clip: float, params
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `window` (this process's micro-batches of one global step).

    Returns (this process's summed token loss, the step's token count over all processes).
    """
    world = accelerator.num_processes
    # attention_mask marks exactly the learned tokens (caption + EOS), so this is the step's denominator.
    n_tokens = accelerator.reduce(sum(b["attention_mask"].sum() for b in window).float(), "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        sync = i == len(window) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(**batch)
            accelerator.backward(out["loss_sum"] * world / n_tokens)
        loss_sum += out["loss_sum"].detach()
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()  # unwrapped: one step per optimizer step, whatever the process count
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens


@torch.no_grad()
def mean_loss(model, loader, accelerator) -> float:
    """Mean token loss over a (sharded) loader, summed over all processes."""
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for batch in loader:
        out = model(**_to(batch, accelerator.device))
        total += out["loss_sum"].float()
        count += out["tokens"]
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count.clamp(min=1))


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the recipe's mapper (and LM or its LoRA adapters when tuned); returns the run directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    # Accelerate keeps one process-wide state and refuses a second, different mixed-precision or
    # device setting. A process may train several recipes (the demo, notebooks, tests), so forget the
    # previous run's settings; the distributed setup (PartialState, the process group) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes

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
    if cfg.batch_size < world:
        raise RecipeError(
            f"train.batch_size = {cfg.batch_size} is the global batch, split over {world} processes; "
            f"it must be at least {world}"
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    accelerator.wait_for_everyone()

    # The main process writes the manifest and encodes the features; the others then find both on disk.
    with accelerator.main_process_first():
        manifest = prepare_manifest(recipe, run_dir)
        store = run_features(recipe, manifest, device=accelerator.device, progress=progress and main)
    if MAPPERS.get(recipe.mapper.type).uses_tokens and not store.has_tokens:
        raise RecipeError(
            f"mapper.type = {recipe.mapper.type!r} attends to patch tokens, but the feature store holds "
            "pooled vectors only: set encoder.patch_tokens = true"
        )
    decoder = load_decoder(recipe.decoder)
    set_seed(cfg.seed)  # again: feature extraction may or may not have drawn from the RNG
    model = CaptionModel.from_recipe(recipe, store.dim, decoder)

    def loader_for(split: str, shuffle: bool) -> DataLoader | None:
        records = manifest.split(split)
        if not records:
            return None
        pairs = build_pairs(
            manifest, records, store, decoder, segment=recipe.data.segment, max_tokens=recipe.data.max_tokens
        )
        batches = GlobalBatches(
            len(pairs), cfg.batch_size, shuffle=shuffle, seed=cfg.seed, rank=rank, world=world
        )
        return DataLoader(pairs, batch_sampler=batches, collate_fn=Collator(store, decoder.pad_token_id))

    train_loader = loader_for("train", shuffle=True)
    if train_loader is None:
        raise ValueError(f"manifest {manifest.path} has no 'train' split")
    val_loader = loader_for("val", shuffle=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(trainable, cfg.lr, cfg.weight_decay)
    steps_per_epoch = optimizer_steps(len(train_loader.batch_sampler), cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(cfg.warmup_steps, total_steps)
    )
    if ckpt is not None:
        model.load_trainable(load_model_state(ckpt))
        load_trainer_state(ckpt, optimizer, scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    pairs = train_loader.dataset
    log.info(
        "training %s: %d captions of %d images, %d steps (%d/epoch), global batch %d x %d accumulation "
        "over %d process(es), %s trainable of %s parameters",
        run_dir,
        len(pairs),
        len(set(pairs.rows.tolist())),
        total_steps,
        steps_per_epoch,
        cfg.batch_size,
        cfg.grad_accum,
        world,
        f"{n_trainable:,}",
        f"{n_total:,}",
    )

    # ---------------------------------------------------------------- loop
    step = ckpt.step if ckpt else 0
    log_file = (run_dir / "train_log.jsonl").open("a", encoding="utf-8") if main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    # Since the last log line: this process's summed token loss, and all processes' token count.
    running = torch.zeros((), device=accelerator.device)
    running_tokens = torch.zeros((), device=accelerator.device)
    t0 = time.time()

    def log_line(**row) -> None:
        if log_file is not None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    # One row per (re)start: how this stretch of training was run.
    log_line(
        step=step,
        event="resume" if ckpt else "start",
        processes=world,
        global_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
    )

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
        accelerator.wait_for_everyone()

    model.train()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        done_in_epoch = step - epoch * steps_per_epoch  # optimizer steps already taken (resuming)
        train_loader.batch_sampler.set_epoch(epoch, start=done_in_epoch * cfg.grad_accum)
        batches = iter(train_loader)
        while window := list(itertools.islice(batches, cfg.grad_accum)):
            window = [_to(b, accelerator.device) for b in window]
            if cfg.feature_noise > 0:  # CapDec: train on noisy image features, caption clean ones
                for b in window:
                    b["features"] = b["features"] + cfg.feature_noise * torch.randn_like(b["features"])
            loss_sum, n_tokens = optimizer_step(
                model, optimizer, scheduler, window, accelerator, grad_clip=cfg.grad_clip, params=trainable
            )
            running += loss_sum
            running_tokens += n_tokens
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                avg = float(accelerator.reduce(running, "sum") / running_tokens)
                bar.set_postfix(loss=f"{avg:.4f}", epoch=epoch)
                log_line(
                    step=step,
                    epoch=epoch,
                    loss=round(avg, 6),
                    lr=scheduler.get_last_lr()[0],
                    elapsed=round(time.time() - t0, 2),
                )
                running.zero_()
                running_tokens.zero_()
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
