"""`maskrcnn render OUTPUT DIR [--limit N] [--where SQL]`: PNG overlays of a finished run.

One PNG per selected image: masks tinted per class, boxes, "label score".
--where is an SQL predicate over the `images` view (e.g. "uri LIKE '%/cats/%'"
or "len(instances) > 3"), evaluated on the same read-only DuckDB connection
as `maskrcnn query`. Error rows are skipped.
"""

from __future__ import annotations

import argparse
import sys

from jobs.query import add_storage_arguments, storage_options_for

HELP = "draw PNG overlays (masks, boxes, labels) for images of a segment OUTPUT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a finished segment OUTPUT")
    parser.add_argument("dir", metavar="DIR", help="folder to write PNGs to (local or URI)")
    parser.add_argument("--limit", type=int, default=100, help="at most N images (default 100)")
    parser.add_argument(
        "--where", default=None, metavar="SQL", help="SQL predicate over the images view"
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, help="draw detections scoring at least this"
    )
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import duckdb
    import pyarrow as pa

    from jobs.cli import UsageError
    from jobs.query import sql_error
    from pipeline.output.results import open_results
    from pipeline.storage import get_fs, join, redact

    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    results = open_results(args.output, storage_options_for(args, args.output))
    con = results.connect()
    where = f"({args.where})" if args.where else "true"
    out_fs, out_path = get_fs(args.dir, storage_options_for(args, args.dir))
    written = skipped = 0
    try:
        errors = con.sql(
            f"SELECT count(*) FROM images WHERE status <> 'ok' AND {where}"
        ).fetchall()[0][0]
        reader = con.sql(
            "SELECT uri, width, height, instances FROM images "
            f"WHERE status = 'ok' AND {where} ORDER BY uri LIMIT {int(args.limit)}"
        ).to_arrow_reader(16)
        for batch in reader:
            if batch.num_rows:
                out_fs.makedirs(out_path, exist_ok=True)
            for row in batch.to_pylist():
                target = join(out_path, _overlay_name(row["uri"]))
                try:
                    _render_one(row, target, out_fs, args)
                except (OSError, ValueError) as exc:
                    skipped += 1
                    print(f"maskrcnn render: warning: {redact(row['uri'])}: {exc}", file=sys.stderr)
                    continue
                written += 1
                print(f"render: {redact(row['uri'])} -> {redact(_full(out_fs, target))}")
    except (duckdb.Error, pa.ArrowException) as exc:
        raise sql_error(exc) from exc
    if errors:
        print(f"render: skipped {errors} error row(s)", file=sys.stderr)
    print(
        f"render: wrote {written} overlay(s) to {redact(args.dir)}"
        + (f", {skipped} image(s) failed" if skipped else "")
    )
    return 0 if written or not skipped else 1


def _overlay_name(uri: str) -> str:
    from pipeline.output.render import overlay_name

    return overlay_name(uri)


def _full(fs, path: str) -> str:
    from pipeline.storage import full_uri

    return full_uri(fs, path)


def _render_one(row: dict, target: str, out_fs, args: argparse.Namespace) -> None:
    """Read, decode and draw one image's detections; write the PNG to ``target``."""
    from pipeline.formats.decode import decode_image
    from pipeline.output.render import draw_detections, png_bytes
    from pipeline.storage import get_fs

    uri = row["uri"]
    fs, path = get_fs(uri, storage_options_for(args, uri))
    image = decode_image(fs.cat_file(path), uri)
    height, width = row["height"], row["width"]
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"the image is now {image.shape[1]}x{image.shape[0]}, the run saw {width}x{height}"
        )
    detections = [d for d in row["instances"] or [] if d["score"] >= args.min_score]
    out_fs.pipe_file(target, png_bytes(draw_detections(image, detections)))
