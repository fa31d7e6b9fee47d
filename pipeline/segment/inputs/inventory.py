"""INPUT as an AWS S3 Inventory report: the image keys its ``manifest.json`` lists.

S3 publishes a report as ``PREFIX/SOURCE-BUCKET/CONFIG/YYYY-MM-DDTHH-MMZ/manifest.json`` in a
destination bucket, with data files the manifest names by key in that same bucket. Read
here: ``sourceBucket``, ``fileFormat`` (CSV or Parquet; ORC is refused), ``fileSchema`` (the
CSV columns, e.g. "Bucket, Key, Size, LastModifiedDate") and ``files[].key``. CSV data files
are gzip-compressed, headerless, with URL-encoded keys; Parquet ones have columns bucket,
key, is_latest, ... (matched in any case, with or without underscores). Delete markers and
versions that are not the latest (when the report has those columns) are skipped; an image
key becomes ``s3://SOURCE-BUCKET/KEY``. Each data file is streamed (csv over gzip, Parquet
batches) in its own job, in parallel: Ray tasks when Ray is up and the report is remote.

A local copy of a report has no bucket: its data files are looked for under the nearest
folder above the manifest that holds the first of them.
"""

from __future__ import annotations

import csv
import gzip
import json
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.segment.inputs.names import is_image_name
from pipeline.segment.inputs.prefix import is_local, ordered_map
from pipeline.storage import first_line, full_uri, redact

PARQUET_BATCH = 65_536  # rows per Parquet batch read


@dataclass(frozen=True)
class Manifest:
    """What an inventory manifest says about its data: enough to read every file."""

    source_bucket: str
    file_format: str  # "CSV" or "PARQUET"
    columns: tuple[str, ...]  # CSV column names from fileSchema; () for Parquet
    data_paths: tuple[str, ...]  # the data files, as paths on the manifest's filesystem


def iter_inventory(fs: Any, path: str, input_uri: str) -> Iterator[list[str]]:
    """For each data file of the manifest at ``path``, its image URIs (sorted, unique).

    URIs of different files are not merged here: a file's list may repeat or interleave
    another's (listing.sorted_unique makes the whole sorted and unique).
    """
    manifest = read_manifest(fs, path, input_uri)
    jobs = ((fs, p, manifest, input_uri) for p in manifest.data_paths)
    yield from ordered_map(read_data_file, jobs, remote=not is_local(fs))


def read_manifest(fs: Any, path: str, input_uri: str) -> Manifest:
    """The manifest at ``path``; ValueError naming INPUT when it is not a usable one."""
    where = f"INPUT {redact(input_uri)}"
    try:
        doc = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not an S3 Inventory manifest (invalid JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not an S3 Inventory manifest (not a JSON object)")
    missing = [k for k in ("sourceBucket", "fileFormat", "files") if k not in doc]
    if missing:
        raise ValueError(f"{where}: not an S3 Inventory manifest (no {', '.join(missing)})")
    file_format = str(doc["fileFormat"]).upper()
    if file_format == "ORC":
        raise ValueError(
            f"{where}: ORC inventory reports are not supported; configure the inventory as CSV or Parquet"
        )
    if file_format not in ("CSV", "PARQUET"):
        raise ValueError(f"{where}: unknown fileFormat {doc['fileFormat']!r} (CSV or Parquet)")
    files = doc["files"]
    if not isinstance(files, list):
        raise ValueError(f"{where}: malformed S3 Inventory manifest (files is not a list)")
    keys = []
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ValueError(f"{where}: malformed S3 Inventory manifest (files[{i}] has no key)")
        keys.append(entry["key"].lstrip("/"))
    columns: tuple[str, ...] = ()
    if file_format == "CSV":
        schema = doc.get("fileSchema")
        columns = tuple(c.strip() for c in schema.split(",")) if isinstance(schema, str) else ()
        if _column(columns, "key") is None:
            raise ValueError(
                f"{where}: malformed S3 Inventory manifest (fileSchema names no Key column)"
            )
    root = _data_root(fs, path, keys[0], where) if keys else ""
    return Manifest(
        source_bucket=str(doc["sourceBucket"]),
        file_format=file_format,
        columns=columns,
        data_paths=tuple(f"{root}/{k}" for k in keys),
    )


def _data_root(fs: Any, path: str, first_key: str, where: str) -> str:
    """The folder the manifest's keys are relative to: its bucket, or for a local copy the
    nearest folder above it holding the first data file."""
    if not is_local(fs):
        return path.split("/", 1)[0]
    folder = posixpath.dirname(path)
    while True:
        if fs.exists(f"{folder.rstrip('/')}/{first_key}"):
            return folder.rstrip("/")
        parent = posixpath.dirname(folder)
        if parent == folder:
            raise FileNotFoundError(
                f"{where}: inventory data file {first_key} is in no folder above the manifest"
            )
        folder = parent


def read_data_file(fs: Any, path: str, manifest: Manifest, input_uri: str) -> list[str]:
    """The sorted, unique image URIs one inventory data file lists (a task's work)."""
    where = f"INPUT {redact(input_uri)}: inventory data file {redact(full_uri(fs, path))}"
    try:
        if manifest.file_format == "CSV":
            keys = _csv_keys(fs, path, manifest.columns, where)
        else:
            keys = _parquet_keys(fs, path, where)
        return sorted({f"s3://{manifest.source_bucket}/{k}" for k in keys if is_image_name(k)})
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} is missing") from None
    except (gzip.BadGzipFile, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not gzip-compressed CSV ({first_line(exc)})") from None
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{where} is not a Parquet file ({first_line(exc)})") from None


def _csv_keys(fs: Any, path: str, columns: tuple[str, ...], where: str) -> Iterator[str]:
    key_at = _column(columns, "key")
    latest_at = _column(columns, "islatest")
    marker_at = _column(columns, "isdeletemarker")
    need = max(i for i in (key_at, latest_at, marker_at) if i is not None) + 1
    with fs.open(path, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8", newline="") as text:
        for n, row in enumerate(csv.reader(text), 1):
            if len(row) < need:
                raise ValueError(
                    f"{where}: row {n} has {len(row)} columns, fileSchema {len(columns)}"
                )
            if marker_at is not None and row[marker_at].lower() == "true":
                continue
            if latest_at is not None and row[latest_at].lower() == "false":
                continue
            yield unquote_plus(row[key_at])


def _parquet_keys(fs: Any, path: str, where: str) -> Iterator[str]:
    with fs.open(path, "rb") as f:
        data = pq.ParquetFile(f)
        names = tuple(data.schema_arrow.names)
        wanted = [_column(names, c) for c in ("key", "islatest", "isdeletemarker")]
        if wanted[0] is None:
            raise ValueError(f"{where} has no key column (columns: {', '.join(names)})")
        present = [names[i] for i in wanted if i is not None]
        for batch in data.iter_batches(columns=present, batch_size=PARQUET_BATCH):
            values = {name: batch.column(name).to_pylist() for name in present}
            keys = values[names[wanted[0]]]
            latest = values.get(names[wanted[1]]) if wanted[1] is not None else None
            marker = values.get(names[wanted[2]]) if wanted[2] is not None else None
            for i, key in enumerate(keys):
                if key is None or (marker is not None and marker[i] is True):
                    continue
                if latest is not None and latest[i] is False:
                    continue
                yield key


def _column(names: tuple[str, ...], wanted: str) -> int | None:
    """Index of the column called ``wanted`` in any case, with or without underscores."""
    for i, name in enumerate(names):
        if name.lower().replace("_", "") == wanted:
            return i
    return None
