"""Mixed precision of a training step (``--amp``): the mode, its autocast and grad scaler.

Modes: 'off' (fp32); 'bf16', the model's fast path (``forward(..., fast=True)``:
autocast bf16 inside MaskRCNN, no loss scaling); 'fp16' on GPUs without bf16
(autocast fp16 around the forward, loss scaled by a GradScaler).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from maskrcnn.model import fast_dtype


def amp_mode(amp: bool, device: torch.device) -> str:
    """'off', 'bf16' (the model's fast path: autocast bf16 + channels_last) or 'fp16' (+ scaler)."""
    if not amp:
        return "off"
    # Fast mode's own choice (maskrcnn.model.fast_dtype): fp16 where bf16 is only emulated
    # (CUDA before Ampere), which torch.cuda.is_bf16_supported() counts as supported.
    return "fp16" if fast_dtype(device) == torch.float16 else "bf16"


def fast_path(mode: str) -> bool:
    """Whether the model runs its own fast path (``fast=True``) in this mode."""
    return mode == "bf16"


def autocast(mode: str, device: torch.device) -> Any:
    """The context the forward runs in: fp16 autocast in mode 'fp16', else nothing."""
    if mode == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled (loss scaling) in mode 'fp16' only."""
    return torch.amp.GradScaler(device.type, enabled=mode == "fp16")
