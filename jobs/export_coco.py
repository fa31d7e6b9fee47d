"""`maskrcnn export-coco OUTPUT results.json [--annotations coco.json]`.

Writes the detections of a finished segment run in COCO results format (a
JSON list of {image_id, category_id, bbox [x, y, w, h], score, segmentation
{size [h, w], counts}}), which ``COCO.loadRes`` accepts.

With --annotations, image ids come from the annotations (matched by file
name) and category ids by class name. Without, images get ids 1..N in URI
order and category_id is the model's label; the mapping is written beside the
results as RESULTS.ids.json, a COCO file with the images (file_name = URI)
and categories (id = label) and no annotations.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.args import add_storage_arguments, add_version_arguments, storage_options_for

HELP = "write a segment OUTPUT's detections as COCO results JSON (for COCO.loadRes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a finished segment OUTPUT")
    parser.add_argument("results", metavar="RESULTS", help="results JSON to write (local or URI)")
    parser.add_argument(
        "--annotations",
        metavar="URI",
        help="COCO annotations whose image ids (by file name) and category ids (by name) to use",
    )
    add_version_arguments(parser)
    add_storage_arguments(parser)


def sidecar_uri(results_uri: str) -> str:
    """Where the id mapping goes when no annotations are given: RESULTS.ids.json."""
    base = results_uri[: -len(".json")] if results_uri.endswith(".json") else results_uri
    return base + ".ids.json"


def run(args: argparse.Namespace) -> int:
    from pipeline.output.coco_results import (
        ExportStats,
        load_coco_json,
        output_categories,
        output_coco_results,
        output_image_ids,
    )
    from pipeline.output.results import open_results
    from pipeline.storage import redact, write_json_list, write_text

    options = storage_options_for(args, args.output)
    results = open_results(args.output, options, args.version, args.as_of)
    stats = ExportStats()
    if args.annotations:
        annotations = load_coco_json(args.annotations, storage_options_for(args, args.annotations))
        rows = output_coco_results(results, annotations, stats=stats)
        written = write_json_list(args.results, rows, storage_options_for(args, args.results))
    else:
        ids, images = output_image_ids(results)
        rows = output_coco_results(results, image_ids=ids, stats=stats)
        written = write_json_list(args.results, rows, storage_options_for(args, args.results))
        mapping = {"images": images, "categories": output_categories(results), "annotations": []}
        side = sidecar_uri(args.results)
        write_text(side, json.dumps(mapping), storage_options_for(args, side))
        print(f"export-coco: image ids and categories in {redact(side)}")
    for w in stats.warnings():
        print(f"maskrcnn export-coco: warning: {w}", file=sys.stderr)
    print(
        f"export-coco: wrote {written} detections of {stats.images} images to {redact(args.results)}"
    )
    return 0
