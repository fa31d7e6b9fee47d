"""Drawing detections over their image: tinted masks, box outlines, "label score" text."""

from __future__ import annotations

import colorsys
import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_ALPHA = 0.5  # weight of the class colour inside a mask


def label_colour(label: int) -> tuple[int, int, int]:
    """A stable, saturated RGB colour per class label (hues spread by the golden ratio)."""
    hue = (0.13 + 0.618033988749895 * int(label)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def tint_masks(
    image: np.ndarray,
    masks: Iterable[np.ndarray],
    labels: Sequence[int],
    alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """``image`` uint8 [H, W, 3] with each pixel under a mask blended towards its class colour.

    masks: bool [H, W] each (any iterable, consumed one at a time), in
    score-ascending order (the last one painted wins where masks overlap).
    Every covered pixel is blended exactly once:
    ``round((1 - alpha) * pixel + alpha * colour)``; other pixels are unchanged.
    """
    height, width = image.shape[:2]
    colour_map = np.zeros((height, width, 3), dtype=np.float32)
    covered = np.zeros((height, width), dtype=bool)
    for mask, label in zip(masks, labels):
        colour_map[mask] = label_colour(label)
        covered |= mask
    out = image.copy()
    blended = (1.0 - alpha) * image[covered].astype(np.float32) + alpha * colour_map[covered]
    out[covered] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def draw_detections(
    image: np.ndarray,
    detections: Sequence[dict[str, Any]],
    alpha: float = MASK_ALPHA,
) -> Image.Image:
    """The overlay of ``detections`` on ``image`` (uint8 RGB [H, W, 3]) as a PIL image.

    Each detection: ``label`` int, ``label_name`` str, ``score`` float, ``box``
    x1, y1, x2, y2 pixels, and ``mask`` bool [H, W] or ``mask_counts`` (COCO
    RLE of size [H, W], decoded one at a time to bound memory). Masks are
    tinted per class, boxes outlined in the class colour and labelled "name score".
    """
    ordered = sorted(detections, key=lambda d: d["score"])
    height, width = image.shape[:2]
    masks = _masks(ordered, height, width)
    tinted = tint_masks(image, masks, [d["label"] for d in ordered], alpha)
    canvas = Image.fromarray(tinted, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, round(min(image.shape[:2]) / 250))
    for d in ordered:
        colour = label_colour(d["label"])
        x1, y1, x2, y2 = (float(v) for v in d["box"])
        # PIL's rectangle includes x2, y2; the box's x2, y2 are exclusive edges.
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
        text = f"{d['label_name'] or d['label']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1 + line  # above the box when there is room
        # th + 2 rows ending just above the box (PIL's rectangle includes both ends).
        draw.rectangle([x1, ty, x1 + tw + 1, ty + th + 1], fill=colour)
        draw.text((x1 + 1 - left, ty + 1 - top), text, fill=_text_colour(colour), font=font)
    return canvas


def _masks(detections: Sequence[dict[str, Any]], height: int, width: int) -> Iterator[np.ndarray]:
    from pipeline.formats.rle import decode_masks

    for d in detections:
        mask = d.get("mask")
        yield mask if mask is not None else decode_masks([d["mask_counts"]], height, width)[0]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def overlay_name(uri: str) -> str:
    """A safe, unique PNG file name for the overlay of ``uri``: its base name plus a hash."""
    base = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = _UNSAFE.sub("_", stem).strip("._-")[:80] or "image"
    digest = hashlib.sha1(uri.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{digest}.png"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
