"""Exactly-once output for `maskrcnn segment`: parts, plan, manifest.

Layout of an OUTPUT (any fsspec URI)::

    OUTPUT/_manifest.json          commit point, written last (pipeline/output/schema.py)
    OUTPUT/part-<shard>.parquet    committed parts: the rows of one plan shard each
    OUTPUT/_run/run.json           the unfinished run's spec: model id, options, INPUT, plan size
    OUTPUT/_run/plan/shard-*.txt   its sorted, unique image keys in shards (pipeline/segment/plan.py)
    OUTPUT/_run/pieces/<shard>/    rows of a shard written in more than one batch, until joined
    OUTPUT/_run/lock.json          the lease of the run writing now (pipeline/segment/lease.py)

Protocol:

1. First start: list INPUT once, streaming it into the plan's shard files, then write the
   spec. A re-run of the same command reads the spec back instead of listing again: the
   images a run covers are fixed when it starts. A re-run whose model, INPUT, score
   threshold, max detections or fast mode differ is refused unless --overwrite.
2. A shard is the unit of work, commit and resume. Ray tasks read it, process it, and
   write its part ``part-<shard>.parquet`` themselves (pipeline/segment/parts.py), in
   one atomic step: one PUT on an object store (S3 shows a whole object or none), a temp
   file + rename on a local disk. A part's name is fixed by the plan and its bytes by its
   rows, so a retried or duplicated task writes the same object again. The driver learns
   of it from a small record (shard, counts), never from its bytes.
3. Resume: the shards done are the names of the ``part-*.parquet`` files in OUTPUT; only
   the other shards are processed. A run killed after a task wrote a part but before the
   driver heard of it loses nothing: the re-run finds the part by its name.
4. Finish: list the parts; every shard of the plan must have its part and no other part
   may be there; each part's row count (from its Parquet footer) must equal its shard's
   and its counts add up; then write ``_manifest.json`` listing exactly those parts (the
   same atomic write) and delete ``_run/``. Readers trust only the manifest. URIs are
   unique across parts because the plan's shards are disjoint (checked as the plan is
   written) and a part holds exactly its shard's rows (checked where it is written).
5. One writer at a time: the lease (pipeline/segment/lease.py) refuses a second run while
   the first is alive; a run that loses its lease stops: its tasks read the lock before
   each write and write nothing once it is another run's.

Why not Ray Data's own checkpointing (ray.data.checkpoint in 2.60): it records ids after
its writes, apart from the data files, so a crash between the two leaves rows that are
written again; here writing a whole part is the single step that records progress.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.schema import FORMAT, MANIFEST_NAME, SCHEMA
from pipeline.segment.plan import PART_PREFIX, Plan
from pipeline.storage import atomic_write, get_fs, join, protocol_of, redact, retrying

RUN_DIR = "_run"
SPEC_NAME = f"{RUN_DIR}/run.json"
LOCK_NAME = f"{RUN_DIR}/lock.json"
COUNTS_KEY = "maskrcnn.counts"
FOOTER_THREADS = 16


class OutputStateError(ValueError):
    """OUTPUT is in a state this run may not touch; the message says why and what to do."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class OutputDir:
    """An OUTPUT folder at any fsspec URI, with the storage options to reach it."""

    uri: str
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.fs, self.root = get_fs(self.uri, self.options)
        self.root = self.root.rstrip("/")
        self.local = protocol_of(self.uri) == "file"
        self.created = self.local and not os.path.exists(self.root)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def show(self, rel: str = "") -> str:
        """Redacted URI of ``rel`` under OUTPUT, for messages."""
        return redact(join(self.uri, rel) if rel else self.uri)

    # --- small objects -----------------------------------------------------------
    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))
        return retrying(self.fs.exists, self.path(rel), what=f"checking {self.show(rel)}")

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            data = retrying(self.fs.cat_file, self.path(rel), what=f"reading {self.show(rel)}")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see all of it or nothing (storage.atomic_write)."""
        atomic_write(join(self.uri, rel), data, self.options)

    def put_json(self, rel: str, value: dict[str, Any]) -> None:
        self.put_bytes(rel, json.dumps(value, indent=1, sort_keys=True).encode())

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)
        try:
            if recursive:
                if retrying(self.fs.exists, path):
                    retrying(self.fs.rm, path, True, what=f"deleting {self.show(rel)}")
            else:
                retrying(self.fs.rm_file, path, what=f"deleting {self.show(rel)}")
        except FileNotFoundError:
            pass

    # --- parts -----------------------------------------------------------------------
    def part_names(self) -> list[str]:
        """Names of the committed parts (``part-*.parquet`` directly under OUTPUT)."""
        self.fs.invalidate_cache(self.root)  # s3fs caches listings; parts come and go
        try:
            entries = retrying(self.fs.ls, self.root, False, what=f"listing {self.show()}")
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet"))

    def remove_empty_run_dir(self) -> None:
        """Remove ``_run/`` when it holds nothing, and OUTPUT too if this run made it empty."""
        if self.local:
            for path in [self.path(RUN_DIR)] + ([self.root] if self.created else []):
                try:
                    os.rmdir(path)  # only when empty
                except OSError:
                    pass

    def remove_temporaries(self) -> None:
        """Temp files of local writes a killed run left behind (never read: see put_bytes)."""
        if self.local and os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if ".tmp-" in name and name.startswith(PART_PREFIX):
                    self.remove(name)

    def clear(self) -> None:
        """Remove what segment wrote (manifest first, so no reader sees a half-deleted set)."""
        self.remove(MANIFEST_NAME)
        for name in self.part_names():
            self.remove(name)
        self.remove(SPEC_NAME)
        self.remove(f"{RUN_DIR}/plan", recursive=True)
        self.remove(f"{RUN_DIR}/pieces", recursive=True)
        self.remove_temporaries()


def part_counts(table: pa.Table) -> dict[str, int]:
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    instances = int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0)
    return {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "instances": instances}


def canonical_rows(table: pa.Table) -> pa.Table:
    """``table``'s rows in SCHEMA, sorted by URI, each URI once (the first of equal ones)."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    order = pc.sort_indices(table, sort_keys=[("uri", "ascending")])
    table = table.take(order)
    uris = table.column("uri")
    if table.num_rows > 1:
        first = pa.concat_arrays(
            [
                pa.array([True]),
                pc.not_equal(uris.slice(1), uris.slice(0, table.num_rows - 1)).combine_chunks(),
            ]
        )
        table = table.filter(first)
    return table


