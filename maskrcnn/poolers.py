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

from maskrcnn.ops import roi_align

# RoIs per embedding_bag call: bounds the index/weight tensors (about 25 MB at 7x7).
_ROIS_PER_CHUNK = 2048


def assign_levels(
    boxes: Tensor, canonical_scale: int, canonical_level: int, k_min: int, k_max: int
) -> Tensor:
    """The FPN level each box is pooled from (the paper's Eq. 1).

    k = floor(k0 + log2(sqrt(w * h) / 224)), clamped to [k_min, k_max], with
    k0 = canonical_level and 224 = canonical_scale.

    Args:
        boxes (Tensor[N, 4]): float boxes, (x1, y1, x2, y2) in image pixels.
        canonical_scale (int): the side of a box that goes to canonical_level.
        canonical_level (int): k0.
        k_min (int): the finest level pooled (2 for P2).
        k_max (int): the coarsest level pooled (5 for P5).

    Returns:
        Tensor[N]: int64 k - k_min, an index into the pooled levels.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = torch.floor(
        canonical_level
        + torch.log2(torch.sqrt(area) / canonical_scale)
        + torch.tensor(1e-6, dtype=boxes.dtype)
    )
    return k.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def level_scales(feats: list[Tensor], batch_shape: tuple[int, int]) -> list[float]:
    """Feature-map / image scale of each level, rounded to a power of two (1/4, 1/8, ...).

    Args:
        feats (list[Tensor[B, C, H_l, W_l]]): the levels.
        batch_shape (tuple[int, int]): (H, W) of the images they were computed from.

    Returns:
        list[float]: 2 ** -k for level P_k, one per map.
    """
    return [2.0 ** round(math.log2(f.shape[-2] / batch_shape[0])) for f in feats]


def _gathers_on(device: torch.device) -> bool:
    """Whether inference pools with roi_align_gathered here: CPUs only. On GPU
    torchvision's kernel is already parallel over outputs, so GPUs keep it."""
    return device.type == "cpu"


def inference_maps(feats: list[Tensor]) -> list[Tensor]:
    """The pooled levels laid out once for all inference poolings of a batch.

    Args:
        feats (list[Tensor[B, C, H_l, W_l]]): the levels RoIAlign reads (P2..P5), any
            float dtype and layout.

    Returns:
        list[Tensor[B, C, H_l, W_l]]: the same maps in fp32, channels-last where the
        gathered kernel reads them (CPU), NCHW for torchvision's kernel (GPU).
    """
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

    No gradient: inference only.

    Args:
        feat (Tensor[B, C, H, W]): one level, any float dtype, best channels-last.
        rois (Tensor[R, 5]): fp32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size (int): n, bins per side.
        spatial_scale (float): feature pixels per image pixel (1/4 for P2).
        sampling_ratio (int): bilinear samples per bin and axis, > 0.
        aligned (bool): shift the RoI by half a pixel (roi_align's ``aligned``).

    Returns:
        Tensor[R, n, n, C]: fp32, channels last.
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
    """Pool every box from the level its size selects (assign_levels).

    The levels' numbers come from their sizes against the batch's largest
    image (level_scales), so ``feats`` must be consecutive levels, finest first.
    RoIAlign runs in fp32 whatever the features' dtype; torchvision's kernel
    (with its backward) when a gradient is needed or off CPU, the gathered
    one otherwise.

    Args:
        feats (list[Tensor[B, C, H_l, W_l]]): the pooled levels, e.g. P2..P5.
        boxes (list[Tensor[K_i, 4]]): float boxes per image, (x1, y1, x2, y2) in
            image pixels.
        image_sizes (list[tuple[int, int]]): (height, width) of each image.
        output_size (int): n, bins per side.
        sampling_ratio (int): bilinear samples per bin and axis.
        aligned (bool): half-pixel offset (roi_align's ``aligned``).
        canonical_scale (int): see assign_levels.
        canonical_level (int): see assign_levels.

    Returns:
        Tensor[sum K_i, C, n, n]: fp32, in the boxes' order (channels-last memory
        when pooled by the gathered kernel).
    """
    rois = _batched_rois(boxes)
    channels = feats[0].shape[1]
    needs_grad = torch.is_grad_enabled() and any(f.requires_grad for f in feats)
    gathered = _gathers_on(feats[0].device) and not needs_grad and sampling_ratio > 0
    n = output_size
    # The gathered kernel writes [R, n, n, C]; the result is that memory seen as [R, C, n, n].
    shape = (rois.shape[0], n, n, channels) if gathered else (rois.shape[0], channels, n, n)
    out = torch.zeros(shape, dtype=torch.float32, device=rois.device)
    if rois.shape[0] == 0:
        return out.permute(0, 3, 1, 2) if gathered else out
    levels, scales = _roi_levels(feats, rois, image_sizes, canonical_scale, canonical_level)
    for lvl, (feat, scale) in enumerate(zip(feats, scales)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if idx.numel() == 0:
            continue
        pooled = _align_level(
            feat, rois[idx], output_size, scale, sampling_ratio, aligned, gathered
        )
        if gathered:
            out.index_copy_(0, idx, pooled)
        else:
            out[idx] = pooled
    return out.permute(0, 3, 1, 2) if gathered else out


def _roi_levels(
    feats: list[Tensor],
    rois: Tensor,
    image_sizes: list[tuple[int, int]],
    canonical_scale: int,
    canonical_level: int,
) -> tuple[Tensor, list[float]]:
    """Which of ``feats`` each of ``rois`` [R, 5] is pooled from (int64 [R], 0 for the
    first), and each level's scale (feature pixels per image pixel)."""
    # The scale is taken against the largest image of the batch, as feature maps are.
    ref = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
    scales = level_scales(feats, ref)
    k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
    levels = assign_levels(rois[:, 1:], canonical_scale, canonical_level, k_min, k_max)
    return levels, scales


def _batched_rois(boxes: list[Tensor]) -> Tensor:
    """Boxes per image [K_i, 4] -> fp32 [sum K_i, 5] (image index, x1, y1, x2, y2)."""
    return torch.cat(
        [
            torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
            for i, b in enumerate(b.float() for b in boxes)
        ]
    )


def _align_level(
    feat: Tensor,
    rois: Tensor,
    output_size: int,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    gathered: bool,
) -> Tensor:
    """RoIAlign of one level's rois: fp32 [R, n, n, C] by the gathered kernel, else
    [R, C, n, n] by torchvision's."""
    if gathered:
        return roi_align_gathered(feat, rois, output_size, scale, sampling_ratio, aligned)
    return roi_align(feat.float(), rois, output_size, scale, sampling_ratio, aligned)
