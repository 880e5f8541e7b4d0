"""Training: one readable loop through Hugging Face Accelerate, for every captioner vicap trains.

The same command runs on one CPU, one GPU, or under `accelerate launch` on many. A `TrainJob` holds
what differs between captioners (the ClipCap model and its caption pairs here, the CNN+LSTM in
`vicap.baseline.train`); `fit` is the loop they share:

    start_run (checkpoints, resume checks, recipe file) -> fit: setup (loaders, AdamW, schedule,
    resume state) -> loop (optimizer_step per global batch, log, validate, save) -> done

Scale, and why a recipe trains the same on 1 or N processes:
- `train.batch_size` is the global batch. `GlobalBatches` cuts one seeded shuffle into global batches
  and gives each process a contiguous slice, so N processes see exactly the items one process
  would, step for step.
- Every learned token of an optimizer step weighs the same: each micro-batch's summed token loss is
  divided by the token count of the whole step (all accumulation micro-batches on all processes,
  one all-reduce of a scalar), then multiplied by N because DDP averages gradients over processes.
  The gradient is then exactly d(mean token loss of the global batch), whatever the split.
- The scheduler is stepped unwrapped, once per optimizer step, whatever the process count.
- Gradient accumulation is done here (DDP's no_sync on all but the last micro-batch), not by
  Accelerate, because the normalisation above needs the whole step's token count up front.

Exact resume: data order comes from (seed, epoch, step) alone, the loaders draw from their own
generators (never the global RNG), and each process's torch RNG state (dropout, noise) is saved in
the checkpoint, so a run killed and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data_prep.textio import write_atomic
from vicap.checkpoint import (
    VICAP_RUN,
    Checkpoint,
    CheckpointError,
    RunKind,
    check_compatible,
    list_checkpoints,
    load_model_state,
    load_trainer_state,
    read_checkpoint,
    read_selection,
    recipe_differences,
    save_checkpoint,
)
from vicap.data import GlobalBatches, optimizer_steps
from vicap.errors import RunExistsError, TrainingError  # noqa: F401  (raised here; importable from here too)
from vicap.recipe import RecipeError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- what differs per captioner


class TrainableModel(Protocol):
    """The model side of a TrainJob."""

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """A collated batch -> {"loss_sum": summed token loss, "tokens": learned tokens, ...}."""

    def learned_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many tokens of `batch` are learned (counted before the forward pass)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: only what training changes."""

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None: ...


# On resume, the run continues exactly as saved: the train and data settings must be the saved ones,
# except these, which change where things are written or how often, not what is learned.
RESUME_FREE = (
    "train.output_dir",
    "train.device",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.patience",
    "data.features_dir",
)


@dataclass
class TrainJob:
    """Everything `fit` needs that differs between captioners."""

    kind: RunKind
    recipe: Any  # has .train (the shared train keys) and .to_json()
    run_dir: Path
    model: nn.Module  # a TrainableModel
    train_set: Dataset
    val_set: Dataset | None
    collate: Callable[[list], dict[str, torch.Tensor]]
    param_groups: list[dict]  # trainable parameters; a group may set its own "lr"
    meta: dict[str, str] = field(default_factory=dict)  # the kind's checkpoint metadata
    augment: Callable[[dict], dict] | None = None  # applied to training batches only
    summary: str = ""  # for the log: what is trained on what
    # Captions of the validation images by the (unwrapped) model: ({image: references}, {image:
    # caption}), scored by `fit` to select the best checkpoint; None when there is no validation split.
    val_captions: Callable[[nn.Module, int], tuple[dict, dict]] | None = None
    language: str = ""  # of the captions: how validation captions are scored
    # Each training item's image, when global batches are formed of whole images (train.group_by_image).
    images: Any = None


