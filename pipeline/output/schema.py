"""The segment output contract: the Parquet schema, and what commits the rows.

A segment OUTPUT is a Delta Lake table (pipeline/output/table.py): Parquet data files
plus ``_delta_log/``, whose commits carry what a manifest held. An OUTPUT written before
the table format is a folder of Parquet files plus ``_manifest.json``, written last as
the commit point, listing the data files relative to OUTPUT; it still reads, and the
next segment run converts it into a table in place. Readers read exactly the files the
log (or the manifest) commits and refuse an OUTPUT with neither: other files there may
be the leftovers of a killed run, or of versions before.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.output.table import has_table, load_table, table_manifest
from pipeline.storage import get_fs, join, redact

MANIFEST_NAME = "_manifest.json"
FORMAT = "maskrcnn-segment/1"

INSTANCE_TYPE = pa.struct(
    [
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("score", pa.float32()),
        # x1, y1, x2, y2 in pixels: 4 values, in a list since Delta has no fixed-size list
        pa.field("box", pa.list_(pa.float32())),
        pa.field("mask_counts", pa.string()),  # COCO compressed RLE, size [height, width]
        pa.field("area", pa.int64()),  # mask pixels
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error", pa.string()),  # short reason, null when ok
        pa.field("width", pa.int32()),  # after EXIF orientation; null on error
        pa.field("height", pa.int32()),
        pa.field("instances", pa.list_(INSTANCE_TYPE)),  # score descending
        pa.field("model", pa.string()),  # model id (hash of the weights)
    ]
)


class IncompleteOutputError(FileNotFoundError):
    """OUTPUT has no manifest: the run that writes it did not finish."""


def manifest_uri(output: str) -> str:
    return join(output, MANIFEST_NAME)


def read_manifest(
    output: str,
    options: dict[str, Any] | None = None,
    version: int | None = None,
    as_of: str | None = None,
) -> dict[str, Any]:
    """What commits ``output``'s rows, as a dict: the newest segment commit's record and
    ``files`` (relative to OUTPUT) of a table at its latest version, ``version`` or ``as_of``
    (pipeline/output/table.py); else the manifest of a folder-format OUTPUT, its ``files``
    relative to OUTPUT.

    Raises IncompleteOutputError (naming OUTPUT) when there is neither, and
    ValueError when it is not a manifest this version understands, or the version
    asked for is not there.
    """
    if has_table(output, options):
        return table_manifest(output, load_table(output, options, version, as_of))
    fs, path = get_fs(manifest_uri(output), options)
    if not fs.exists(path):
        raise IncompleteOutputError(
            f"{redact(output)} holds no committed segment table (no _delta_log/, no "
            f"{MANIFEST_NAME}): the segment run did not finish "
            "(re-run the same `maskrcnn segment` command to complete it)"
        )
    if version is not None or as_of is not None:
        raise ValueError(
            f"{redact(output)} is a folder-format OUTPUT ({MANIFEST_NAME}), which has one "
            "version only: drop --version/--as-of, or re-run segment on it to make it a table"
        )
    with fs.open(path, "rb") as f:
        try:
            manifest = json.loads(f.read())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{redact(manifest_uri(output))} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(
            f"{redact(manifest_uri(output))} is not a {FORMAT} manifest "
            f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    return manifest


def committed_files(
    output: str,
    options: dict[str, Any] | None = None,
    version: int | None = None,
    as_of: str | None = None,
) -> list[str]:
    """Full URIs of the Parquet files that ``output``'s log (or manifest) commits."""
    return full_paths(output, read_manifest(output, options, version, as_of)["files"])


def full_paths(output: str, files: list[str]) -> list[str]:
    """``files`` (relative to OUTPUT, or full already) as full URIs."""
    return [f if "://" in f or f.startswith("/") else join(output, f) for f in files]


# Manifest fields (writer: pipeline/segment; readers: query, export-coco, evaluate, render):
#   format      FORMAT
#   run_id      str, unique per run
#   model       model id, equal to the rows' `model` column
#   model_uri   redacted URI of the checkpoint (or torchvision weights path)
#   config      the model config as a dict (class_names included)
#   input       redacted INPUT URI
#   files       list of data files relative to OUTPUT (the dataset, nothing else)
#   counts      {"images", "ok", "error", "instances"}: images == ok + error == rows
#   started, finished   ISO 8601 UTC
#   versions    {"maskrcnn", "torch", "torchvision", "ray", "pyarrow"}
