"""The last stage: a shard's rows become its part, written straight to OUTPUT by Ray tasks.

Every row carries its shard's number and size (CARRIED, stages/rows.py) through decode,
model and encode; :func:`write_parts` writes, for each shard in its batch:

* the part ``run-<seq>/part-<shard>.parquet`` itself, when the batch holds every row of the shard;
* else a *piece*, ``_run/pieces/<shard>/piece-<hash of its URIs>.parquet``, and when the
  driver has counted all the shard's rows in (from the small records this stage returns),
  :func:`assemble_part`, a Ray task, joins the shard's pieces into its part and deletes
  them.

A part's bytes are a function of its rows only (sorted by URI, fixed writer settings,
counts in the footer), and a shard's name is fixed by the plan: a retried or duplicated
task writes the same object again, with the same content. Every write is atomic (one PUT
on object stores, temp + rename locally), and a task writes only while the run still
holds OUTPUT's lease (it reads ``_run/lock.json`` first): a run that lost it stops
committing.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.segment.commit import Counts, canonical_rows, parquet_part
from pipeline.segment.lease import taken_over
from pipeline.segment.output import LOCK_NAME, OutputDir, piece_dir
from pipeline.storage import retrying

FAULT_ENV = "MASKRCNN_FAULT_AFTER_PART"  # tests only: see _fault_after_part
RECORD = pa.schema(
    [
        ("shard", pa.int64()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("error", pa.int64()),
        ("instances", pa.int64()),
        ("whole", pa.bool_()),  # the part is written; else a piece
        ("lost", pa.string()),  # the lease was lost: nothing was written
    ]
)


@dataclass(frozen=True)
class ShardRecord:
    """What the driver hears of a shard's rows that a task wrote (or joined): never the
    rows themselves."""

    shard: int
    counts: Counts
    whole: bool  # the shard's part is written; else a piece of it
    lost: str | None = None  # why this run may no longer write: then nothing was written
    missing: int = 0  # rows of the shard no piece holds (assemble_part): nothing written

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ShardRecord:
        """A row of RECORD, as the pipeline hands it over."""
        return cls(int(row["shard"]), Counts.from_dict(row), bool(row["whole"]), row["lost"])

    def to_row(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            **self.counts.to_dict(),
            "whole": self.whole,
            "lost": self.lost,
        }


def lease_lost(out: OutputDir, attempt: str) -> str | None:
    """Why this run may not write (another run's lock, or none), else None."""
    lock = out.read_json(LOCK_NAME)
    return "its lock is gone" if lock is None else taken_over(lock, attempt)


def write_parts(
    batch: pa.Table,
    *,
    output_uri: str,
    output_options: dict[str, Any] | None,
    attempt: str,
    parts: str = "",
) -> pa.Table:
    """Rows in SCHEMA + CARRIED -> written parts (in the folder ``parts``) or pieces; one
    RECORD per shard in ``batch``."""
    out = OutputDir(output_uri, output_options, parts)
    shards = batch.column("shard").to_numpy()
    records = []
    lost = lease_lost(out, attempt)
    for shard in sorted(set(shards.tolist())):
        rows = canonical_rows(batch.filter(pc.equal(batch.column("shard"), shard)))
        size = int(batch.column("shard_rows")[int((shards == shard).argmax())].as_py())
        whole = rows.num_rows == size
        data, counts = parquet_part(rows)
        if lost is None:
            if whole:
                name = out.part(shard)
            else:
                digest = hashlib.sha256("\n".join(rows.column("uri").to_pylist()).encode())
                name = f"{piece_dir(shard)}/piece-{digest.hexdigest()[:20]}.parquet"
            out.put_bytes(name, data)
            if whole:
                _fault_after_part(out, name, data)
        records.append(ShardRecord(shard, counts, whole, lost).to_row())
    return pa.Table.from_pylist(records, schema=RECORD)


def assemble_part(
    output_uri: str,
    output_options: dict[str, Any] | None,
    attempt: str,
    shard: int,
    size: int,
    parts: str = "",
) -> ShardRecord:
    """Join shard ``shard``'s pieces into its part and delete them. The record says
    ``missing`` rows (no piece holds them: then nothing is written) or ``lost``."""
    out = OutputDir(output_uri, output_options, parts)
    lost = lease_lost(out, attempt)
    if lost is not None:
        return ShardRecord(shard, Counts(), whole=False, lost=lost)
    rows = _pieces(out, shard)
    have = 0 if rows is None else rows.num_rows
    if have != size:
        return ShardRecord(shard, Counts(), whole=False, missing=size - have)
    data, counts = parquet_part(rows)
    out.put_bytes(out.part(shard), data)
    _fault_after_part(out, out.part(shard), data)
    out.remove(piece_dir(shard), recursive=True)
    return ShardRecord(shard, counts, whole=True)


def _pieces(out: OutputDir, shard: int) -> pa.Table | None:
    """The canonical rows of shard ``shard``'s pieces together; None when it has none."""
    folder = out.path(piece_dir(shard))
    out.fs.invalidate_cache(folder)
    try:
        names = retrying(out.fs.ls, folder, False, what=f"listing {out.show(piece_dir(shard))}")
    except FileNotFoundError:
        names = []
    tables = []
    for path in sorted(n for n in names if n.rstrip("/").endswith(".parquet")):
        data = retrying(out.fs.cat_file, path, what="reading a piece")
        tables.append(pq.read_table(io.BytesIO(data)))
    return canonical_rows(pa.concat_tables(tables)) if tables else None


def _fault_after_part(out: OutputDir, name: str, data: bytes) -> None:
    """Fault injection for the tests, off unless FAULT_ENV is set: once per marker file,
    right after a part is written and before its record is returned, ``exit:MARKER`` ends
    this worker process and ``kill:MARKER`` SIGKILLs the driver (the lease holder's pid)
    first. The marker holds the part's path and the SHA-256 of its bytes."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    how, _, marker = spec.partition(":")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # done once already
    with os.fdopen(fd, "w") as f:
        f.write(f"{out.path(name)}\n{hashlib.sha256(data).hexdigest()}\n")
    if how == "kill":
        os.kill(int((out.read_json(LOCK_NAME) or {})["pid"]), signal.SIGKILL)
    os._exit(1)
