"""Binary masks -> COCO compressed RLE, one pycocotools call per image.

``{"size": [height, width], "counts": counts}`` with the strings returned here
decodes with ``pycocotools.mask.decode`` to the input mask.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

# Masks are encoded in groups of at most this many pixels (N * H * W) so that
# a large image with many detections never needs one huge Fortran copy.
MAX_PIXELS_PER_CALL = 1 << 26


def encode_masks(masks: np.ndarray) -> tuple[list[str], np.ndarray]:
    """COCO compressed RLE of a mask batch.

    masks: bool (or 0/1 integer) [N, H, W], one image's masks.
    Returns (counts, areas): N ASCII RLE strings and int64 [N] mask pixel counts.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    n, height, width = masks.shape
    if n == 0:
        return [], np.zeros(0, dtype=np.int64)
    per_call = max(1, MAX_PIXELS_PER_CALL // max(1, height * width))
    counts: list[str] = []
    areas: list[np.ndarray] = []
    for start in range(0, n, per_call):
        group = masks[start : start + per_call]
        # pycocotools wants uint8 [H, W, N] in Fortran order: that is [N, W, H] in C order.
        fortran = np.ascontiguousarray(group.transpose(0, 2, 1), dtype=np.uint8).transpose(2, 1, 0)
        rles = mask_utils.encode(fortran)
        areas.append(mask_utils.area(rles).astype(np.int64))
        counts.extend(r["counts"].decode("ascii") for r in rles)
    return counts, np.concatenate(areas)


def decode_masks(counts: list[str], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_masks`: bool [N, H, W] from N RLE strings of one image."""
    if not counts:
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": [height, width], "counts": c.encode("ascii")} for c in counts]
    decoded = mask_utils.decode(rles)  # uint8 [H, W, N]
    return decoded.transpose(2, 0, 1).astype(bool)
