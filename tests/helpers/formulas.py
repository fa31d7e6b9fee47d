"""What the maskrcnn unit tests check against, written out: the FPN strides and the loss
formulas, shared by the test modules of the heads."""

from __future__ import annotations

import torch
from torch import Tensor

STRIDES = (4, 8, 16, 32, 64)


def smooth_l1(d: Tensor, beta: float) -> Tensor:
    """The smooth-L1 formula, written out: 0.5 d^2 / beta below beta, |d| - beta / 2 above."""
    a = d.abs()
    return torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def bce_with_logits(x: Tensor, y: Tensor) -> Tensor:
    """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], written out (stable form)."""
    return torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
