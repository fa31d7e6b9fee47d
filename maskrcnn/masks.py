"""Mask targets for training and pasting of predicted masks into the image.

Pasting follows the usual Mask R-CNN convention (as torchvision's): the
M x M mask is padded by one pixel, its box grown by (M + 2) / M about the
centre and snapped to whole pixels, and the padded mask is resized
bilinearly (half-pixel centres) to that box. Here it is done for all masks
of a batch at once: resizing is separable, so every mask is first resized
along x, then along y, by gathering the two neighbours with their weights
(zero outside the box), inside a window around the box only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.ops import roi_align

# Elements of one chunk of float work while pasting (about 256 MB of fp32).
PASTE_CHUNK_ELEMENTS = 64 * 1024 * 1024


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """Binary mask targets of the RoIs: each RoI's ground-truth mask resampled into it.

    A target pixel is 1 where the ground-truth mask covers at least half of it.

    Args:
        gt_masks (Tensor[G, H, W]): uint8/bool ground-truth masks of one image.
        boxes (Tensor[K, 4]): float RoIs, (x1, y1, x2, y2) in the masks' pixels.
        matched (Tensor[K]): int64 index into gt_masks of each RoI's mask.
        size (int): side of the targets (cfg.mask_resolution).

    Returns:
        Tensor[K, size, size]: 0/1 targets, in the boxes' dtype.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(
        gt_masks[:, None].float(), rois, (size, size), 1.0, sampling_ratio=2, aligned=True
    )
    return (crops[:, 0] >= 0.5).float()


def _interp_indices(lo: Tensor, hi: Tensor, pix: Tensor, m: int):
    """Bilinear source indices and weights of an m-long signal resized onto [lo, hi].

    lo, hi: int64 [N] inclusive pixel range of each box (may leave the image);
    pix: int64 [N, L] the pixel positions wanted. Returns i0, i1 (int64 [N, L])
    and w0, w1 (float32 [N, L]); weights are zero outside the box. Matches
    F.interpolate(mode="bilinear", align_corners=False) to (hi - lo + 1).
    """
    out_len = (hi - lo + 1).clamp(min=1)
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


def _windows(lo: Tensor, hi: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Start (int64 [N]) and extent of each box's visible part on an axis of ``length``."""
    start = lo.clamp(0, length)
    extent = ((hi + 1).clamp(0, length) - start).clamp(min=0)
    return start, extent


def paste_masks(
    mask_probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float | None = 0.5
) -> Tensor:
    """Paste M x M mask probabilities into a height x width image.

    Work is done only inside each box's window: masks are grouped by window
    size (powers of two) into chunks of bounded memory, resized into a window
    that fits the image, and written back with one indexed store per chunk.

    Args:
        mask_probs (Tensor[N, M, M]): float probabilities in 0..1.
        boxes (Tensor[N, 4]): float boxes, (x1, y1, x2, y2) in the image's pixels.
        height (int): the image's height.
        width (int): the image's width.
        threshold (float, optional): probability above which a pixel is in the mask;
            None keeps the probabilities.

    Returns:
        Tensor[N, height, width]: bool (prob > threshold), or float32 probabilities
        when threshold is None; zero outside each box.
    """
    n = mask_probs.shape[0]
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.zeros((n, height, width), dtype=dtype, device=mask_probs.device)
    if n == 0 or height == 0 or width == 0:
        return out
    m = mask_probs.shape[-1]
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))
    x0, y0, x1, y1 = _padded_extents(boxes, m)
    sx, ex = _windows(x0, x1, width)
    sy, ey = _windows(y0, y1, height)
    # Masks whose windows are alike share a chunk: bucket by the power of two at or above
    # each side (a loop over buckets and chunks, not over detections).
    visible = torch.nonzero((ey > 0) & (ex > 0)).squeeze(1)
    if visible.numel() == 0:
        return out
    powers = 2 ** torch.arange(32, device=ey.device)
    key = torch.searchsorted(powers, ey[visible]) * 32 + torch.searchsorted(powers, ex[visible])
    buckets, which = torch.unique(key, return_inverse=True)
    for b in range(len(buckets)):
        members = visible[which == b]
        hmax, wmax = int(ey[members].max()), int(ex[members].max())
        per_chunk = max(1, PASTE_CHUNK_ELEMENTS // (hmax * wmax))
        for idx in members.split(per_chunk):
            # A window of the chunk's size that holds each box's visible part and fits
            # the image; the pixels a box gets do not depend on the window's size.
            wy = torch.minimum(sy[idx], torch.tensor(height - hmax))
            wx = torch.minimum(sx[idx], torch.tensor(width - wmax))
            rows = wy[:, None] + torch.arange(hmax, device=wy.device)[None, :]
            cols = wx[:, None] + torch.arange(wmax, device=wx.device)[None, :]
            local = _resize_window(
                padded[idx], y0[idx], y1[idx], x0[idx], x1[idx], rows, cols, m + 2
            )
            if threshold is not None:
                local = local > threshold
            out[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = local
    return out


def _padded_extents(boxes: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where the padded (m + 2)-pixel masks go: each box grown by (m + 2) / m about its
    centre and snapped to pixels, as int64 [N] first and last columns x0, x1 and rows
    y0, y1 (inclusive; may leave the image)."""
    grow = (m + 2) / m
    boxes = boxes.float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
    hw, hh = (boxes[:, 2] - boxes[:, 0]) * 0.5 * grow, (boxes[:, 3] - boxes[:, 1]) * 0.5 * grow
    grown = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1).to(torch.int64)
    x0, y0, x1, y1 = grown.unbind(1)
    # Width/height as torchvision computes them: int(x2 - x1 + 1), at least 1.
    x1 = x0 + (x1 - x0 + 1).clamp(min=1) - 1
    y1 = y0 + (y1 - y0 + 1).clamp(min=1) - 1
    return x0, y0, x1, y1


def _resize_window(
    padded: Tensor,
    y0: Tensor,
    y1: Tensor,
    x0: Tensor,
    x1: Tensor,
    rows: Tensor,
    cols: Tensor,
    m: int,
) -> Tensor:
    """Bilinear resize of padded [n, m, m] masks onto their boxes, read at rows x cols.

    Width first, then height: the order (and rounding) of PyTorch's bilinear
    kernel, so that pixels at exactly 0.5 land the same way.
    """
    xi0, xi1, xw0, xw1 = _interp_indices(x0, x1, cols, m)
    yi0, yi1, yw0, yw1 = _interp_indices(y0, y1, rows, m)
    w = cols.shape[1]
    across = (
        padded.gather(2, xi0[:, None, :].expand(-1, m, -1)) * xw0[:, None, :]
        + padded.gather(2, xi1[:, None, :].expand(-1, m, -1)) * xw1[:, None, :]
    )  # [n, m, w]
    top = across.gather(1, yi0[:, :, None].expand(-1, -1, w)) * yw0[:, :, None]
    bottom = across.gather(1, yi1[:, :, None].expand(-1, -1, w)) * yw1[:, :, None]
    return top.add_(bottom)
