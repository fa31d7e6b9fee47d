"""Drawing detections over their image: tinted masks, box outlines, "label score" text;
:func:`render_output` draws the overlays of a finished OUTPUT's images."""

from __future__ import annotations

import colorsys
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.formats.decode import decode_image
from pipeline.formats.rle import decode_masks
from pipeline.formats.shapes import png_bytes
from pipeline.storage import full_uri, get_fs, join

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


@dataclass
class RenderStats:
    """What :func:`render_output` did: overlays written, images that failed, error rows left out."""

    written: int = 0
    failed: int = 0
    error_rows: int = 0


def render_output(
    results: Any,
    out_uri: str,
    options_for: Callable[[str], dict[str, Any]],
    limit: int = 100,
    where: str | None = None,
    min_score: float = 0.0,
    on_written: Callable[[str, str], None] | None = None,
    on_failed: Callable[[str, Exception], None] | None = None,
) -> RenderStats:
    """One PNG overlay under ``out_uri`` per ok image of ``results`` (a
    pipeline.output.results.Results), at most ``limit``, in URI order.

    ``where``: an SQL predicate over the `images` view, on the results' read-only
    connection (its DuckDB errors propagate). ``options_for(uri)``: storage options
    for ``out_uri`` and for each image. Detections scoring below ``min_score`` are
    not drawn. An image that cannot be read, decoded or drawn (OSError, ValueError)
    is counted and reported to ``on_failed(uri, exc)``; each overlay written to
    ``on_written(uri, overlay_uri)``.
    """
    con = results.connect()
    predicate = f"({where})" if where else "true"
    out_fs, out_path = get_fs(out_uri, options_for(out_uri))
    stats = RenderStats()
    stats.error_rows = con.sql(
        f"SELECT count(*) FROM images WHERE status <> 'ok' AND {predicate}"
    ).fetchall()[0][0]
    reader = con.sql(
        "SELECT uri, width, height, instances FROM images "
        f"WHERE status = 'ok' AND {predicate} ORDER BY uri LIMIT {int(limit)}"
    ).to_arrow_reader(16)
    for batch in reader:
        if batch.num_rows:
            out_fs.makedirs(out_path, exist_ok=True)
        for row in batch.to_pylist():
            target = join(out_path, overlay_name(row["uri"]))
            try:
                render_row(row, target, out_fs, options_for(row["uri"]), min_score)
            except (OSError, ValueError) as exc:
                stats.failed += 1
                if on_failed is not None:
                    on_failed(row["uri"], exc)
                continue
            stats.written += 1
            if on_written is not None:
                on_written(row["uri"], full_uri(out_fs, target))
    return stats


def render_row(
    row: dict[str, Any],
    target: str,
    out_fs: Any,
    options: dict[str, Any] | None = None,
    min_score: float = 0.0,
) -> None:
    """Read and decode the image of ``row`` (an `images` row: uri, width, height,
    instances), draw its detections scoring at least ``min_score`` and write the PNG
    to ``target`` on ``out_fs``. ValueError when the image is no longer the size the
    run saw."""
    fs, path = get_fs(row["uri"], options)
    image = decode_image(fs.cat_file(path))
    height, width = row["height"], row["width"]
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"the image is now {image.shape[1]}x{image.shape[0]}, the run saw {width}x{height}"
        )
    detections = [d for d in row["instances"] or [] if d["score"] >= min_score]
    out_fs.pipe_file(target, png_bytes(draw_detections(image, detections)))
