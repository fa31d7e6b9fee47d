"""A segment OUTPUT as a Delta Lake table: the log is the one commit point.

Layout (any fsspec URI that delta-rs also reaches: a local path, s3://)::

    OUTPUT/_delta_log/              the Delta log (delta-rs writes it; every engine reads it)
    OUTPUT/run-<seq>/part-*.parquet the parts of run number <seq>, committed by its log entry
    OUTPUT/part-*.parquet           the parts of an OUTPUT converted from the folder format
    OUTPUT/_run/                    the unfinished run's state (pipeline/segment/output.py)

Each segment commit carries, besides its add and remove actions:

* Delta's application transaction ``txn`` (:data:`APP_ID`, the run's sequence number), so a
  re-run of a driver that died after its commit finds it and does not commit again;
* its record under the commit info key :data:`RECORD_KEY`: run id, model id and URI, model
  config, INPUT, options, the table's counts after the commit (``counts``), what this
  commit changed (``changes``), times and versions: what ``_manifest.json`` held before.

The table properties ``maskrcnn.*`` (:data:`PROPERTIES`) name the model and options that made
the rows, for engines that never read our commit info.

A record (the writer: pipeline/segment/commit.py; readers: query, evaluate, export-coco,
render, history)::

    format, run_id, model, model_uri, config, input, options, started, finished, versions
    operation   "segment" (a run), "convert" (a folder-format OUTPUT made a table)
    counts      the table's rows after this commit: {"images", "ok", "error", "instances"}
    changes     this commit's: {"added", "replaced", "removed", "errors"} images
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import get_fs, join, protocol_of, redact

APP_ID = "maskrcnn-segment"
LOG_DIR = "_delta_log"
RECORD_KEY = "maskrcnn"
PROPERTY_PREFIX = "maskrcnn."
FAULT_AFTER_COMMIT_ENV = "MASKRCNN_FAULT_AFTER_COMMIT"  # tests only: see commit_files
# What decides the rows: a run whose values differ is another run (jobs refuse it).
PROPERTIES = ("model", "options", "input", "format")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def delta_storage_options(uri: str, options: dict[str, Any] | None) -> dict[str, str] | None:
    """delta-rs storage options for ``uri`` from our fsspec ``options`` and the environment.

    delta-rs reads the AWS_* variables itself; what fsspec takes as options (an endpoint in
    client_kwargs, key/secret, anon) is translated to its names.
    """
    if protocol_of(uri) not in ("s3", "s3a"):
        return None
    opts = dict(options or {})
    client = dict(opts.get("client_kwargs") or {})
    endpoint = (
        opts.get("endpoint_url")
        or client.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        client.get("region_name")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    out: dict[str, str] = {}
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    if region:
        out["AWS_REGION"] = region
    if opts.get("key") and opts.get("secret"):
        out["AWS_ACCESS_KEY_ID"] = opts["key"]
        out["AWS_SECRET_ACCESS_KEY"] = opts["secret"]
        if opts.get("token"):
            out["AWS_SESSION_TOKEN"] = opts["token"]
    if opts.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    return out


def table_uri(output: str) -> str:
    """OUTPUT as delta-rs spells it (s3a:// is s3:// there)."""
    return "s3://" + output.split("://", 1)[1] if protocol_of(output) == "s3a" else output


def has_table(output: str, options: dict[str, Any] | None = None) -> bool:
    """True when OUTPUT holds a Delta log."""
    fs, path = get_fs(join(output, LOG_DIR), options)
    fs.invalidate_cache(path)
    try:
        return bool(fs.exists(path)) and bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def load_table(
    output: str,
    options: dict[str, Any] | None = None,
    version: int | None = None,
    as_of: str | datetime | None = None,
) -> Any:
    """The DeltaTable at OUTPUT: its latest version, ``version``, or the one current at
    ``as_of`` (an ISO 8601 time, or a datetime). Raises ValueError naming OUTPUT and the
    versions it has when the version asked for is not there."""
    from deltalake import DeltaTable  # lazy: 0.2 s, and only table users pay it

    uri, storage = table_uri(output), delta_storage_options(output, options)
    try:
        table = DeltaTable(uri, storage_options=storage)
    except Exception as exc:  # delta-rs raises its own TableNotFoundError, a plain Exception
        raise FileNotFoundError(f"{redact(output)} holds no Delta table: {exc}") from exc
    if version is None and as_of is None:
        return table
    latest = table.version()
    if as_of is not None:
        version = version_at(output, table, as_of)
    if not 0 <= version <= latest:
        raise ValueError(
            f"{redact(output)} has no version {version} (its versions: 0 to {latest}; "
            f"`maskrcnn history {redact(output)}` lists them)"
        )
    try:
        table.load_as_version(version)
    except Exception as exc:  # e.g. a version whose log entry was cleaned up
        raise ValueError(f"{redact(output)}: version {version} cannot be read: {exc}") from exc
    return table


def as_utc(when: str | datetime) -> datetime:
    """``when`` (an ISO 8601 time, or a datetime) as an aware UTC datetime; a time without
    an offset is UTC. Raises ValueError for text that is not ISO 8601."""
    if isinstance(when, str):
        text = when.strip()
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    return (
        when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    )


def iso_time(millis: int) -> str:
    """A commit timestamp (ms since the epoch) as ISO 8601 UTC, e.g. 2026-01-31T12:00:00.123Z."""
    when = _EPOCH + timedelta(milliseconds=millis)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def version_at(output: str, table: Any, as_of: str | datetime) -> int:
    """The newest version of ``table`` committed at or before ``as_of``, by the commit
    timestamps `maskrcnn history` shows (delta-rs goes by the log files' modification
    times, which a copy of the table resets, and answers version 0 for any time before
    it). Raises ValueError when the table did not exist yet at ``as_of``."""
    when = as_utc(as_of)
    millis = (when - _EPOCH) // timedelta(milliseconds=1)
    commits = [
        (c["version"], c["timestamp"])
        for c in table.history()
        if isinstance(c.get("version"), int) and isinstance(c.get("timestamp"), int)
    ]
    before = [v for v, t in commits if t <= millis]
    if not before:
        first = min((t for _, t in commits), default=None)
        since = f"its first commit is at {iso_time(first)}" if first is not None else "no commits"
        raise ValueError(f"{redact(output)} has no version at {iso_time(millis)}: {since}")
    return max(before)


def data_files(table: Any) -> list[str]:
    """The table's data files as its log names them (relative to OUTPUT, as a rule)."""
    return pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()


def commit_record(commit: dict[str, Any]) -> dict[str, Any] | None:
    """Our record in one commit info (a history entry), or None for another writer's."""
    record = commit.get(RECORD_KEY)
    if isinstance(record, str):  # some writers keep custom values as JSON strings
        try:
            record = json.loads(record)
        except json.JSONDecodeError:
            return None
    return record if isinstance(record, dict) else None


def numbered_history(table: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """The log's commit infos, newest first, each with its ``version``. delta-rs lists the
    log's newest commits even for a table loaded at an older version, but numbers them
    from the loaded one (DeltaTable.history); here they are numbered from the log's newest.
    """
    _, commits = table._table.history(limit)
    newest = table._table.get_latest_version()
    return [{**json.loads(c), "version": newest - i} for i, c in enumerate(commits)]


def latest_record(table: Any, search: int = 100) -> dict[str, Any] | None:
    """The record of the newest segment commit at or before the table's loaded version,
    looking back at most ``search`` commits before it; None when none is ours."""
    loaded = table.version()
    skip = table._table.get_latest_version() - loaded
    for commit in numbered_history(table, skip + search + 1):
        if commit["version"] > loaded:
            continue
        record = commit_record(commit)
        if record is not None:
            return record
    return None


def properties_of(record: dict[str, Any]) -> dict[str, str]:
    """The table properties a commit's record sets."""
    return {
        PROPERTY_PREFIX + key: json.dumps(record.get(key), sort_keys=True) for key in PROPERTIES
    }


def table_manifest(output: str, table: Any) -> dict[str, Any]:
    """The table at its loaded version as the manifest-shaped dict readers use: the newest
    segment commit's record, ``files`` (relative to OUTPUT, as the log names them) and
    ``version``."""
    record = latest_record(table) or {}
    return {**record, "files": data_files(table), "version": table.version()}


# --- writing: one commit per run -------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    """A Parquet file under OUTPUT that a commit adds (``path`` relative to OUTPUT)."""

    path: str
    size: int
    stats: str  # Delta's per-file statistics, JSON (file_stats)
    rows: int


def file_stats(meta: pq.FileMetaData) -> str:
    """Delta's statistics of a Parquet file from its footer: numRecords, and for each
    top-level primitive column its null count and, where every row group has them, its
    exact min and max (pyarrow drops, never truncates, statistics too long to keep)."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    # Row groups number leaf columns, not fields: a nested field before a column has several.
    leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
    for field in meta.schema.to_arrow_schema():
        if pa.types.is_nested(field.type) or field.name not in leaves:
            continue
        index = leaves[field.name]
        column = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
        if not column or any(s is None for s in column):
            continue
        if all(s.has_null_count for s in column):
            nulls[field.name] = sum(s.null_count for s in column)
        if all(s.has_min_max for s in column):
            mins[field.name] = min(s.min for s in column)
            maxs[field.name] = max(s.max for s in column)
    stats = {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    return json.dumps(stats, sort_keys=True, default=str)


def commit_files(
    output: str,
    options: dict[str, Any] | None,
    adds: list[DataFile],
    removes: list[DataFile],
    record: dict[str, Any],
    seq: int,
    schema: pa.Schema,
) -> int:
    """Commit ``adds`` and ``removes`` to OUTPUT's table in one transaction carrying
    ``txn`` (APP_ID, ``seq``) and ``record``; creates the table when there is none. Then
    sets the ``maskrcnn.*`` properties where they differ from ``record``'s (delta-rs takes
    custom properties in an ALTER only: a second commit, repeated by a re-run until set).
    Returns the version of the data commit."""
    from deltalake import DeltaTable
    from deltalake.schema import Schema
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        RemoveAction,
        Transaction,
        create_table_with_add_actions,
    )

    now = int(time.time() * 1000)
    actions: list[Any] = [AddAction(f.path, f.size, {}, now, True, f.stats) for f in adds]
    actions += [RemoveAction(f.path, True, now, f.size) for f in removes]
    props = CommitProperties(
        custom_metadata={RECORD_KEY: record}, app_transactions=[Transaction(APP_ID, seq)]
    )
    uri, storage = table_uri(output), delta_storage_options(output, options)
    if not has_table(output, options):
        create_table_with_add_actions(
            uri,
            Schema.from_arrow(schema),
            actions,
            mode="error",
            name="segment",
            storage_options=storage,
            commit_properties=props,
        )
    else:
        DeltaTable(uri, storage_options=storage).create_write_transaction(
            actions, mode="append", schema=schema, commit_properties=props
        )
    table = DeltaTable(uri, storage_options=storage)
    version = table.version()
    if os.environ.get(FAULT_AFTER_COMMIT_ENV) == "kill":  # tests: a driver dead at this point
        os.kill(os.getpid(), signal.SIGKILL)
    set_properties(table, record)
    return version


def set_properties(table: Any, record: dict[str, Any]) -> None:
    """Set the table properties ``record`` implies, where they differ."""
    wanted = properties_of(record)
    have = table.metadata().configuration
    if any(have.get(key) != value for key, value in wanted.items()):
        table.alter.set_table_properties(wanted, raise_if_not_exists=False)
