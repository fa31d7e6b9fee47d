"""Synthetic shapes in COCO format: squares, circles, triangles (and more kinds) with exact masks.

In the style of matterport's shapes sample: a random background colour, 1-4
shapes of random colour and size, each drawn over the ones before it. Masks
are the *visible* pixels of each shape. A shape left with too few visible
pixels by the shapes drawn over it is not drawn at all (rather than drawn and
left unlabelled), so every coloured pixel in an image belongs to exactly one
annotation and every annotation's mask is exactly the pixels of its colour.

The classes are chosen by name from SHAPE_KINDS (default: square, circle,
triangle); category ids are 1.. in the order given. The default three give the
same bytes as before there was a choice.

Every image comes from its own random stream ``(seed, split, index)``, so the
output is the same bytes for the same arguments, and the validation split
(another ``split``) never repeats a training image.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import storage

SHAPE_KINDS = ("square", "circle", "triangle", "star", "cross", "ellipse", "diamond", "hexagon")
"""Every shape the generator draws."""
DEFAULT_CLASSES = ("square", "circle", "triangle")


def categories(classes: tuple[str, ...] = DEFAULT_CLASSES) -> list[dict[str, Any]]:
    """The COCO categories of a class list: ids 1.. in order."""
    return [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(classes, 1)]


def check_classes(classes: tuple[str, ...]) -> tuple[str, ...]:
    """``classes`` when they are distinct names of SHAPE_KINDS; ValueError naming the bad one."""
    if not classes:
        raise ValueError("--classes: give at least one shape")
    for n in classes:
        if n not in SHAPE_KINDS:
            raise ValueError(f"--classes {n!r}: not a shape; choose from {', '.join(SHAPE_KINDS)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"--classes {','.join(classes)}: a shape is named twice")
    return tuple(classes)


CATEGORIES: list[dict[str, Any]] = categories()
SPLIT_STREAMS = {"train": 0, "val": 1}
MIN_SIZE = 32  # below this the smallest shapes would be a few pixels wide
# An occluded shape must keep this share of its own area visible (and at
# least MIN_VISIBLE_PIXELS) or it is left out of the image: a sliver of a
# shape is noise as a training target.
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 16
# Colours of different shapes (and of a shape and the background) differ by at
# least this much in the sum of absolute channel differences, so each object is
# told apart from its neighbours by colour alone.
MIN_COLOUR_DISTANCE = 96


@dataclass
class ShapesImage:
    """One generated image and its objects, bottom to top.

    image: uint8 [H, W, 3] RGB. masks: bool [K, H, W], the visible pixels of
    each object. category_ids: int [K], 1.. indexing the classes drawn from
    (default 1 square, 2 circle, 3 triangle).
    colours: uint8 [K, 3], the fill colour of each object.
    """

    image: np.ndarray
    masks: np.ndarray
    category_ids: np.ndarray
    colours: np.ndarray


def _distinct_colour(rng: np.random.Generator, taken: list[np.ndarray]) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, size=3, dtype=np.int64)
        if all(np.abs(colour - t).sum() >= MIN_COLOUR_DISTANCE for t in taken):
            return colour


def _polygon_mask(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixel centres inside the polygon ``vertices`` [V, 2] (x, y), even-odd rule."""
    inside = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (ys > min(y1, y2)) & (ys <= max(y1, y2))
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def _regular(cx: float, cy: float, radii: list[float], turn: float = -np.pi / 2) -> np.ndarray:
    """Vertices [V, 2] at ``radii`` around (cx, cy), evenly spaced, the first at ``turn``."""
    angles = turn + 2 * np.pi * np.arange(len(radii)) / len(radii)
    r = np.asarray(radii)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _shape_mask(
    kind: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """bool [H, W]: pixels whose centre lies inside the shape (half-size ``s``)."""
    if kind == "square":  # axis-aligned, side 2s
        return (np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s)
    if kind == "circle":  # radius s
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= s * s
    if kind == "triangle":
        # Upright equilateral triangle of height 2s: apex (cx, cy - s), base at cy + s.
        half_base = 2.0 * s / np.sqrt(3.0)
        inside_base = ys <= cy + s
        # Each slanted edge: |x - cx| grows linearly from 0 at the apex to half_base.
        inside_sides = np.abs(xs - cx) * (2.0 * s) <= (ys - (cy - s)) * half_base
        return inside_base & inside_sides
    if kind == "cross":  # a plus sign: two bars 2s long and 2s/3 wide
        return ((np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s / 3)) | (
            (np.abs(xs - cx) <= s / 3) & (np.abs(ys - cy) <= s)
        )
    if kind == "ellipse":  # axes s (horizontal) and s/2
        return ((xs - cx) / s) ** 2 + ((ys - cy) / (0.5 * s)) ** 2 <= 1.0
    if kind == "diamond":  # a square on its corner, diagonal 2s
        return np.abs(xs - cx) + np.abs(ys - cy) <= s
    if kind == "star":  # five points, outer radius s, inner 0.45 s
        return _polygon_mask(_regular(cx, cy, [s, 0.45 * s] * 5), xs, ys)
    return _polygon_mask(_regular(cx, cy, [s] * 6, turn=0.0), xs, ys)  # hexagon


def _half_width(kind: str, s: float) -> float:
    """Half the horizontal extent of a shape of half-size ``s``."""
    return 2.0 * s / np.sqrt(3.0) if kind == "triangle" else s


def draw_shapes_image(
    rng: np.random.Generator, size: int, classes: tuple[str, ...] = DEFAULT_CLASSES
) -> ShapesImage:
    """One random image of ``size`` x ``size`` pixels with 1-4 shapes of ``classes``
    (numpy drawing); category ids index ``classes`` from 1."""
    background = rng.integers(0, 256, size=3, dtype=np.int64)
    count = int(rng.integers(1, 5))
    centres = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    xs = centres[None, :]
    ys = centres[:, None]
    taken = [background]
    kinds, colours, full_masks = [], [], []
    for _ in range(count):
        kind = int(rng.integers(1, len(classes) + 1))
        s = float(rng.uniform(0.08, 0.22) * size)
        # Half-width of the shape's extent (the triangle's base is wider than 2s).
        half_w = _half_width(classes[kind - 1], s)
        cx = float(rng.uniform(half_w, size - half_w))
        cy = float(rng.uniform(s, size - s))
        colour = _distinct_colour(rng, taken)
        taken.append(colour)
        kinds.append(kind)
        colours.append(colour)
        full_masks.append(_shape_mask(classes[kind - 1], cx, cy, s, xs, ys))

    # Top-most owner of every pixel (-1: background); later shapes win.
    def owners(keep: list[int]) -> np.ndarray:
        owner = np.full((size, size), -1, dtype=np.int64)
        for k in keep:
            owner[full_masks[k]] = k
        return owner

    owner = owners(list(range(count)))
    keep = []
    for k in range(count):
        visible, full = int((owner == k).sum()), int(full_masks[k].sum())
        # An unoccluded shape always stays (the top one is never occluded).
        if visible == full or visible >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full):
            keep.append(k)
    # Leaving a shape out only uncovers pixels of the shapes under it, so the
    # shapes kept stay above the threshold: one pass is enough.
    owner = owners(keep)

    palette = np.array([background, *colours], dtype=np.uint8)  # index 0: background
    image = palette[owner + 1]
    masks = np.stack([owner == k for k in keep]) if keep else np.zeros((0, size, size), bool)
    return ShapesImage(
        image=image,
        masks=masks,
        category_ids=np.array([kinds[k] for k in keep], dtype=np.int64),
        colours=np.array([colours[k] for k in keep], dtype=np.uint8).reshape(-1, 3),
    )


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``: independent of every other image."""
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


def iter_shapes(
    count: int,
    size: int,
    seed: int,
    split: str = "train",
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> Iterator[ShapesImage]:
    """The ``count`` images of ``split`` in order."""
    for index in range(count):
        yield draw_shapes_image(image_rng(seed, split, index), size, classes)


def png_bytes(image: Any, compress_level: int = 6) -> bytes:
    """``image`` (uint8 RGB [H, W, 3], or a PIL image of any mode) encoded as PNG.

    The one PNG encoder: the shapes dataset's images (the same bytes for the
    same arguments), render's overlays, the tests' and benchmarks' pictures.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _annotations(sample: ShapesImage, image_id: int, first_ann_id: int) -> list[dict]:
    if len(sample.masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(sample.masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)  # [x, y, w, h] of the visible pixels
    return [
        {
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": int(sample.category_ids[k]),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            "area": int(areas[k]),
            "bbox": [int(v) for v in boxes[k]],
            "iscrowd": 0,
        }
        for k, rle in enumerate(rles)
    ]


def write_split(
    output: str,
    split: str,
    count: int,
    size: int,
    seed: int,
    options: dict[str, Any] | None = None,
    upload_batch: int = 128,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> dict[str, int]:
    """Write ``OUTPUT/split/images/*.png`` and then ``OUTPUT/split/annotations.json``.

    The annotations file is written last: a split without it is incomplete.
    Returns counts: images and objects per category name.
    """
    split_uri = storage.join(output, split)
    fs, split_path = storage.get_fs(split_uri, options)
    images_path = split_path.rstrip("/") + "/images"
    fs.makedirs(images_path, exist_ok=True)

    images, annotations, pending = [], [], {}
    for index, sample in enumerate(iter_shapes(count, size, seed, split, classes)):
        image_id = index + 1
        file_name = f"images/{image_id:06d}.png"
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        annotations += _annotations(sample, image_id, len(annotations) + 1)
        pending[f"{images_path}/{image_id:06d}.png"] = png_bytes(sample.image)
        if len(pending) >= upload_batch:
            fs.pipe(pending)  # s3fs uploads a batch concurrently
            pending = {}
    if pending:
        fs.pipe(pending)

    coco = {
        "info": {"description": f"maskrcnn shapes: split={split} seed={seed} size={size}"},
        "images": images,
        "annotations": annotations,
        "categories": categories(classes),
    }
    fs.pipe_file(
        split_path.rstrip("/") + "/annotations.json",
        json.dumps(coco, separators=(",", ":")).encode(),
    )
    counts = {"images": count, "objects": len(annotations)}
    for cat in categories(classes):
        counts[cat["name"]] = sum(a["category_id"] == cat["id"] for a in annotations)
    return counts


def make_shapes_dataset(
    output: str,
    images: int,
    size: int = 128,
    seed: int = 0,
    val_images: int = 0,
    options: dict[str, Any] | None = None,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> dict[str, Any]:
    """Write the train split (and the val split when ``val_images`` > 0) under ``output``.

    Raises ValueError for counts below 1 (train) or 0 (val), sizes below MIN_SIZE and
    ``classes`` that are not distinct SHAPE_KINDS.
    Returns a summary: per-split counts and the seconds taken.
    """
    if images < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    if val_images < 0:
        raise ValueError(f"--val-images must be 0 or more, got {val_images}")
    if size < MIN_SIZE:
        raise ValueError(f"--size must be at least {MIN_SIZE} pixels, got {size}")
    classes = check_classes(tuple(classes))
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "train": write_split(output, "train", images, size, seed, options, classes=classes)
    }
    if val_images:
        summary["val"] = write_split(
            output, "val", val_images, size, seed, options, classes=classes
        )
    summary["seconds"] = time.perf_counter() - start
    return summary
