"""Mask targets for training and pasting of predicted masks into the image.

Pasting follows the usual Mask R-CNN convention (as torchvision's): the
M x M mask is padded by one pixel, its box grown by (M + 2) / M about the
centre and snapped to whole pixels, and the padded mask is resized
bilinearly (half-pixel centres) to that box. Here it is done for all masks
of a batch at once: resizing is separable, so every mask is first resized
along x onto the image's columns, then along y onto its rows, by gathering
the two neighbours with their weights (zero outside the box).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# Elements of one chunk of float work while pasting (about 256 MB of fp32).
PASTE_CHUNK_ELEMENTS = 64 * 1024 * 1024


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """Binary targets of the RoIs: float32 [K, size, size].

    gt_masks: uint8/bool [G, H, W] of one image; boxes: [K, 4] RoIs in the
    same pixels; matched: int64 [K] index of each RoI's ground-truth mask.
    A target pixel is 1 where the ground-truth mask covers at least half of it.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(
        gt_masks[:, None].float(), rois, (size, size), 1.0, sampling_ratio=2, aligned=True
    )
    return (crops[:, 0] >= 0.5).float()


def _interp_indices(lo: Tensor, hi: Tensor, length: int, m: int):
    """Bilinear source indices and weights of an m-long signal resized onto [lo, hi].

    lo, hi: int64 [N] inclusive pixel range of each box on a length-long axis
    (may leave the image). Returns i0, i1 (int64 [N, length]) and w0, w1
    (float32 [N, length]); weights are zero outside the box. Matches
    F.interpolate(mode="bilinear", align_corners=False) to (hi - lo + 1).
    """
    out_len = (hi - lo + 1).clamp(min=1)
    pix = torch.arange(length, device=lo.device)[None, :]
    i = pix - lo[:, None]  # index inside the resized mask
    inside = (i >= 0) & (i < out_len[:, None])
    # Source positions in double, weights rounded to float: PyTorch's CPU
    # kernel accumulates indices in double, so this reproduces it bit for bit.
    scale = m / out_len.to(torch.float64)
    src = (scale[:, None] * (i.to(torch.float64) + 0.5) - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=m - 1)
    i1 = (i0 + 1).clamp(max=m - 1)
    w1 = (src - i0.to(torch.float64)).clamp(0, 1).to(torch.float32)
    w0 = 1.0 - w1
    return i0, i1, w0 * inside, w1 * inside


def paste_masks(
    mask_probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float | None = 0.5
) -> Tensor:
    """Paste M x M mask probabilities into a height x width image.

    mask_probs: float [N, M, M] in 0..1; boxes: float [N, 4] (x1, y1, x2, y2)
    in the image's pixels. Returns bool [N, height, width] (prob > threshold),
    or the float32 probabilities when threshold is None. Work is chunked to
    bound memory.
    """
    n = mask_probs.shape[0]
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.zeros((n, height, width), dtype=dtype, device=mask_probs.device)
    if n == 0 or height == 0 or width == 0:
        return out
    m = mask_probs.shape[-1]
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))
    grow = (m + 2) / m
    boxes = boxes.float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
    hw, hh = (boxes[:, 2] - boxes[:, 0]) * 0.5 * grow, (boxes[:, 3] - boxes[:, 1]) * 0.5 * grow
    grown = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1).to(torch.int64)
    x0, y0, x1, y1 = grown.unbind(1)
    # Width/height as torchvision computes them: int(x2 - x1 + 1), at least 1.
    x1 = x0 + (x1 - x0 + 1).clamp(min=1) - 1
    y1 = y0 + (y1 - y0 + 1).clamp(min=1) - 1
    # Width first on the small masks, then height on the image: the order (and
    # rounding) of PyTorch's bilinear kernel, so pixels at 0.5 land the same way.
    xi0, xi1, xw0, xw1 = _interp_indices(x0, x1, width, m + 2)
    yi0, yi1, yw0, yw1 = _interp_indices(y0, y1, height, m + 2)
    rows = m + 2
    cols = (
        padded.gather(2, xi0[:, None, :].expand(-1, rows, -1)) * xw0[:, None, :]
        + padded.gather(2, xi1[:, None, :].expand(-1, rows, -1)) * xw1[:, None, :]
    )  # [N, M+2, W]
    chunk = max(1, PASTE_CHUNK_ELEMENTS // (height * width))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        c = cols[s:e]
        top = c.gather(1, yi0[s:e, :, None].expand(-1, -1, width)) * yw0[s:e, :, None]
        bottom = c.gather(1, yi1[s:e, :, None].expand(-1, -1, width)) * yw1[s:e, :, None]
        probs = top.add_(bottom)
        out[s:e] = probs if threshold is None else probs > threshold
    return out
