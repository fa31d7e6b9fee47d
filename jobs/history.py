"""`maskrcnn history OUTPUT`: the commits of a segment OUTPUT, newest first.

One line per commit: version, time (UTC), operation, run id, model, and the images the
commit added, replaced and removed and the error rows it wrote. Commits by other writers
(the ALTER that sets the table's properties, another engine's OPTIMIZE) show their
operation and blanks. `--version N` or `--as-of TIME` of query, evaluate, export-coco and
render read an older version. An OUTPUT of the previous folder format shows one line,
version "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from jobs.args import add_storage_arguments, storage_options_for

HELP = "list the commits of a segment OUTPUT (version, time, run, model, changes), newest first"

MODEL_CHARS = 16  # a model id's length (maskrcnn.checkpoint.model_id); longer ids are cut


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segment OUTPUT (local path or URI)")
    parser.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table (aligned text) or json (an array of objects, full model ids)",
    )
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from jobs.query import write_table
    from pipeline.output.history import output_history

    commits = output_history(args.output, storage_options_for(args, args.output))
    if args.format == "json":
        print(json.dumps([asdict(c) for c in commits], indent=2))
        return 0
    rows = [
        {
            **asdict(c),
            "version": "-" if c.version is None else c.version,
            "model": c.model[:MODEL_CHARS] if c.model else None,
        }
        for c in commits
    ]
    write_table(pa.Table.from_pylist(rows).to_reader(), sys.stdout, max_rows=len(rows))
    return 0
