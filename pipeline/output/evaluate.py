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
    per_class_out: dict[str, dict[int, dict[str, float]]] | None = None,
) -> dict[str, dict[str, float]]:
    """COCO AP of ``results_list`` against ``gt_coco`` (a COCO or a dataset dict).

    Returns ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
    "AR10", "AR100", "ARs", "ARm", "ARl"}, "segm": {...}}`` with values in
    0..1 (-1 where COCOeval has no ground truth, e.g. no small objects).
    ``image_ids`` restricts evaluation to those images (default: all of the
    ground truth's). Results need ``segmentation`` RLEs for segm. When
    ``summary_out`` is given, COCOeval's summarize() table for each IoU type is
    written there; ``per_class_out`` gets ``{iou_type: {category id: {"AP", "AP50",
    "AP75"}}}`` (:func:`per_class_ap`). An empty results list scores 0 where there is
    ground truth.
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
        if per_class_out is not None:
            per_class_out[iou_type] = per_class_ap(evaluator)
    return metrics


def per_class_ap(evaluator: Any) -> dict[int, dict[str, float]]:
    """{category id: {"AP", "AP50", "AP75"}} of an accumulated COCOeval: its precision
    [IoU thresholds, recall points, categories, areas, max dets] averaged as summarize()
    does for one category (all areas, the largest max dets); -1 without ground truth."""
    precision = evaluator.eval["precision"]
    thresholds = [round(float(t), 2) for t in evaluator.params.iouThrs]
    picks = {"AP": slice(None), "AP50": [thresholds.index(0.5)], "AP75": [thresholds.index(0.75)]}
    out = {}
    for k, cat in enumerate(evaluator.params.catIds):
        values = {}
        for name, rows in picks.items():
            p = precision[rows, :, k, 0, -1]
            values[name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        out[int(cat)] = values
    return out


def per_class_rows(
    gt: Any, per_class: Mapping[str, Mapping[int, Mapping[str, float]]], image_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """One row per category of ``gt`` (a COCO dict or COCO): its id, name, ground-truth
    instances (not crowd) in ``image_ids``, and each IoU type's AP, AP50, AP75."""
    dataset = gt.dataset if isinstance(gt, COCO) else gt
    ids = set(image_ids)
    counts: dict[int, int] = {}
    for ann in dataset.get("annotations", []):
        if ann["image_id"] in ids and not ann.get("iscrowd", 0):
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    rows = []
    for cat in sorted(dataset["categories"], key=lambda c: c["id"]):
        row: dict[str, Any] = {"id": cat["id"], "name": cat["name"]}
        row["instances"] = counts.get(cat["id"], 0)
        for iou_type, table in per_class.items():
            row[iou_type] = dict(table.get(cat["id"], {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}))
        rows.append(row)
    return rows


def per_class_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-class rows as an aligned table, one line per class (-1 prints as "-")."""
    kinds = [k for k in IOU_TYPES if rows and k in rows[0]]
    width = max([len("class")] + [len(str(r["name"])) for r in rows])
    head = f"{'class':<{width}}  {'gt':>6}"
    for kind in kinds:
        head += "".join(f"  {f'{kind} {n}':>10}" for n in ("AP", "AP50", "AP75"))
    lines = [head]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['instances']:>6}"
        for kind in kinds:
            for n in ("AP", "AP50", "AP75"):
                v = r[kind][n]
                line += f"  {(f'{v:.3f}' if v >= 0 else '-'):>10}"
        lines.append(line)
    return "\n".join(lines) + "\n"


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
    results: Any,
    annotations: dict[str, Any],
    summary_out: TextIO | None = None,
    per_class_out: dict[str, dict[int, dict[str, float]]] | None = None,
) -> tuple[dict[str, dict[str, float]], Any]:
    """COCO AP of a committed OUTPUT (a pipeline.output.results.Results) against ``annotations``.

    Only the annotation images the OUTPUT holds are evaluated (a run over part
    of a dataset is scored on that part; :func:`coverage_warning` says so). Returns
    (metrics, ExportStats). ValueError, saying how names are matched, when no image
    of OUTPUT is an image of the annotations.
    """
    stats = ExportStats()
    dets = list(output_coco_results(results, annotations, stats=stats))
    if not stats.image_ids:
        raise ValueError(
            f"no image of OUTPUT matches an image of the annotations by file name "
            f"(OUTPUT has e.g. {', '.join(stats.unmatched_examples) or 'no ok image'}; the "
            f"annotations e.g. {', '.join(_file_names(annotations['images'][:3]))}): an "
            f"image's URI matches the file_name equal to the end of its path "
            f"(s3://b/data/train/cat.jpg matches train/cat.jpg or cat.jpg), else the one "
            f"file_name with its base name; is --annotations the dataset this run segmented?"
        )
    metrics = coco_evaluate(
        annotations,
        dets,
        image_ids=sorted(stats.image_ids),
        summary_out=summary_out,
        per_class_out=per_class_out,
    )
    return metrics, stats


def coverage_warning(stats: Any, annotations: Mapping[str, Any]) -> str | None:
    """A warning when OUTPUT's images and the annotations' images only partly agree (each
    side's count and three example names), None when they are the same images."""
    missing = [im for im in annotations["images"] if im["id"] not in stats.image_ids]
    if not missing and not stats.unmatched_images:
        return None
    text = f"AP is over the {len(stats.image_ids)} images OUTPUT and the annotations share"
    if missing:
        names = ", ".join(_file_names(sorted(missing, key=lambda im: str(im["file_name"]))[:3]))
        text += (
            f"; {len(missing)} of the annotations' {len(annotations['images'])} images "
            f"are not in OUTPUT (e.g. {names})"
        )
    if stats.unmatched_images:
        text += (
            f"; {stats.unmatched_images} of OUTPUT's images are not in the annotations "
            f"(e.g. {', '.join(stats.unmatched_examples)})"
        )
    return text


def _file_names(images: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(im["file_name"]) for im in images]


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
