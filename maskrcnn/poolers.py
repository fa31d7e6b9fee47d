"""RoIAlign on the FPN level chosen by box size (the paper's Eq. 1)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align


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


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
# Below this many RoIs per chunk, a thread hand-off costs more than it saves.
_MIN_ROIS_PER_THREAD = 32


def _cpu_pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL_SIZE < threads:
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="roi_align")
            _POOL_SIZE = threads
        return _POOL


def _roi_align_no_grad(feat: Tensor, rois: Tensor, kwargs: dict) -> Tensor:
    with torch.no_grad():
        return roi_align(feat, rois, **kwargs)


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

    Returns fp32 [sum K_i, C, output_size, output_size] in the boxes' order.
    RoIAlign runs in fp32 whatever the features' dtype.
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
    out = torch.zeros(
        (rois.shape[0], channels, output_size, output_size), dtype=torch.float32, device=rois.device
    )
    if rois.shape[0] == 0:
        return out
    levels = assign_levels(rois[:, 1:], canonical_scale, canonical_level, k_min, k_max)
    # torchvision's CPU kernel runs on one core: at inference, split the RoIs into chunks
    # pooled on torch's threads (the op releases the GIL; results are identical).
    threads = torch.get_num_threads() if rois.device.type == "cpu" else 1
    if torch.is_grad_enabled() and feats[0].requires_grad:
        threads = 1
    jobs = []
    for lvl, (feat, scale) in enumerate(zip(feats, scales)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if idx.numel() == 0:
            continue
        kwargs = {
            "output_size": output_size,
            "spatial_scale": scale,
            "sampling_ratio": sampling_ratio,
            "aligned": aligned,
        }
        chunks = min(threads, idx.numel() // _MIN_ROIS_PER_THREAD)
        if chunks <= 1:
            out[idx] = roi_align(feat.float(), rois[idx], **kwargs)
            continue
        feat = feat.float().contiguous()
        for part in idx.tensor_split(chunks):
            jobs.append((part, feat, rois[part], kwargs))
    if jobs:
        pool = _cpu_pool(threads)
        futures = [(part, pool.submit(_roi_align_no_grad, f, r, kw)) for part, f, r, kw in jobs]
        for part, future in futures:
            out[part] = future.result()
    return out
