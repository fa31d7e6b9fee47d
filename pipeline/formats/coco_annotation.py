"""One COCO annotation checked and converted, without reading its image.

The segmentation (polygons, uncompressed or compressed RLE) becomes the
compressed RLE of the full-image mask, or a skip reason: empty, malformed, or
of another size than the image. A ``bbox`` field is only checked (a degenerate
one marks a broken annotation); the object's box is its mask's extent (see
pipeline.formats.coco for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


@dataclass(slots=True)
class CocoObject:
    """One usable annotation, as the dataset keeps it."""

    category_id: int
    label: int
    iscrowd: bool
    rle: dict  # compressed COCO RLE of the full-image mask: {"size": [h, w], "counts": bytes}
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the mask's extent, pixels
    area: float  # the file's "area" (evaluation's size ranges use it), else mask pixels
    bbox: list[float]  # the file's [x, y, w, h], else the mask's extent


def rle_string_total(counts: str) -> int | None:
    """Sum of the run lengths in a COCO compressed RLE string; None when malformed.

    pycocotools decodes a string whose runs do not fill the image into
    uninitialised memory, so the total is checked first.
    """
    total, runs, value, shift = 0, [], 0, 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:  # sign bit of the last 5-bit group
            value -= 1 << shift
        if len(runs) > 2:  # runs after the third are stored as deltas
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        total += value
        value, shift = 0, 0
    return total if shift == 0 else None


def segmentation_rle(segm: Any, height: int, width: int) -> tuple[dict | None, str | None]:
    """(compressed RLE, None) for a polygon list or RLE dict, else (None, skip reason)."""
    if isinstance(segm, list):
        if segm and all(isinstance(v, int | float) for v in segm):
            segm = [segm]  # a single flat polygon
        # pycocotools reads a 4-number "polygon" as a box: drop anything under 3 points.
        polygons = [[float(v) for v in p] for p in segm if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return None, "empty segmentation"
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [height, width]:
            return None, "segmentation size mismatch"
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            runs = np.asarray(counts, dtype=np.int64)
            if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != height * width:
                return None, "invalid segmentation"
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(counts, str | bytes):  # compressed RLE
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            if rle_string_total(text) != height * width:
                return None, "invalid segmentation"
            rle = {"size": [height, width], "counts": text.encode("ascii")}
        else:
            return None, "invalid segmentation"
    elif segm is None or segm == {}:
        return None, "empty segmentation"
    else:
        return None, "invalid segmentation"
    if int(mask_utils.area(rle)) == 0:
        return None, "empty segmentation"
    return rle, None


def box_is_degenerate(bbox: Any, height: int, width: int) -> bool:
    """True when a [x, y, w, h] field has no area once clipped to the image (or is malformed)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return True
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return not (x2 - x1 > 0 and y2 - y1 > 0)


def annotation_object(
    ann: dict, label: int, height: int, width: int
) -> tuple[CocoObject | None, str | None]:
    """(object, None) for a usable annotation of a ``height`` x ``width`` image, else
    (None, skip reason). ``ann`` is the JSON dict; its image and category are known."""
    if "bbox" in ann and box_is_degenerate(ann["bbox"], height, width):
        return None, "degenerate box"
    try:
        rle, reason = segmentation_rle(ann.get("segmentation"), height, width)
    except (TypeError, ValueError, OverflowError):
        rle, reason = None, "invalid segmentation"
    if rle is None:
        return None, reason
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    area = ann.get("area")
    if not isinstance(area, int | float):
        area = mask_utils.area(rle)
    obj = CocoObject(
        category_id=ann["category_id"],
        label=label,
        iscrowd=bool(ann.get("iscrowd", 0)),
        rle=rle,
        box=(x, y, x + bw, y + bh),
        area=float(area),
        bbox=[float(v) for v in ann["bbox"]] if "bbox" in ann else [x, y, bw, bh],
    )
    return obj, None
