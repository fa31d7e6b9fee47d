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
# Masks of at least this many pixels are encoded from the window of rows and
# columns holding their foreground: a detection in a 50-megapixel photo then
# costs a scan of its mask, not a transposed copy and a full pycocotools pass
# (measured: 0.3 s per mask at 48 megapixels, most of a huge image's time).
WINDOWED_MIN_PIXELS = 1 << 20


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
    if height * width >= WINDOWED_MIN_PIXELS:
        encoded = [_encode_windowed(mask.astype(bool, copy=False)) for mask in masks]
        return [c for c, _ in encoded], np.array([a for _, a in encoded], dtype=np.int64)
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


def _encode_windowed(mask: np.ndarray) -> tuple[str, int]:
    """(counts, area) of one bool [H, W] mask, the same string pycocotools gives for it,
    computed from the rows r0:r1 and columns c0:c1 that hold its foreground.

    COCO RLE runs over pixels in column-major order (index x * H + y), zeros first.
    Each run of ones starts and ends inside the window; a run continues from one
    column into the next only when the window spans every row.
    """
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        runs = np.array([height * width], dtype=np.int64)
    else:
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(mask[r0:r1].any(axis=0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        window = np.ascontiguousarray(mask[r0:r1, c0:c1].T)  # [columns, rows]: RLE order
        wh = r1 - r0
        before = np.zeros_like(window)  # the pixel before each one, in RLE order
        after = np.zeros_like(window)
        before[:, 1:], after[:, :-1] = window[:, :-1], window[:, 1:]
        if wh == height:  # whole columns: the last row runs on into the next column
            before[1:, 0], after[:-1, -1] = window[:-1, -1], window[1:, 0]
        flat = window.reshape(-1)
        starts = np.flatnonzero(flat & ~before.reshape(-1))
        ends = np.flatnonzero(flat & ~after.reshape(-1))
        # Window index j = column * wh + row -> full index (c0 + column) * H + r0 + row.
        starts = (c0 + starts // wh) * height + r0 + starts % wh
        ends = (c0 + ends // wh) * height + r0 + ends % wh + 1
        bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
        bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, ends, height * width
        runs = np.diff(bounds)
        if runs[-1] == 0:  # ends with a one: no trailing run of zeros
            runs = runs[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return rle["counts"].decode("ascii"), int(runs[1::2].sum())


def decode_masks(counts: list[str], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_masks`: bool [N, H, W] from N RLE strings of one image."""
    if not counts:
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": [height, width], "counts": c.encode("ascii")} for c in counts]
    decoded = mask_utils.decode(rles)  # uint8 [H, W, N]
    return decoded.transpose(2, 0, 1).astype(bool)
