"""`maskrcnn render OUTPUT DIR [--limit N] [--where SQL]`: PNG overlays of a finished run.

One PNG per selected image: masks tinted per class, boxes, "label score".
--where is an SQL predicate over the `images` view (e.g. "uri LIKE '%/cats/%'"
or "len(instances) > 3"), evaluated on the same read-only DuckDB connection
as `maskrcnn query`. Error rows are skipped.
"""

from __future__ import annotations

import argparse
import sys

from jobs.args import (
    add_storage_arguments,
    add_version_arguments,
    require_at_least,
    storage_options_for,
)

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
    add_version_arguments(parser)
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import duckdb
    import pyarrow as pa

    from jobs.query import sql_error
    from pipeline.output.render import render_output
    from pipeline.output.results import open_results
    from pipeline.storage import redact

    require_at_least("--limit", args.limit, 1)
    options = storage_options_for(args, args.output)
    results = open_results(args.output, options, args.version, args.as_of)

    def written(uri: str, overlay: str) -> None:
        print(f"render: {redact(uri)} -> {redact(overlay)}")

    def failed(uri: str, exc: Exception) -> None:
        print(f"maskrcnn render: warning: {redact(uri)}: {exc}", file=sys.stderr)

    try:
        stats = render_output(
            results,
            args.dir,
            lambda uri: storage_options_for(args, uri),
            limit=args.limit,
            where=args.where,
            min_score=args.min_score,
            on_written=written,
            on_failed=failed,
        )
    except (duckdb.Error, pa.ArrowException) as exc:
        raise sql_error(exc) from exc
    if stats.error_rows:
        print(f"render: skipped {stats.error_rows} error row(s)", file=sys.stderr)
    print(
        f"render: wrote {stats.written} overlay(s) to {redact(args.dir)}"
        + (f", {stats.failed} image(s) failed" if stats.failed else "")
    )
    return 0 if stats.written or not stats.failed else 1
