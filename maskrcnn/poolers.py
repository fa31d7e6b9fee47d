"""RoIAlign on the FPN level chosen by box size (the paper's Eq. 1).

Training, and GPUs, use torchvision's roi_align (it has the backward). CPU
inference uses our gathered form of the same arithmetic: every output bin is
a weighted sum of the (up to) 4 x grid x grid feature vectors its bilinear
samples touch, so the whole pooling is one ``embedding_bag`` over a
channels-last table of the level: vectorised over channels and spread over
torch's threads, where torchvision's CPU kernel walks one channel plane at a
time on one core. The sums are fp32 (bf16 features widen exactly) and agree
with roi_align to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# RoIs per embedding_bag call: bounds the index/weight tensors (about 25 MB at 7x7).
_ROIS_PER_CHUNK = 2048


def assign_levels(
    boxes: Tensor, canonical_scale: int, canonical_level: int, k_min: int, k_max: int
) -> Tensor:
    """FPN level index (0 = k_min) per box: int64 [N].

    k = floor(k0 + log2(sqrt(w * h) / 224)), clamped to [k_min, k_max].
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = torch.floor(
        canonical_level
        + torch.log2(torch.sqrt(area) / canonical_scale)
        + torch.tensor(1e-6, dtype=boxes.dtype)
    )
    return k.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def level_scales(feats: list[Tensor], batch_shape: tuple[int, int]) -> list[float]:
    """Feature-map / image scale of each level, rounded to a power of two (1/4, 1/8, ...)."""
    return [2.0 ** round(math.log2(f.shape[-2] / batch_shape[0])) for f in feats]


def _gathers_on(device: torch.device) -> bool:
    """Whether inference pools with roi_align_gathered here: CPUs only. On GPU
    torchvision's kernel is already parallel over outputs, so GPUs keep it."""
    return device.type == "cpu"


def inference_maps(feats: list[Tensor]) -> list[Tensor]:
    """P2..P5 laid out once for all inference poolings of a batch: fp32, channels-last
    where the gathered kernel reads them, NCHW for torchvision's kernel."""
    cpu = _gathers_on(feats[0].device)
    layout = torch.channels_last if cpu else torch.contiguous_format
    return [f.float().contiguous(memory_format=layout) for f in feats]


def _samples_1d(start: Tensor, length: Tensor, bins: int, grid: int, size: int):
    """Bilinear taps along one axis, as roi_align places them.

    start, length: fp32 [R] the RoI's extent in feature pixels. Returns the
    two source indices int64 [R, bins, grid, 2], their weights fp32 (same
    shape) and whether each sample lies on the map, bool [R, bins, grid].
    """
    step = (length / bins)[:, None, None]
    b = torch.arange(bins, dtype=torch.float32, device=start.device)[None, :, None]
    g = torch.arange(grid, dtype=torch.float32, device=start.device)[None, None, :]
    pos = start[:, None, None] + b * step + (g + 0.5) * step / grid
    on_map = (pos >= -1.0) & (pos <= size)
    # A NaN coordinate (a broken model) reads nothing, instead of an index out of range.
    pos = pos.clamp(min=0).nan_to_num(nan=0.0)
    low = pos.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    pos = torch.where(at_edge, low, pos)
    frac = pos - low
    low = low.to(torch.int64)
    high = torch.where(at_edge, low, low + 1)
    return torch.stack([low, high], -1), torch.stack([1.0 - frac, frac], -1), on_map


def roi_align_gathered(
    feat: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """torchvision's roi_align (fixed sampling_ratio > 0) as one weighted gather.

    feat: [B, C, H, W] of any float dtype, best channels-last; rois: fp32
    [R, 5] (batch index, x1, y1, x2, y2) in image pixels. Returns fp32
    [R, output_size, output_size, C] (channels last). No gradient.
    """
    b_, c, h, w = feat.shape
    table = feat.float().permute(0, 2, 3, 1).reshape(b_ * h * w, c)
    n = output_size
    out = torch.empty((rois.shape[0], n, n, c), dtype=torch.float32, device=feat.device)
    offset = 0.5 if aligned else 0.0
    taps = (sampling_ratio * 2) ** 2
    for start in range(0, rois.shape[0], _ROIS_PER_CHUNK):
        r = rois[start : start + _ROIS_PER_CHUNK]
        x1, y1, x2, y2 = (r[:, 1:] * spatial_scale - offset).unbind(1)
        rw, rh = x2 - x1, y2 - y1
        if not aligned:  # roi_align's legacy mode makes every RoI at least 1x1
            rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
        yi, yw, yon = _samples_1d(y1, rh, n, sampling_ratio, h)
        xi, xw, xon = _samples_1d(x1, rw, n, sampling_ratio, w)
        # Axes: [R, bin y, bin x, sample y, sample x, tap y, tap x].
        rows = r[:, 0].to(torch.int64)[:, None, None, None, None, None, None] * h
        rows = rows + yi[:, :, None, :, None, :, None]
        index = rows * w + xi[:, None, :, None, :, None, :]
        on_map = yon[:, :, None, :, None, None, None] & xon[:, None, :, None, :, None, None]
        weight = yw[:, :, None, :, None, :, None] * xw[:, None, :, None, :, None, :]
        weight = weight * on_map / (sampling_ratio * sampling_ratio)
        pooled = F.embedding_bag(
            index.reshape(-1, taps), table, per_sample_weights=weight.reshape(-1, taps), mode="sum"
        )
        out[start : start + len(r)] = pooled.view(len(r), n, n, c)
    return out


def multiscale_roi_align(
    feats: list[Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """Pool every box from its level: feats P2..P5 [B, C, H_l, W_l], boxes per image [K_i, 4].

    Returns fp32 [sum K_i, C, output_size, output_size] in the boxes' order
    (channels-last memory when pooled by the gathered kernel). RoIAlign runs
    in fp32 whatever the features' dtype.
    """
    # The scale is taken against the largest image of the batch, as feature maps are.
    ref = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
    scales = level_scales(feats, ref)
    k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
    rois = torch.cat(
        [
            torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
            for i, b in enumerate(b.float() for b in boxes)
        ]
    )
    channels = feats[0].shape[1]
    needs_grad = torch.is_grad_enabled() and any(f.requires_grad for f in feats)
    gathered = _gathers_on(feats[0].device) and not needs_grad and sampling_ratio > 0
    n = output_size
    # The gathered kernel writes [R, n, n, C]; the result is that memory seen as [R, C, n, n].
    shape = (rois.shape[0], n, n, channels) if gathered else (rois.shape[0], channels, n, n)
    out = torch.zeros(shape, dtype=torch.float32, device=rois.device)
    if rois.shape[0] == 0:
        return out.permute(0, 3, 1, 2) if gathered else out
    levels = assign_levels(rois[:, 1:], canonical_scale, canonical_level, k_min, k_max)
    for lvl, (feat, scale) in enumerate(zip(feats, scales)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if idx.numel() == 0:
            continue
        if gathered:
            pooled = roi_align_gathered(
                feat, rois[idx], output_size, scale, sampling_ratio, aligned
            )
            out.index_copy_(0, idx, pooled)
        else:
            out[idx] = roi_align(
                feat.float(),
                rois[idx],
                output_size=output_size,
                spatial_scale=scale,
                sampling_ratio=sampling_ratio,
                aligned=aligned,
            )
    return out.permute(0, 3, 1, 2) if gathered else out
