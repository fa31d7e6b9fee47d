"""`maskrcnn evaluate`: COCO bbox and segm AP (pycocotools) of a run or of a model.

    maskrcnn evaluate --predictions OUTPUT --annotations coco.json
    maskrcnn evaluate --model model.safetensors --annotations coco.json [--images ROOT]

Prints COCOeval's summarize() table for bbox and segm, then AP, AP50 and AP75 per class
with each class's ground-truth instances, and writes it all as JSON (--output, default
metrics.json in the current directory; per class under "per_class").
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jobs.args import (
    UsageError,
    add_storage_arguments,
    add_version_arguments,
    positive_int,
    require_at_least,
    storage_options_for,
)

HELP = "COCO bbox and segm AP of a segment OUTPUT (--predictions) or a model (--model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--predictions", metavar="OUTPUT", help="a finished segment OUTPUT")
    what.add_argument("--model", metavar="URI", help="a safetensors checkpoint to run")
    parser.add_argument(
        "--annotations", required=True, metavar="URI", help="COCO annotations JSON (ground truth)"
    )
    parser.add_argument(
        "--images",
        metavar="URI",
        help="with --model: folder the annotations' file_name are relative to "
        "(default: the annotations file's folder)",
    )
    parser.add_argument(
        "--output",
        default="metrics.json",
        metavar="PATH",
        help="metrics JSON to write (local or URI; default metrics.json)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="with --model: images per batch"
    )
    parser.add_argument(
        "--device", default="auto", help="with --model: auto (cuda when available), cpu, cuda:0..."
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="with --model: drop detections below (default: the model config's)",
    )
    parser.add_argument(
        "--max-detections",
        type=positive_int,
        default=100,
        help="with --model: per image (default 100)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="with --model: only the first N images (by id)"
    )
    add_version_arguments(parser, "--predictions")
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.output.coco_results import load_coco_json
    from pipeline.output.evaluate import coco_evaluate, per_class_rows, per_class_text
    from pipeline.storage import redact, write_text

    require_at_least("--limit", args.limit, 1, " (or left out for every image)")
    if args.model and (args.version is not None or args.as_of is not None):
        raise UsageError("--version and --as-of choose a version of --predictions, not of --model")
    annotations = load_coco_json(args.annotations, storage_options_for(args, args.annotations))
    report: dict = {"annotations": redact(args.annotations)}
    per_class: dict = {}
    if args.predictions:
        metrics, image_ids = _evaluate_output(args, annotations, report, per_class)
    else:
        preds, image_ids, seconds = _run_model(args, annotations)
        metrics = coco_evaluate(
            annotations, preds, image_ids=image_ids, summary_out=sys.stdout,
            per_class_out=per_class,
        )  # fmt: skip
        report.update(
            model_uri=redact(args.model),
            images=len(image_ids),
            detections=len(preds),
            seconds=round(seconds, 2),
        )
    report["metrics"] = metrics
    report["per_class"] = per_class_rows(annotations, per_class, image_ids)
    print("per class (gt: ground-truth instances in the images evaluated):")
    print(per_class_text(report["per_class"]), end="")
    write_text(
        args.output, json.dumps(report, indent=2) + "\n", storage_options_for(args, args.output)
    )
    summary = ", ".join(f"{t} AP {m['AP']:.3f} AP50 {m['AP50']:.3f}" for t, m in metrics.items())
    print(f"evaluate: {report['images']} images, {report['detections']} detections: {summary}")
    print(f"evaluate: wrote {redact(args.output)}")
    return 0


def _evaluate_output(
    args: argparse.Namespace, annotations: dict, report: dict, per_class: dict
) -> tuple[dict, list[int]]:
    """--predictions: (metrics, image ids evaluated); the warnings printed, ``report``
    and ``per_class`` filled."""
    import dataclasses

    from pipeline.output.evaluate import coverage_warning, evaluate_output
    from pipeline.output.results import open_results
    from pipeline.storage import redact

    options = storage_options_for(args, args.predictions)
    results = open_results(args.predictions, options, args.version, args.as_of)
    metrics, stats = evaluate_output(
        results, annotations, summary_out=sys.stdout, per_class_out=per_class
    )
    coverage = coverage_warning(stats, annotations)
    if coverage:
        print(f"maskrcnn evaluate: warning: {coverage}", file=sys.stderr)
        stats = dataclasses.replace(stats, unmatched_images=0)  # said just above
    for w in stats.warnings():
        print(f"maskrcnn evaluate: warning: {w}", file=sys.stderr)
    report.update(
        predictions=redact(args.predictions),
        version=results.manifest.get("version"),
        model=results.manifest.get("model"),
        images=len(stats.image_ids),
        detections=stats.detections,
    )
    return metrics, sorted(stats.image_ids)


def _run_model(args: argparse.Namespace, annotations: dict) -> tuple[list, list, float]:
    import torch

    from jobs.args import UsageError
    from pipeline.output.checkpoint import load_checkpoint
    from pipeline.output.evaluate import predict_coco_results
    from pipeline.storage import redact

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    model = load_checkpoint(args.model, device)
    images_root = args.images or _parent(args.annotations)
    total = min(len(annotations["images"]), args.limit or len(annotations["images"]))
    seen = [0]
    start = time.perf_counter()

    def progress(n: int) -> None:
        seen[0] += n
        if sys.stderr.isatty():
            print(f"\revaluate: {seen[0]}/{total} images", end="", file=sys.stderr, flush=True)

    preds, image_ids, problems = predict_coco_results(
        model,
        annotations,
        images_root,
        storage_options_for(args, images_root),
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        limit=args.limit,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if problems:
        print(
            f"maskrcnn evaluate: warning: {len(problems)} image(s) left out, e.g. {problems[0]}",
            file=sys.stderr,
        )
    if not image_ids:
        raise ValueError(
            f"no image of {redact(args.annotations)} could be read from {redact(images_root)} "
            "(pass the image folder with --images)"
        )
    return preds, image_ids, seconds


def _parent(uri: str) -> str:
    """The folder holding ``uri`` (a COCO file's file_names are usually relative to it)."""
    return uri.rsplit("/", 1)[0] if "/" in uri.split("://", 1)[-1] else "."