def encode_part(table: pa.Table) -> tuple[bytes, dict[str, int]]:
    """Rows -> (Parquet bytes, counts). The bytes depend on the rows only (see module doc)."""
    return parquet_part(canonical_rows(table))


def parquet_part(table: pa.Table) -> tuple[bytes, dict[str, int]]:
    """:func:`encode_part` of rows that are canonical_rows' already."""
    counts = part_counts(table)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA, compression="zstd") as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts, sort_keys=True)})
    return buf.getvalue(), counts


def read_counts(out: OutputDir, name: str) -> dict[str, int]:
    """A part's counts from its footer alone: rows from the Parquet metadata, the rest from
    the key-value metadata encode_part writes. Raises ValueError when they disagree."""

    def read() -> dict[str, int]:
        with out.fs.open(out.path(name), "rb") as f:
            meta = pq.ParquetFile(f).metadata
        counts = json.loads((meta.metadata or {}).get(COUNTS_KEY.encode(), b"{}"))
        if counts.get("rows") != meta.num_rows:
            raise ValueError(
                f"{out.show(name)}: its footer counts {counts.get('rows')} rows, the file "
                f"holds {meta.num_rows}; re-run with --overwrite"
            )
        return {k: int(counts.get(k, 0)) for k in ("rows", "ok", "error", "instances")}

    return retrying(read, what=f"reading {out.show(name)}")


def spec_mismatches(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences in the fields that decide what rows hold."""
    diffs = []
    for key in ("model", "input"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)} (now {new.get(key)})")
    old_opts, new_opts = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            diffs.append(f"{key}: {old_opts.get(key)} (now {new_opts.get(key)})")
    return diffs


def finalize(
    out: OutputDir, spec: dict[str, Any], plan: Plan, extra: dict[str, Any]
) -> dict[str, Any]:
    """Check the committed parts against the plan, write the manifest, remove _run/.

    Reads each part's footer only (:func:`read_counts`), on threads. Raises RuntimeError
    (nothing committed) when a shard's part is missing, a part is not the plan's, or a
    part's rows are not its shard's count.
    """
    names = out.part_names()
    shards = {name: plan.shard_of_part(name) for name in names}
    foreign = sorted(name for name, shard in shards.items() if shard is None)
    if foreign:
        raise RuntimeError(
            f"{out.show()}: {len(foreign)} part(s) are not of this run's plan (first: "
            f"{foreign[0]}; did two runs write it at once?); not committing. Re-run with "
            "--overwrite"
        )
    missing = plan.shards - len(names)
    if missing:
        raise RuntimeError(
            f"{out.show()}: {missing} of {plan.shards} parts are missing; not committing. "
            "Re-run the same command"
        )
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        footers = list(pool.map(lambda name: read_counts(out, name), names))
    counts = {"images": plan.images, "ok": 0, "error": 0, "instances": 0}
    for name, footer in zip(names, footers):
        if footer["rows"] != plan.rows(shards[name]):
            raise RuntimeError(
                f"{out.show(name)} holds {footer['rows']} rows, its shard "
                f"{plan.rows(shards[name])}; not committing. Re-run with --overwrite"
            )
        for key in ("ok", "error", "instances"):
            counts[key] += footer[key]
    if counts["ok"] + counts["error"] != counts["images"]:
        raise RuntimeError(f"{out.show()}: part counts do not add up ({counts}); not committing")
    manifest = {
        "format": FORMAT,
        "run_id": spec["run_id"],
        "model": spec["model"],
        "model_uri": spec["model_uri"],
        "config": spec["config"],
        "input": spec["input"],
        "options": spec["options"],
        "files": names,
        "counts": counts,
        "started": spec["started"],
        "finished": now_iso(),
        **extra,
    }
    out.put_json(MANIFEST_NAME, manifest)
    out.remove_temporaries()
    out.remove(SPEC_NAME)
    return manifest