@dataclass
class Selection:
    """Which checkpoint is the run's result (train.select) and when to stop early (train.patience).

    Saved with every checkpoint, so a resumed run keeps its best and its patience count, and
    `vicap.checkpoint.pick_checkpoint` finds the best one from the newest checkpoint."""

    metric: str  # "CIDEr-D+BLEU-4", "loss" or "last"
    best_value: float | None = None
    best_step: int | None = None
    since_best: int = 0  # validations in a row without a better score

    @classmethod
    def for_job(cls, job: TrainJob) -> Selection:
        cfg = job.recipe.train
        if job.val_captions is None:
            if cfg.select not in ("", "last") or cfg.patience or cfg.val_every or cfg.val_max_images:
                raise RecipeError(
                    f"train.select = {cfg.select!r}, train.patience = {cfg.patience}, train.val_every = "
                    f"{cfg.val_every}, train.val_max_images = {cfg.val_max_images}: these need a validation "
                    "split (set data.val_fraction, or give the manifest a 'val' split)"
                )
            return cls("last")
        if cfg.select == "loss" and job.val_set is None:
            raise RecipeError(
                "train.select = 'loss': this training has no validation loss; select by a metric"
            )
        return cls(cfg.select or "CIDEr-D+BLEU-4")

    @property
    def scored(self) -> list[str]:
        """The metric columns summed into the selection score (none for 'loss' and 'last')."""
        return [] if self.metric in ("loss", "last") else self.metric.split("+")

    def update(self, value: float, step: int) -> bool:
        better = self.best_value is None or (
            value < self.best_value if self.metric == "loss" else value > self.best_value
        )
        if better:
            self.best_value, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better


# --------------------------------------------------------------------------- pieces of the loop


