"""Where a shard's rows become its part: in Ray tasks, written straight to OUTPUT.

The driver never holds a URI or a row. The pipeline's first stage (:func:`expand_shards`)
reads a range of a shard file from OUTPUT; every row then carries its shard's number and
size (columns ``shard`` and ``shard_rows``) through decode, model and encode; the last
stage (:func:`write_parts`) writes, for each shard in its batch:

* the part ``part-<shard>.parquet`` itself, when the batch holds every row of the shard;
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
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.segment.commit import LOCK_NAME, RUN_DIR, OutputDir, canonical_rows, parquet_part
from pipeline.segment.lease import taken_over
from pipeline.segment.plan import Plan, read_shard

PIECES_DIR = f"{RUN_DIR}/pieces"
FAULT_ENV = "MASKRCNN_FAULT_AFTER_PART"  # tests only: see _fault_after_part
CARRIED = ("shard", "shard_rows")  # columns every stage passes through
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


def piece_dir(shard: int) -> str:
    return f"{PIECES_DIR}/{shard:06d}"


# --- first stage: shard ranges -> URIs --------------------------------------------------
def expand_shards(
    batch: pa.Table,
    *,
    output_uri: str,
    output_options: dict[str, Any] | None,
    rows_per_shard: int,
    sources: Any = None,
) -> pa.Table:
    """Rows (shard, start, stop, shard_rows) -> one row per image: uri (the key), source
    (the URI to read, when ``sources`` maps keys to URIs with secrets), shard, shard_rows.

    ``sources``: None, a dict, or [an object ref to one].
    """
    out = OutputDir(output_uri, output_options)
    plan = Plan(1, rows_per_shard)  # names only
    shards = batch.column("shard").to_pylist()
    starts, stops = batch.column("start").to_pylist(), batch.column("stop").to_pylist()
    sizes = batch.column("shard_rows").to_pylist()
    uris: list[str] = []
    shard_col: list[int] = []
    size_col: list[int] = []
    cache: dict[int, list[str]] = {}
    for shard, start, stop, size in zip(shards, starts, stops, sizes):
        if shard not in cache:
            cache = {shard: read_shard(out.fs, out.path(plan.shard_name(shard)))}
            if len(cache[shard]) != size:
                raise RuntimeError(
                    f"{out.show(plan.shard_name(shard))} holds {len(cache[shard])} URIs, the "
                    f"plan says {size}; OUTPUT's run state is damaged: re-run with --overwrite"
                )
        keys = cache[shard][start:stop]
        uris += keys
        shard_col += [shard] * len(keys)
        size_col += [size] * len(keys)
    columns = {"uri": pa.array(uris, pa.string())}
    if sources is not None:
        if isinstance(sources, list):
            import ray

            sources = ray.get(sources[0])
        columns["source"] = pa.array([sources.get(k, k) for k in uris], pa.string())
    columns["shard"] = pa.array(shard_col, pa.int64())
    columns["shard_rows"] = pa.array(size_col, pa.int64())
    return pa.table(columns)


def carried(batch: pa.Table) -> dict[str, Any]:
    """The CARRIED columns ``batch`` has, to append to a stage's output."""
    return {k: batch.column(k) for k in CARRIED if k in batch.column_names}


# --- last stage: rows -> parts or pieces --------------------------------------------------
def lease_lost(out: OutputDir, attempt: str) -> str | None:
    """Why this run may not write (another run's lock, or none), else None."""
    lock = out.read_json(LOCK_NAME)
    return "its lock is gone" if lock is None else taken_over(lock, attempt)


def write_parts(
    batch: pa.Table,
    *,
    output_uri: str,
    output_options: dict[str, Any] | None,
    rows_per_shard: int,
    attempt: str,
) -> pa.Table:
    """Rows in SCHEMA + CARRIED -> written parts or pieces; one RECORD per shard in ``batch``."""
    out = OutputDir(output_uri, output_options)
    plan = Plan(1, rows_per_shard)
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
                name = plan.part_name(shard)
            else:
                digest = hashlib.sha256("\n".join(rows.column("uri").to_pylist()).encode())
                name = f"{piece_dir(shard)}/piece-{digest.hexdigest()[:20]}.parquet"
            out.put_bytes(name, data)
            if whole:
                _fault_after_part(out, name, data)
        records.append({"shard": shard, **counts, "whole": whole, "lost": lost})
    return pa.Table.from_pylist(records, schema=RECORD)


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


def assemble_part(
    output_uri: str,
    output_options: dict[str, Any] | None,
    rows_per_shard: int,
    attempt: str,
    shard: int,
    size: int,
) -> dict[str, Any]:
    """Join shard ``shard``'s pieces into its part and delete them; returns its counts,
    with ``missing`` (rows no piece holds: then nothing is written) and ``lost``."""
    from pipeline.storage import retrying

    out = OutputDir(output_uri, output_options)
    plan = Plan(1, rows_per_shard)
    lost = lease_lost(out, attempt)
    if lost is not None:
        return {"shard": shard, "lost": lost}
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
    rows = canonical_rows(pa.concat_tables(tables)) if tables else None
    have = 0 if rows is None else rows.num_rows
    if have != size:
        return {"shard": shard, "missing": size - have, "lost": None}
    data, counts = parquet_part(rows)
    out.put_bytes(plan.part_name(shard), data)
    _fault_after_part(out, plan.part_name(shard), data)
    out.remove(piece_dir(shard), recursive=True)
    return {"shard": shard, **counts, "missing": 0, "lost": None}
