"""COCO evaluation (pycocotools' COCOeval) of detections: bbox and segm AP.

Used by ``maskrcnn evaluate`` (over a finished segment OUTPUT, or by running a
model over an annotation file's images) and by training every --eval-every
iterations (:func:`coco_evaluate` on :func:`predictions_to_coco_results`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.formats.decode import DecodeError, decode_image
from pipeline.output.coco_results import (
    ExportStats,
    output_coco_results,
    predictions_to_coco_results,  # public here too
)
from pipeline.storage import get_fs, join, redact

# COCOeval.stats, in order, under the names people quote.
STAT_NAMES = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
]
IOU_TYPES = ("bbox", "segm")


def ground_truth(gt: Any) -> Any:
    """A pycocotools COCO for ``gt`` (a COCO dataset dict or a COCO), made evaluable.

    COCOeval needs ``iscrowd`` and ``area`` on every annotation and ``id``s;
    files without them (or without ``info``/``licenses``) get defaults: not
    crowd, the mask area (or box area), ids 1..N.
    """
    if isinstance(gt, COCO):
        dataset = gt.dataset
    else:
        dataset = copy.deepcopy(gt)
    dataset.setdefault("annotations", [])
    heights = {img["id"]: (img.get("height"), img.get("width")) for img in dataset["images"]}
    for i, ann in enumerate(dataset["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            seg = ann.get("segmentation")
            h, w = heights.get(ann["image_id"], (None, None))
            if seg and h and w:
                rles = (
                    mask_utils.frPyObjects(seg, h, w)
                    if isinstance(seg, list) or isinstance(seg.get("counts"), list)
                    else seg
                )
                ann["area"] = float(
                    mask_utils.area(mask_utils.merge(rles) if isinstance(rles, list) else rles)
                )
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    gt_coco: Any,
    results_list: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = IOU_TYPES,
    summary_out: TextIO | None = None,
) -> dict[str, dict[str, float]]:
    """COCO AP of ``results_list`` against ``gt_coco`` (a COCO or a dataset dict).

    Returns ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
    "AR10", "AR100", "ARs", "ARm", "ARl"}, "segm": {...}}`` with values in
    0..1 (-1 where COCOeval has no ground truth, e.g. no small objects).
    ``image_ids`` restricts evaluation to those images (default: all of the
    ground truth's). Results need ``segmentation`` RLEs for segm. When
    ``summary_out`` is given, COCOeval's summarize() table for each IoU type is
    written there. An empty results list scores 0 where there is ground truth.
    """
    gt = ground_truth(gt_coco)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(set(image_ids))
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type == "segm" and any(not a.get("segmentation") for a in gt.dataset["annotations"]):
            print(
                "warning: some ground-truth annotations have no segmentation; segm AP not computed",
                file=sys.stderr,
            )
            continue
        dt = _load_results(gt, results_list, iou_type)
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = ids
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            evaluator.evaluate()
            evaluator.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            evaluator.summarize()
        if summary_out is not None:
            summary_out.write(f"{iou_type}:\n{table.getvalue()}")
        metrics[iou_type] = {n: float(v) for n, v in zip(STAT_NAMES, evaluator.stats)}
    return metrics


def _load_results(gt: Any, results_list: Sequence[Mapping[str, Any]], iou_type: str) -> Any:
    """``gt.loadRes`` on copies of the results, tuned per IoU type, quietly.

    For segm the box is dropped: with a box present loadRes takes the box area
    as the detection's area, and small/medium/large would then be judged by
    box, not mask, area.
    """
    if iou_type == "segm":
        anns = [{k: v for k, v in r.items() if k != "bbox"} for r in results_list]
    else:
        anns = [{k: v for k, v in r.items() if k != "segmentation"} for r in results_list]
    unknown = {a["image_id"] for a in anns} - set(gt.getImgIds())
    if unknown:
        raise ValueError(
            f"{len(unknown)} result image id(s) are not in the ground truth (e.g. {min(unknown)})"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        if anns:
            return gt.loadRes(anns)
        # loadRes refuses an empty list; no detections is a valid (zero) result.
        empty = COCO()
        empty.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        empty.createIndex()
        return empty


def label_to_category_ids(
    class_names: Sequence[str], categories: Sequence[Mapping[str, Any]]
) -> dict[int, int]:
    """Model label -> COCO category id, matched by name (label 0 is background).

    Raises ValueError when no class name is a category name.
    """
    by_name = {c["name"]: c["id"] for c in categories}
    table = {i: by_name[n] for i, n in enumerate(class_names) if i > 0 and n in by_name}
    if not table:
        raise ValueError(
            f"none of the model's class names {list(class_names[1:])[:8]} is a category name "
            f"in the annotations {[c['name'] for c in categories][:8]}"
        )
    return table


def evaluate_output(
    results: Any, annotations: dict[str, Any], summary_out: TextIO | None = None
) -> tuple[dict[str, dict[str, float]], Any]:
    """COCO AP of a committed OUTPUT (a pipeline.output.results.Results) against ``annotations``.

    Only the annotation images the OUTPUT holds are evaluated (a run over part
    of a dataset is scored on that part). Returns (metrics, ExportStats).
    """
    stats = ExportStats()
    dets = list(output_coco_results(results, annotations, stats=stats))
    if not stats.image_ids:
        raise ValueError(
            "no image of OUTPUT matches an image of the annotations by file name "
            "(is --annotations the dataset this run segmented?)"
        )
    metrics = coco_evaluate(
        annotations, dets, image_ids=sorted(stats.image_ids), summary_out=summary_out
    )
    return metrics, stats


def predict_coco_results(
    model: Any,
    annotations: dict[str, Any],
    images_root: str,
    options: dict[str, Any] | None = None,
    batch_size: int = 4,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    limit: int | None = None,
    progress: Any = None,
) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Run ``model`` (a maskrcnn.MaskRCNN, on its device) over the annotation images.

    Images are read from ``images_root``/``file_name`` through fsspec and
    decoded like the segment job does. Returns (COCO results, ids of the
    images evaluated, one message per image that could not be used).
    """
    import torch  # lazy: `maskrcnn evaluate OUTPUT` never needs torch (1.2 s, measured)

    label_map = label_to_category_ids(model.cfg.label_names, annotations["categories"])
    images = sorted(annotations["images"], key=lambda im: im["id"])[:limit]
    fs, _ = get_fs(images_root, options)
    results: list[dict[str, Any]] = []
    done: list[int] = []
    problems: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tensors, ids = [], []
        for image_id, rgb in _read_images(fs, images_root, options, chunk, problems):
            tensors.append(torch.from_numpy(rgb).permute(2, 0, 1).to(model.device))
            ids.append(image_id)
        if tensors:
            with torch.inference_mode():
                preds = model.predict(
                    tensors, score_threshold=score_threshold, max_detections=max_detections
                )
            results += predictions_to_coco_results(preds, ids, label_map)
            done += ids
        if progress is not None:
            progress(len(chunk))
    return results, done, problems


def _read_images(
    fs: Any,
    images_root: str,
    options: dict[str, Any] | None,
    images: Sequence[Mapping[str, Any]],
    problems: list[str],
) -> list[tuple[int, Any]]:
    """(image id, uint8 RGB [H, W, 3]) of each of ``images`` (COCO image entries) that
    reads, decodes and has the size its entry says; one message in ``problems`` for
    each other one."""
    paths = {im["id"]: get_fs(join(images_root, im["file_name"]), options)[1] for im in images}
    blobs = fs.cat(list(paths.values()), on_error="return")  # concurrent on object stores
    decoded = []
    for im in images:
        data = blobs.get(paths[im["id"]])
        where = redact(join(images_root, im["file_name"]))
        try:
            if isinstance(data, BaseException) or data is None:
                raise OSError(f"cannot read: {data}")
            rgb = decode_image(data)
        except (OSError, DecodeError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        if im.get("height") and (rgb.shape[0], rgb.shape[1]) != (im["height"], im["width"]):
            problems.append(
                f"{where}: decoded {rgb.shape[1]}x{rgb.shape[0]} but the annotations say "
                f"{im['width']}x{im['height']}"
            )
            continue
        decoded.append((im["id"], rgb))
    return decoded