def linear_warmup_decay(warmup: int, total: int):
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total` (HF's linear schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def build_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (or parameter groups); PyTorch's fused implementation where
    the parameters allow it (one kernel for the whole update instead of a pass per op: ~3x faster on
    CPU for ClipCap's 54M mapper parameters), the default implementation otherwise. Same update rule,
    same state dict."""
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

    Returns (this process's summed token loss, the step's token count over all processes, this
    process's sums of the model's other figures: `out["stats"]`, e.g. SCST's rewards). Raises
    TrainingError, before any weight changes, when the loss or the gradient is not finite.
    """
    world = accelerator.num_processes
    count = accelerator.unwrap_model(model).learned_tokens
    n_tokens = accelerator.reduce(sum(count(b) for b in window).float(), "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(window):
        sync = i == len(window) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(**batch)
            accelerator.backward(out["loss_sum"] * world / n_tokens)
        loss_sum += out["loss_sum"].detach().float()
        for k, v in out.get("stats", {}).items():
            stats[k] = stats.get(k, 0) + v.detach().float().to(accelerator.device)
    # Any process's non-finite loss stops every process, before the update (one scalar all-reduce).
    bad_loss = bool(accelerator.reduce((~torch.isfinite(loss_sum)).float(), "sum"))
    # A finite loss can still give an infinite gradient, so the gradient norm is checked too (it is
    # all-reduced already). Under fp16, Accelerate's loss scaler skips such steps by design.
    norm = None
    if grad_clip > 0:
        norm = accelerator.clip_grad_norm_(params, grad_clip)
    elif accelerator.mixed_precision != "fp16":
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad_grad = norm is not None and accelerator.mixed_precision != "fp16" and not bool(torch.isfinite(norm))
    if bad_loss or bad_grad:
        optimizer.zero_grad(set_to_none=True)
        what, value = ("loss", float(loss_sum)) if bad_loss else ("gradient norm", float(norm))
        raise TrainingError(f"the {what} is {value} (not finite)")
    optimizer.step()
    scheduler.step()  # unwrapped: one step per optimizer step, whatever the process count
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens, stats


class _Running:
    """Since the last log row: this process's summed loss and other figures, and all processes' count
    of what the loss is averaged over (tokens; SCST: sampled captions)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.count = torch.zeros((), device=self.device)
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.loss += loss_sum
        self.count += count
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v

    def means(self, accelerator) -> dict[str, float]:
        """{"loss": ..., and each figure}: averages over all processes; then starts again."""
        sums = {"loss": self.loss, **self.stats}
        out = {k: round(float(accelerator.reduce(v.clone(), "sum") / self.count), 6) for k, v in sums.items()}
        self.reset()
        return out


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


def make_accelerator(cfg):
    """An Accelerator for the recipe's train section (device, mixed precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state and refuses a second, different mixed-precision or
    # device setting. A process may train several recipes (the demo, notebooks, tests), so forget the
    # previous run's settings; the distributed setup (PartialState, the process group) is kept.
    AcceleratorState._reset_state()
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)


def start_run(kind: RunKind, recipe, accelerator, *, resume: bool) -> Checkpoint | None:
    """Check the run directory against --resume and the recipe; write the resolved recipe file.

    Returns the checkpoint to resume from (None for a fresh run). A fresh run refuses a directory
    that holds checkpoints; a resume refuses a recipe whose model, train or data settings differ from
    the checkpoint's (naming each key), since the run would no longer continue what was saved."""
    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise RunExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue, or choose "
            "another train.output_dir"
        )
    ckpt = None
    if resume and existing:
        ckpt = read_checkpoint(existing[-1], kind=kind)
        check_compatible(ckpt, recipe, kind)
        run_diffs = recipe_differences(
            ckpt.recipe.to_dict(),
            recipe.to_dict(),
            [k for k in ("train", "data", "scst", "text", "pairs", "mix") if k in type(recipe).sections()],
            allowed=RESUME_FREE,
        )
        if run_diffs:
            raise CheckpointError(
                f"--resume continues {run_dir} exactly as it was saved, but the recipe changes how it "
                "trains:\n  " + "\n  ".join(run_diffs) + "\nResume without these changes, or train a "
                "new run (another train.output_dir) with them."
            )
    elif resume:
        log.info("%s: no checkpoint to resume from; starting a new run", run_dir)
    world = accelerator.num_processes
    if cfg.batch_size < world:
        raise RecipeError(
            f"train.batch_size = {cfg.batch_size} is the global batch, split over {world} processes; "
            f"it must be at least {world}"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / kind.recipe_file, recipe.to_toml())
    accelerator.wait_for_everyone()
    return ckpt


def _loader(job: TrainJob, dataset: Dataset, *, shuffle: bool, rank: int, world: int) -> DataLoader:
    cfg = job.recipe.train
    lengths = None
    if shuffle and cfg.group_by_length:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise RecipeError(
                f"train.group_by_length = true, but this training's items ({type(dataset).__name__}) are "
                "not captions of their own length; set it to false"
            )
    batches = GlobalBatches(
        len(dataset),
        cfg.batch_size,
        shuffle=shuffle,
        seed=cfg.seed,
        rank=rank,
        world=world,
        lengths=lengths,
        images=job.images if shuffle else None,
        parts=_mix_parts(dataset) if shuffle else None,
    )
    # The loader's own generator: iterating it never draws from the global RNG (dropout's), which
    # would put a resumed run's dropout masks out of step.
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=job.collate, generator=torch.Generator().manual_seed(0)
    )


def _mix_parts(dataset: Dataset) -> tuple[list[int], list[int]] | None:
    """The sizes of a mixed training set's sources and each one's items per global batch (recipe
    [mix]), or None when its sources mix by size."""
    counts = getattr(dataset, "counts", None)
    return None if counts is None else ([len(p) for p in dataset.parts], counts)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: torch's CPU generator and, on an accelerator, the device's own
    (dropout on a GPU draws from that one)."""
    states = {"torch": torch.get_rng_state()}
    if device.type != "cpu":
        states[device.type] = torch.get_device_module(device.type).get_rng_state()
    return states


def _set_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type in states:
        torch.get_device_module(device.type).set_rng_state(states[device.type])


def _rng_states(accelerator) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG states, gathered (the main process saves them all)."""
    mine = _rng_state(accelerator.device)
    if accelerator.num_processes == 1:
        return [mine]
    gathered = accelerator.gather({k: v.to(accelerator.device).unsqueeze(0) for k, v in mine.items()})
    return [{k: v[r].cpu() for k, v in gathered.items()} for r in range(accelerator.num_processes)]


def _keep_log_until(path: Path, step: int) -> None:
    """A resumed run's log keeps only the rows up to its checkpoint; what came after was undone."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        write_atomic(path, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- the loop


class TrainLog:
    """`train_log.jsonl`: one JSON row per line (loss, validation, start and resume rows), written by
    the main process only. A resumed run keeps the rows up to its checkpoint (what came after was
    undone); a fresh run starts a fresh log."""

    def __init__(self, path: Path, *, main: bool, resume_step: int | None) -> None:
        self.file = None
        if not main:
            return
        if resume_step is not None:
            _keep_log_until(path, resume_step)
        else:
            path.unlink(missing_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def write(self, **row) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class _Setup:
    """What the loop works with, built by `_setup`."""

    model: nn.Module  # prepared by Accelerate (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    train_loader: DataLoader
    val_loader: DataLoader | None
    steps_per_epoch: int
    total_steps: int
    rng: dict[str, torch.Tensor] | None  # this process's saved RNG states, when resuming


def _setup(job: TrainJob, accelerator, ckpt: Checkpoint | None) -> _Setup:
    """Loaders, AdamW, the warmup + linear decay schedule, and on resume the saved state."""
    cfg = job.recipe.train
    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = _loader(job, job.train_set, shuffle=True, rank=rank, world=world)
    val_loader = _loader(job, job.val_set, shuffle=False, rank=rank, world=world) if job.val_set else None
    model = job.model
    optimizer = build_optimizer(job.param_groups, cfg.lr, cfg.weight_decay)
    steps_per_epoch = optimizer_steps(len(train_loader.batch_sampler), cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(cfg.warmup_steps, total_steps)
    )
    rng = None
    if ckpt is not None:
        try:
            model.load_trainable(load_model_state(ckpt))
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        rng = load_trainer_state(ckpt, optimizer, scheduler, rank=rank)
        if rng is None or world != int(ckpt.meta.get("processes", world)):
            log.warning(
                "resuming on %d process(es) a run saved on %s: dropout and noise draws will differ "
                "from an uninterrupted run",
                world,
                ckpt.meta.get("processes", "?"),
            )
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for g in job.param_groups for p in g["params"]]
    _log_padding(job, train_loader.batch_sampler)
    log.info(
        "training %s: %s; %d steps (%d/epoch), global batch %d x %d accumulation over %d process(es), "
        "%s trainable parameters",
        job.run_dir,
        job.summary or f"{len(job.train_set)} items",
        total_steps,
        steps_per_epoch,
        cfg.batch_size,
        cfg.grad_accum,
        world,
        f"{sum(p.numel() for p in params):,}",
    )
    return _Setup(
        model, optimizer, scheduler, params, train_loader, val_loader, steps_per_epoch, total_steps, rng
    )


def _log_padding(job: TrainJob, batches: GlobalBatches) -> None:
    """How much of the first epoch's batches is padding (and how much it would be without
    train.group_by_length, when that is on)."""
    lengths = getattr(job.train_set, "lengths", None)
    if lengths is None or not len(lengths):
        return
    line = f"padding: {100 * batches.padding(lengths):.1f}% of caption positions"
    if batches.lengths is not None:
        plain = GlobalBatches(
            batches.n,
            batches.batch_size,
            shuffle=True,
            seed=batches.seed,
            world=batches.world,
            images=batches.images,
        )
        line += f" ({100 * plain.padding(lengths):.1f}% without train.group_by_length)"
    log.info(line)


def _validate(job: TrainJob, accelerator, s: _Setup, sel: Selection, *, step: int, epoch: int) -> dict:
    """Validation loss, and the selection score on captions of the validation images; updates `sel`."""
    from vicap.metrics import FAMILIES, score

    row: dict = {"step": step, "epoch": epoch}
    if s.val_loader is not None:
        row["val_loss"] = round(mean_loss(s.model, s.val_loader, accelerator), 6)
    if sel.scored:
        model = accelerator.unwrap_model(s.model)
        model.eval()
        refs, hyps = job.val_captions(model, job.recipe.train.val_max_images)
        model.train()
        families = sorted({f for f, cols in FAMILIES.items() for c in sel.scored if c in cols})
        scores = score(refs, hyps, language=job.language, level=job.recipe.eval.levels[0], metrics=families)
        missing = [c for c in sel.scored if c not in scores]
        if missing:
            raise RecipeError(
                f"train.select = {sel.metric!r}: {', '.join(missing)} cannot be scored here (see the log)"
            )
        row["val"] = {c: round(scores[c], 6) for c in sel.scored}
        value = sum(scores[c] for c in sel.scored)
    else:
        value = row.get("val_loss")
    if value is not None and sel.metric != "last":
        sel.update(value, step)
        row.update(select=round(value, 6), best_step=sel.best_step)
    said = [f"val loss {row['val_loss']:.4f}"] if "val_loss" in row else []
    if "select" in row:
        said.append(f"{sel.metric} {value:.4f} (best {sel.best_value:.4f} at step {sel.best_step})")
    log.info("epoch %d, step %d: %s", epoch, step, ", ".join(said))
    return row


def _save(
    job: TrainJob, accelerator, s: _Setup, *, step: int, epoch: int, sel: Selection | None = None
) -> None:
    """A checkpoint of what was trained, the optimizer, the schedule and every process's RNG."""
    states = _rng_states(accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(
            job.run_dir,
            model_state=accelerator.unwrap_model(s.model).trainable_state_dict(),
            meta={**job.meta, "recipe": job.recipe.to_json(), "processes": str(accelerator.num_processes)},
            step=step,
            epoch=epoch,
            optimizer=s.optimizer,
            scheduler=s.scheduler,
            rng_states=states,
            selection=dataclasses.asdict(sel) if sel is not None else None,
            keep=job.recipe.train.keep_checkpoints,
            protect=[sel.best_step] if sel is not None and sel.best_step is not None else [],
        )
    accelerator.wait_for_everyone()


def _stopped(job: TrainJob, step: int, epoch: int, e: TrainingError) -> TrainingError:
    last = list_checkpoints(job.run_dir)
    return TrainingError(
        f"{job.run_dir}: training stopped at step {step} (epoch {epoch}): {e}. No update was applied; "
        f"the last checkpoint ({last[-1].name if last else 'none'}) is intact. Lower train.lr, set "
        "train.grad_clip, or check the data."
    )


def _windows(s: _Setup, cfg, start: int, device):
    """(epoch, this process's micro-batches of one optimizer step, on `device`) from step `start` on."""
    for epoch in range(start // s.steps_per_epoch, cfg.epochs):
        done = max(0, start - epoch * s.steps_per_epoch)  # optimizer steps already taken (resuming)
        s.train_loader.batch_sampler.set_epoch(epoch, start=done * cfg.grad_accum)
        batches = iter(s.train_loader)
        while window := list(itertools.islice(batches, cfg.grad_accum)):
            yield epoch, [_to(b, device) for b in window]


def fit(job: TrainJob, accelerator, ckpt: Checkpoint | None = None, *, progress: bool = True) -> Path:
    """Train `job.model` on `job.train_set`; checkpoints and the log go to the run directory."""
    cfg = job.recipe.train
    main = accelerator.is_main_process
    s = _setup(job, accelerator, ckpt)
    sel = Selection.for_job(job)
    if ckpt is not None and read_selection(ckpt.path):
        sel = Selection(**read_selection(ckpt.path))
    step = ckpt.step if ckpt else 0
    train_log = TrainLog(job.run_dir / "train_log.jsonl", main=main, resume_step=step if ckpt else None)
    train_log.write(  # one row per (re)start: how this stretch of training was run
        step=step,
        event="resume" if ckpt else "start",
        processes=accelerator.num_processes,
        global_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        mixed_precision=accelerator.mixed_precision,
        # what bit-identical results depend on besides the recipe (README, "Which numbers repeat")
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    bar = tqdm(total=s.total_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    running = _Running(accelerator.device)
    t0 = time.time()
    if s.rng is not None:
        _set_rng_state(s.rng, accelerator.device)  # last, after everything that may draw during setup
    s.model.train()
    for epoch, window in _windows(s, cfg, step, accelerator.device):
        if job.augment is not None:
            window = [job.augment(b) for b in window]
        try:
            running.add(
                *optimizer_step(
                    s.model,
                    s.optimizer,
                    s.scheduler,
                    window,
                    accelerator,
                    grad_clip=cfg.grad_clip,
                    params=s.params,
                )
            )
        except TrainingError as e:
            raise _stopped(job, step + 1, epoch, e) from None
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == s.total_steps:
            means = running.means(accelerator)
            bar.set_postfix(epoch=epoch, **{k: f"{v:.4f}" for k, v in means.items()})
            lr = s.scheduler.get_last_lr()[0]
            train_log.write(step=step, epoch=epoch, **means, lr=lr, elapsed=round(time.time() - t0, 2))
        end_of_epoch = step == (epoch + 1) * s.steps_per_epoch
        validate = (sel.metric != "last" or s.val_loader is not None) and (
            step % cfg.val_every == 0 or step == s.total_steps if cfg.val_every else end_of_epoch
        )
        if validate:  # before the save: the checkpoint's log and selection record have it
            train_log.write(**_validate(job, accelerator, s, sel, step=step, epoch=epoch))
        stop = bool(cfg.patience) and sel.since_best >= cfg.patience
        if end_of_epoch or validate or stop or (cfg.save_every and step % cfg.save_every == 0):
            _save(job, accelerator, s, step=step, epoch=epoch, sel=sel)
        if stop:
            log.info("no better %s in %d validations: stopping at step %d", sel.metric, cfg.patience, step)
            train_log.write(step=step, epoch=epoch, event="early stop", best_step=sel.best_step)
            break
    bar.close()
    train_log.close()
    accelerator.wait_for_everyone()
    return job.run_dir


# --------------------------------------------------------------------------- ClipCap


def _clipcap_data(recipe, accelerator, *, progress: bool):
    """The run's manifest (written by the main process), its training records whose image-caption
    pairs train (`_paired_images`), and the feature store (every process encodes its share of the
    images; training images left out by data.image_fraction are not encoded)."""
    from vicap.mappers import MAPPERS
    from vicap.pipeline import prepare_manifest, run_features

    with accelerator.main_process_first():
        manifest = prepare_manifest(recipe, Path(recipe.train.output_dir))
    paired = _paired_images(recipe, manifest)
    used = {id(r) for r in paired}
    records = [r for r in manifest.records if r.split != "train" or id(r) in used]
    store = run_features(recipe, manifest, progress=progress, accelerator=accelerator, records=records)
    if MAPPERS.get(recipe.mapper.type).uses_tokens and not store.has_tokens:
        raise RecipeError(
            f"mapper.type = {recipe.mapper.type!r} attends to patch tokens, but the feature store holds "
            "pooled vectors only: set encoder.patch_tokens = true"
        )
    return manifest, paired, store


def _val_captions(recipe, manifest, store):
    """`TrainJob.val_captions` for a caption model: the validation images' captions by
    recipe.generate (None when the manifest has no validation images with features)."""
    records = [r for r in manifest.split("val") if store.has(manifest.resolve_image(r))]
    if not records:
        return None

    def val_captions(model, max_images: int) -> tuple[dict, dict]:
        from vicap.generate import generate_captions

        chosen = records[: max_images or None]
        features = store.get([manifest.resolve_image(r) for r in chosen])
        caps = generate_captions(
            model, features, recipe.generate, language=manifest.language, segment=recipe.data.segment
        )
        return {r.image_id: list(r.captions) for r in chosen}, {
            r.image_id: c for r, c in zip(chosen, caps, strict=True)
        }

    return val_captions


def _feature_noise(cfg):
    """CapDec (train.feature_noise, train.feature_noise_kind): train on noisy features (image rows, and
    the sentence embeddings of a text corpus), caption clean image features."""
    if cfg.feature_noise <= 0:
        return None
    # uniform on [-a, a] has std a / sqrt(3): the same std as the Gaussian of the same setting
    half_width = cfg.feature_noise * 3**0.5

    def augment(batch: dict) -> dict:
        x = batch["features"]
        if cfg.feature_noise_kind == "uniform":
            noise = (2 * torch.rand_like(x) - 1) * half_width
        else:
            noise = cfg.feature_noise * torch.randn_like(x)
        return {**batch, "features": x + noise}

    return augment


def _shift_sentences(collate, store, text_rows: np.ndarray, offset: torch.Tensor):
    """A collate that adds the modality offset (text.offset_images) to the sentence rows of a batch."""
    is_text = np.zeros(len(store.features), dtype=bool)
    is_text[text_rows] = True

    def shifted(batch: list) -> dict:
        out = collate(batch)
        mask = torch.from_numpy(is_text[[row for row, _ in batch]])
        out["features"][mask] += offset.to(out["features"].dtype)
        return out

    return shifted


def _clipcap_fields(recipe, manifest, store, model) -> dict:
    """The TrainJob fields of both ClipCap objectives (cross-entropy and self-critical)."""
    return {
        "kind": VICAP_RUN,
        "recipe": recipe,
        "run_dir": Path(recipe.train.output_dir),
        "param_groups": [{"params": [p for p in model.parameters() if p.requires_grad]}],
        "meta": {"format": "vicap-checkpoint-1", "encoder_dim": str(store.dim)},
        "augment": _feature_noise(recipe.train),
        "language": manifest.language,
    }


def clipcap_job(recipe, accelerator, *, progress: bool = True) -> TrainJob:
    """The ClipCap side of training: manifest, features, LM, caption model and caption pairs."""
    from accelerate.utils import set_seed

    from vicap.data import Collator, MixedPairs, build_pairs, build_text_pairs
    from vicap.decoders import load_decoder
    from vicap.model import CaptionModel

    manifest, paired, store = _clipcap_data(recipe, accelerator, progress=progress)
    text_manifest, pairs_manifest, offset = None, None, None
    if recipe.text.source:  # the same store, now holding the corpus's sentences too
        text_manifest, store, offset = _text_data(recipe, accelerator, "text", progress=progress)
    if recipe.pairs.source:  # and the source sentences of the sentence pairs
        pairs_manifest, store, _ = _text_data(recipe, accelerator, "pairs", progress=progress)
    decoder = load_decoder(recipe.decoder)
    set_seed(recipe.train.seed)  # again: feature extraction may or may not have drawn from the RNG
    model = CaptionModel.from_recipe(recipe, store.dim, decoder)
    tokens = {"segment": recipe.data.segment, "max_tokens": recipe.data.max_tokens}

    def pairs(split: str, records=None):
        records = manifest.split(split) if records is None else records
        if not records:
            return None
        return build_pairs(manifest, records, store, decoder, **tokens)

    train_set = pairs("train", paired)
    if train_set is None and text_manifest is None and pairs_manifest is None:
        raise RecipeError(f"manifest {manifest.path} has no 'train' split")
    group = recipe.train.group_by_image
    summary = f"{len(train_set)} captions of {len(set(train_set.rows.tolist()))} images" if train_set else ""
    collate = Collator(store, decoder.pad_token_id, group=group)
    sources = {"image_captions": len(train_set) if train_set else 0, "sentences": 0, "sentence_pairs": 0}
    parts = {"images": train_set} if train_set is not None else {}
    for name, key, m, what in (
        ("text", "sentences", text_manifest, "sentence"),
        ("pairs", "sentence_pairs", pairs_manifest, "sentence pair"),
    ):
        if m is None:
            continue
        part = parts[name] = build_text_pairs(m, store, decoder, **tokens)
        if not len(part):
            raise RecipeError(f"{name}.source = {getattr(recipe, name).source!r}: no usable {what} in it")
        sources[key] = len(part)
        summary = ", ".join(filter(None, [summary, f"{len(part)} {what}s of {getattr(recipe, name).source}"]))
    shares = recipe.mix.counts(recipe.train.batch_size) if recipe.mix.shares else {}
    for name, count in shares.items():
        if count and not len(parts.get(name, ())):  # e.g. no training image of the manifest has features
            raise RecipeError(f"mix.{name} = {getattr(recipe.mix, name)}: no {name} to draw from in this run")
    train_set = MixedPairs(list(parts.values()), [shares[n] for n in parts] if shares else None)
    if len(parts) == 1 and not shares:
        train_set = train_set.parts[0]  # one source: its own pairs, as ever
    if shares:
        summary += "; every global batch " + " + ".join(f"{shares[n]} {n}" for n in parts)
    if offset is not None:
        collate = _shift_sentences(collate, store, parts["text"].rows, offset)
    fields = _clipcap_fields(recipe, manifest, store, model)
    fields["meta"]["sources"] = json.dumps({**sources, "text_only": sources["image_captions"] == 0})
    return TrainJob(
        **fields,
        model=model,
        train_set=train_set,
        val_set=pairs("val"),
        collate=collate,
        summary=summary
        + (" (no images: text-only training)" if not sources["image_captions"] else "")
        + (", each image's prefix computed once per batch" if group else ""),
        val_captions=_val_captions(recipe, manifest, store),
        images=train_set.rows if group else None,
    )


def _paired_images(recipe, manifest) -> list:
    """The training records whose image-caption pairs train: all, or data.image_fraction of the
    images (a seeded by-image subset, the same one for the same seed)."""
    from data_prep.datasets.base import val_images

    records = manifest.split("train")
    fraction = recipe.data.image_fraction
    if fraction >= 1:
        return records
    chosen = val_images([r.image_id for r in records], fraction, recipe.train.seed) if fraction else set()
    kept = [r for r in records if r.image_id in chosen]
    if fraction and not kept:  # rounds to no image: say so rather than train on text alone or fail later
        raise RecipeError(
            f"data.image_fraction = {fraction}: {fraction} of the {len(records)} training images is none; "
            "raise it, or set 0 to train without images"
        )
    log.info("data.image_fraction = %s: %d of %d training images paired", fraction, len(kept), len(records))
    return kept


def _text_data(recipe, accelerator, kind: str, *, progress: bool):
    """The manifest of the text corpus (`kind` "text": text.source) or of the sentence pairs ("pairs":
    pairs.source), the feature store with their sentences, and the modality offset (None without
    text.offset_images, and for sentence pairs)."""
    from vicap.pipeline import prepare_text_manifest, run_text_features

    with accelerator.main_process_first():
        text_manifest = prepare_text_manifest(recipe, Path(recipe.train.output_dir), kind)
    store, offset = run_text_features(recipe, text_manifest, progress=progress, accelerator=accelerator)
    return text_manifest, store, offset


def scst_job(recipe, accelerator, *, progress: bool = True) -> TrainJob:
    """Self-critical training (recipe.scst, see vicap.scst) of the caption model of scst.init_from."""
    from vicap.scst import ImageCollator, Images, Rewarder, SelfCritical, init_model

    manifest, _, store = _clipcap_data(recipe, accelerator, progress=progress)
    model, source = init_model(recipe)
    records = [r for r in manifest.split("train") if store.has(manifest.resolve_image(r))]
    if not records:
        raise RecipeError(f"manifest {manifest.path} has no 'train' images with features")
    keys = [str(i) for i in range(len(records))]
    images = Images([store.row(manifest.resolve_image(r)) for r in records], keys)
    level = recipe.scst.level or recipe.eval.levels[0]
    rewarder = Rewarder(
        {k: list(r.captions) for k, r in zip(keys, records, strict=True)},
        language=manifest.language,
        level=level,
    )
    objective = SelfCritical(model, recipe.scst, recipe.generate, rewarder, keys, segment=recipe.data.segment)
    val_captions = _val_captions(recipe, manifest, store)
    fields = _clipcap_fields(recipe, manifest, store, model)
    fields["meta"]["scst_init"] = source
    return TrainJob(
        **fields,
        model=objective,
        train_set=images,
        val_set=None,  # its loss is the policy loss of samples: no validation loss
        collate=ImageCollator(store, images),
        summary=(
            f"self-critical training from {source}: {len(images)} images x {recipe.scst.samples} samples, "
            f"reward CIDEr-D on {level} tokens, baseline {recipe.scst.baseline}"
        ),
        val_captions=(lambda m, n: val_captions(m.model, n)) if val_captions else None,
    )


def train(recipe, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the recipe's mapper (and LM or its LoRA adapters when tuned), with cross-entropy, or
    self-critically from scst.init_from when that is set; returns the run directory."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe.train)
    set_seed(recipe.train.seed)
    ckpt = start_run(VICAP_RUN, recipe, accelerator, resume=resume)
    make_job = scst_job if recipe.scst.init_from else clipcap_job
    job = make_job(recipe, accelerator, progress=progress)
    return fit(job, accelerator, ckpt, progress=progress)


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
