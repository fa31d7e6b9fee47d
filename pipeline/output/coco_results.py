"""Detections as COCO results: from a segment OUTPUT or from model outputs.

A COCO result is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
"segmentation": {"size": [h, w], "counts": str}}`` (what ``COCO.loadRes``
accepts). OUTPUT rows carry URIs and class names; a ground-truth file carries
image ids and category ids. Images are matched by file name (the longest
trailing part of the URI's path equal to a ``file_name``, else a unique base
name) and categories by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.formats.rle import encode_masks
from pipeline.storage import get_fs, redact


def load_coco_json(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A COCO annotations file at any fsspec URI, checked for images and categories.

    Files without ``info``, ``licenses`` or ``annotations`` are accepted.
    """
    fs, path = get_fs(uri, options)
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"annotations file {redact(uri)} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotations file {redact(uri)} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"annotations file {redact(uri)} is not a COCO object (a JSON object)")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotations file {redact(uri)} has no '{key}' list")
    data.setdefault("annotations", [])
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(
                f"annotations file {redact(uri)}: every image needs 'id' and 'file_name' ({img!r:.80})"
            )
    return data


def _norm_rel(path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path.strip("/")


class ImageMatcher:
    """Finds the COCO image id of an image URI by file name.

    A URI matches the image whose ``file_name`` equals the longest trailing
    part of its path (``s3://b/data/train/cat.jpg`` matches ``train/cat.jpg``
    before ``cat.jpg``), else the image whose base name is the URI's base name
    when only one image has it.
    """

    def __init__(self, images: Sequence[Mapping[str, Any]]):
        self.by_path: dict[str, int] = {}
        by_base: dict[str, list[int]] = {}
        for img in images:
            rel = _norm_rel(str(img["file_name"]))
            self.by_path[rel] = img["id"]
            by_base.setdefault(rel.rsplit("/", 1)[-1], []).append(img["id"])
        self.by_base = {k: v[0] for k, v in by_base.items() if len(v) == 1}

    def match(self, uri: str) -> int | None:
        path = uri.split("://", 1)[-1].split("?", 1)[0]
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        for k in range(len(parts)):
            image_id = self.by_path.get("/".join(parts[k:]))
            if image_id is not None:
                return image_id
        return self.by_base.get(parts[-1]) if parts else None


@dataclass
class ExportStats:
    """What an export kept and left out (each count is also a warning when non-zero)."""

    images: int = 0  # ok images exported
    detections: int = 0
    error_rows: int = 0  # rows with status error, skipped
    unmatched_images: int = 0  # ok images with no image in the annotations
    duplicate_images: int = 0  # URIs matching an image another URI already matched
    unknown_class_detections: int = 0  # label_name not a category name
    unknown_classes: set[str] = field(default_factory=set)
    image_ids: set[int] = field(default_factory=set)  # annotation images that were matched
    unmatched_examples: list[str] = field(default_factory=list)  # the first few such URIs

    def warnings(self) -> list[str]:
        out = []
        if self.error_rows:
            out.append(f"{self.error_rows} error row(s) skipped (images the run could not read)")
        if self.unmatched_images:
            out.append(
                f"{self.unmatched_images} image(s) in OUTPUT are not in the annotations "
                "(no file_name matches their URI); their detections are left out"
            )
        if self.duplicate_images:
            out.append(
                f"{self.duplicate_images} image(s) match an annotation image already matched "
                "by another URI; left out"
            )
        if self.unknown_class_detections:
            names = ", ".join(sorted(self.unknown_classes)[:5])
            out.append(
                f"{self.unknown_class_detections} detection(s) of classes not among the "
                f"annotation categories ({names}) left out"
            )
        return out


def _flat_instances(batch: pa.RecordBatch) -> dict[str, Any]:
    """The batch's detections as flat columns; ``row`` is the index of each one's row."""
    inst = batch.column("instances")
    flat = pc.list_flatten(inst)
    return {
        "row": pc.list_parent_indices(inst).to_numpy(),
        "label": flat.field("label").to_numpy(zero_copy_only=False),
        "label_name": flat.field("label_name"),
        "score": flat.field("score").to_numpy(zero_copy_only=False),
        "box": flat.field("box").flatten().to_numpy(zero_copy_only=False).reshape(-1, 4),
        "counts": flat.field("mask_counts").to_pylist(),
    }


def _result_dicts(
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    sizes: np.ndarray,
    counts: Sequence[str],
) -> list[dict[str, Any]]:
    """COCO result dicts; boxes float [N, 4] x1, y1, x2, y2; sizes int [N, 2] (h, w)."""
    xywh = np.round(
        np.stack(
            [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1
        ).astype(np.float64),
        3,
    ).tolist()
    scores_list = np.round(scores.astype(np.float64), 6).tolist()
    return [
        {
            "image_id": i,
            "category_id": c,
            "bbox": b,
            "score": s,
            "segmentation": {"size": hw, "counts": rle},
        }
        for i, c, b, s, hw, rle in zip(
            image_ids.tolist(), category_ids.tolist(), xywh, scores_list, sizes.tolist(), counts
        )
    ]


def output_coco_results(
    results: Any,
    annotations: dict[str, Any] | None = None,
    image_ids: Mapping[str, int] | None = None,
    stats: ExportStats | None = None,
) -> Iterator[dict[str, Any]]:
    """COCO results of a committed OUTPUT (a pipeline.output.results.Results), lazily.

    With ``annotations`` (a COCO dict) image ids are matched by file name and
    category ids by class name; otherwise ``image_ids`` (uri -> id) gives the
    ids and category_id is the label. ``stats`` collects what was skipped.
    """
    # lazy: evaluate --model and train's evaluator import this module without an OUTPUT
    # (pipeline.output.results: pyarrow.dataset, 0.2 s, measured)
    from pipeline.output.results import count_errors, iter_ok_batches

    stats = stats if stats is not None else ExportStats()
    stats.error_rows = count_errors(results)
    matcher = ImageMatcher(annotations["images"]) if annotations is not None else None
    name_to_cat = (
        {c["name"]: c["id"] for c in annotations["categories"]} if annotations is not None else {}
    )
    for batch in iter_ok_batches(results, ["uri", "width", "height", "instances"]):
        row_ids = _row_image_ids(batch.column("uri").to_pylist(), matcher, image_ids, stats)
        det = _flat_instances(batch)
        det_image = row_ids[det["row"]]
        if matcher is not None:
            det_cat = _category_ids(det["label_name"], det_image, name_to_cat, stats)
        else:
            det_cat = det["label"].astype(np.int64)
        keep = np.nonzero((det_image >= 0) & (det_cat >= 0))[0]
        if len(keep) == 0:
            continue
        heights = batch.column("height").to_numpy(zero_copy_only=False)
        widths = batch.column("width").to_numpy(zero_copy_only=False)
        sizes = np.stack([heights, widths], 1)[det["row"][keep]]
        counts = det["counts"]
        stats.detections += len(keep)
        yield from _result_dicts(
            det_image[keep],
            det_cat[keep],
            det["box"][keep],
            det["score"][keep],
            sizes,
            [counts[k] for k in keep.tolist()],
        )


def _row_image_ids(
    uris: Sequence[str],
    matcher: ImageMatcher | None,
    image_ids: Mapping[str, int] | None,
    stats: ExportStats,
) -> np.ndarray:
    """The image id of each row (-1: left out), by ``matcher`` or else ``image_ids``."""
    row_ids = np.full(len(uris), -1, dtype=np.int64)
    for r, uri in enumerate(uris):  # per image, not per detection
        image_id = matcher.match(uri) if matcher is not None else image_ids.get(uri)
        if image_id is None:
            stats.unmatched_images += 1
            if len(stats.unmatched_examples) < 3:
                stats.unmatched_examples.append(redact(uri))
        elif matcher is not None and image_id in stats.image_ids:
            stats.duplicate_images += 1
        else:
            stats.image_ids.add(image_id)
            row_ids[r] = image_id
            stats.images += 1
    return row_ids


def _category_ids(
    label_names: Any, det_image: np.ndarray, name_to_cat: Mapping[str, int], stats: ExportStats
) -> np.ndarray:
    """The category id of each detection by its label_name (-1: not a category); counts
    the unknown ones of kept images (``det_image`` >= 0) in ``stats``."""
    names = pc.dictionary_encode(label_names)
    dict_names = names.dictionary.to_pylist() + [None]  # last: null names
    lookup = np.array([name_to_cat.get(n, -1) for n in dict_names], dtype=np.int64)
    codes = names.indices.fill_null(len(dict_names) - 1).to_numpy(zero_copy_only=False)
    det_cat = lookup[codes]
    unknown = (det_cat < 0) & (det_image >= 0)
    if unknown.any():
        stats.unknown_class_detections += int(unknown.sum())
        stats.unknown_classes.update(str(dict_names[c]) for c in np.unique(codes[unknown]))
    return det_cat


def output_image_ids(results: Any) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Ids 1..N for the ok images of OUTPUT, by sorted URI, and their COCO image entries."""
    from pipeline.output.results import iter_ok_batches  # lazy: see output_coco_results

    table = pa.Table.from_batches(
        list(iter_ok_batches(results, ["uri", "width", "height"])),
        schema=pa.schema([results.dataset.schema.field(n) for n in ("uri", "width", "height")]),
    ).sort_by("uri")
    rows = table.to_pylist()
    images = [
        {"id": i + 1, "file_name": r["uri"], "width": r["width"], "height": r["height"]}
        for i, r in enumerate(rows)
    ]
    return {r["uri"]: i + 1 for i, r in enumerate(rows)}, images


def output_categories(results: Any) -> list[dict[str, Any]]:
    """COCO categories ``{"id": label, "name": label_name}`` seen in OUTPUT's detections."""
    con = results.connect()
    pairs = con.sql("SELECT DISTINCT label, label_name FROM instances ORDER BY label").fetchall()
    return [{"id": int(label), "name": name} for label, name in pairs]


def predictions_to_coco_results(
    preds: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | Sequence[int],
) -> list[dict[str, Any]]:
    """COCO results of model outputs, one entry of ``preds`` per image in ``image_ids``.

    Each pred holds ``boxes`` [N, 4] x1, y1, x2, y2 pixels, ``scores`` [N],
    ``labels`` [N] and ``masks`` bool [N, H, W] at the image's size (torch
    tensors or numpy arrays). ``label_to_category_id`` maps a label to a COCO
    category id (a dict, or a sequence indexed by label); labels it lacks are
    dropped.
    """
    if isinstance(label_to_category_id, Mapping):
        table = dict(label_to_category_id)
    else:
        table = {i: c for i, c in enumerate(label_to_category_id) if c is not None and c >= 0}
    out: list[dict[str, Any]] = []
    for pred, image_id in zip(preds, image_ids):
        labels = _numpy(pred["labels"]).astype(np.int64)
        if len(labels) == 0:
            continue
        cats = np.array([table.get(int(v), -1) for v in np.unique(labels)], dtype=np.int64)
        det_cat = cats[np.searchsorted(np.unique(labels), labels)]
        keep = det_cat >= 0
        if not keep.any():
            continue
        masks = _numpy(pred["masks"])[keep]
        h, w = masks.shape[1:]
        counts, _ = encode_masks(masks)
        out.extend(
            _result_dicts(
                np.full(int(keep.sum()), image_id, dtype=np.int64),
                det_cat[keep],
                _numpy(pred["boxes"]).reshape(-1, 4)[keep],
                _numpy(pred["scores"])[keep],
                np.tile(np.array([[h, w]]), (int(keep.sum()), 1)),
                counts,
            )
        )
    return out


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)
