"""`maskrcnn query OUTPUT "SQL"`: SQL over a finished segment run, read-only.

Views: `images` (one row per input image, the Parquet schema) and `instances`
(one row per detection of the ok images: uri, width, height, model,
detection (0-based position in the image's list, score descending), label,
label_name, score, box (FLOAT[], 4 values) and x1, y1, x2, y2, mask_counts, area).
The connection cannot write or read any other file, load extensions or
change settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from jobs.args import (
    UsageError,
    add_storage_arguments,
    add_version_arguments,
    storage_options_for,
)

HELP = "run SQL (DuckDB, read-only) over a segment OUTPUT: views `images` and `instances`"

MAX_CELL = 40  # characters of a cell shown in the table format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segment OUTPUT (local path or URI)")
    parser.add_argument(
        "sql", metavar="SQL", help='e.g. "SELECT label_name, count(*) FROM instances GROUP BY 1"'
    )
    parser.add_argument(
        "--format",
        choices=["table", "csv", "json", "jsonl"],
        default="table",
        help="table (aligned text, long cells cut), csv, json (an array) or jsonl (one object a line)",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=1000,
        help="rows shown by the table format (csv/json print all); default 1000",
    )
    add_version_arguments(parser)
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import duckdb
    import pyarrow as pa

    from pipeline.output.results import open_results

    options = storage_options_for(args, args.output)
    results = open_results(args.output, options, args.version, args.as_of)
    con = results.connect()
    # Errors can surface while the result streams, not only when the query starts.
    try:
        relation = con.sql(args.sql)
        if relation is None:  # a statement without a result (e.g. CREATE TEMP VIEW)
            return 0
        reader = relation.to_arrow_reader(10_000)
        if args.format == "table":
            write_table(reader, sys.stdout, max_rows=args.max_rows)
        elif args.format == "csv":
            write_csv(reader, sys.stdout)
        else:
            write_json(reader, sys.stdout, lines=args.format == "jsonl")
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        # Mid-stream DuckDB errors reach us through Arrow as OSError.
        raise sql_error(exc) from exc
    return 0


def sql_error(exc: Exception) -> Exception:
    """A one-line UsageError (exit code 2) for a DuckDB error: bad SQL or a forbidden operation."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Permission Error" in first or "configuration has been locked" in first:
        first += " (queries are read-only over the views images and instances)"
    return UsageError(f"query failed: {first}")


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_table(reader: Any, out: TextIO, max_rows: int = 1000) -> int:
    """An aligned text table of at most ``max_rows`` rows; returns the rows shown."""
    names = reader.schema.names
    rows: list[list[str]] = []
    more = False
    for batch in reader:
        for record in batch.to_pylist():
            if len(rows) >= max_rows:
                more = True
                break
            rows.append([_cut(_cell_text(record[n]), MAX_CELL) for n in names])
        if more:
            break
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    numeric = [_is_numeric(reader.schema.field(i).type) for i in range(len(names))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return " | ".join(parts).rstrip()

    out.write(line(names) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write(line(r) + "\n")
    suffix = ", more not shown (--max-rows, or --format csv)" if more else ""
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{suffix})\n")
    return len(rows)


def _is_numeric(t: Any) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_decimal(t)


def write_csv(reader: Any, out: TextIO) -> None:
    """RFC 4180 CSV with a header; nested values as compact JSON."""
    import csv

    writer = csv.writer(out, lineterminator="\n")
    names = reader.schema.names
    writer.writerow(names)
    for batch in reader:
        for record in batch.to_pylist():
            writer.writerow([_csv_cell(record[n]) for n in names])


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return "" if value is None else value


def write_json(reader: Any, out: TextIO, lines: bool = False) -> None:
    """A JSON array of row objects, or with ``lines`` one object per line."""
    first = True
    if not lines:
        out.write("[")
    for batch in reader:
        for record in batch.to_pylist():
            text = json.dumps(record, default=str)
            if lines:
                out.write(text + "\n")
            else:
                out.write(("\n" if first else ",\n") + text)
            first = False
    if not lines:
        out.write("\n]\n" if not first else "]\n")
