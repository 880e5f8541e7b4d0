"""Where models run: one rule for every stage that touches a model.

`resolve_device(setting)` turns a recipe's `train.device` or a command's `--device` into a torch
device: 'auto' is this machine's accelerator when torch sees one (a CUDA or ROCm GPU, Apple's MPS,
an XPU, ...) and the CPU otherwise; 'cpu' is the CPU; anything else is a device name torch knows
(cuda:1, mps), checked to exist. Training under `accelerate launch` gets each process's device
from Accelerate instead. `autocast(device, precision)` is the generate.precision setting: bf16 or
fp16 autocast around encoding and decoding, fp32 (no autocast) by default.
"""

from __future__ import annotations

import contextlib

import torch

from vicap.errors import DeviceError  # noqa: F401  (raised here; importable from here too)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _best_accelerator() -> torch.device | None:
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return None


def resolve_device(setting: str = "auto", *, key: str = "--device") -> torch.device:
    """'auto' -> the accelerator if any, else the CPU; 'cpu'; or a named device that must exist."""
    if setting in ("", "auto"):
        return _best_accelerator() or torch.device("cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"{key} = {setting!r}: not a device name (auto, cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if device.type == "cpu":
        return device
    best = _best_accelerator()
    if best is None or best.type != device.type:
        have = f"this machine has {best.type}" if best is not None else "this machine has no accelerator"
        raise DeviceError(f"{key} = {setting!r}: {have}; use auto or cpu")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{key} = {setting!r}: there are {count} {device.type} device(s) (0..{count - 1})")
    return device


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on `device` for generate.precision; a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype)
    except RuntimeError as e:  # a dtype this device's autocast does not support
        raise DeviceError(f"generate.precision = {precision!r} is not supported on {device}: {e}") from None
