"""Exactly-once output for `maskrcnn segment`: parts, plan, manifest.

Layout of an OUTPUT (any fsspec URI)::

    OUTPUT/_manifest.json          commit point, written last (pipeline/output/schema.py)
    OUTPUT/part-<hash>.parquet     committed parts: rows in SCHEMA, disjoint URI sets
    OUTPUT/_run/run.json           the unfinished run's spec: model id, options, INPUT
    OUTPUT/_run/plan.parquet       its sorted, unique input URIs (frozen at first start)
    OUTPUT/_run/lock.json          the lease of the run writing now (pipeline/segment/lease.py)

Protocol:

1. First start: list INPUT once and write the plan, then the spec. A re-run of
   the same command reads them back instead of listing again: the images a run
   covers are fixed when it starts. A re-run whose model, INPUT, score
   threshold, max detections or fast mode differ is refused unless --overwrite.
2. Resume: the URIs already committed are the ``uri`` column of the
   ``part-*.parquet`` files in OUTPUT; only the rest of the plan is processed.
3. Ray tasks encode each part (up to --rows-per-part images) to Parquet bytes,
   counts in the footer. The driver receives every part exactly once (Ray
   Data delivers each output block once, also when a task or actor is retried
   after a crash) and writes it as ``part-<hash of its URIs>.parquet`` in one
   atomic step: one PUT on an object store (S3 shows a whole object or none),
   a temp file + rename on a local disk. So a part is in OUTPUT whole or not at
   all, and only parts the driver accepted are there. A driver killed before
   writing a part loses only that part's work, which a re-run redoes.
4. Finish: read the ``uri`` column of every part, check the URIs are unique and
   equal the plan, write ``_manifest.json`` listing exactly those parts (the
   same atomic write), then delete ``_run/``. Readers trust only the manifest.
5. One writer at a time: the lease (pipeline/segment/lease.py) refuses a second run
   while the first is alive; a run that loses its lease stops before writing
   another part, and step 4 refuses to commit a doubled URI whatever happened.

Why not Ray Data's own checkpointing (ray.data.checkpoint in 2.60): it records
ids after its writes, apart from the data files, so a crash between the two
leaves rows that are written again; here writing a whole part is the single
step that records progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.schema import FORMAT, MANIFEST_NAME, SCHEMA
from pipeline.storage import atomic_write, get_fs, join, protocol_of, redact, retrying

RUN_DIR = "_run"
SPEC_NAME = f"{RUN_DIR}/run.json"
PLAN_NAME = f"{RUN_DIR}/plan.parquet"
LOCK_NAME = f"{RUN_DIR}/lock.json"
PART_PREFIX = "part-"
COUNTS_KEY = "maskrcnn.counts"


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

    def write_part(self, name: str, data: bytes) -> None:
        """Commit one part (bytes from :func:`encode_part`) as ``OUTPUT/name``, atomically."""
        self.put_bytes(name, data)

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

    # --- plan and spec -------------------------------------------------------------
    def write_plan(self, uris: list[str]) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": pa.array(uris, pa.string())}), buf, compression="zstd")
        self.put_bytes(PLAN_NAME, buf.getvalue())

    def read_plan(self) -> list[str]:
        data = retrying(self.fs.cat_file, self.path(PLAN_NAME), what=f"reading {PLAN_NAME}")
        return pq.read_table(io.BytesIO(data)).column("uri").to_pylist()

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

    def read_part_uris_and_counts(
        self, names: list[str]
    ) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
        """({name: uris}, {name: counts}) for committed parts, read in parallel."""

        def one(name: str) -> tuple[list[str], dict[str, int]]:
            def read() -> tuple[list[str], dict[str, int]]:
                with self.fs.open(self.path(name), "rb") as f:
                    parquet = pq.ParquetFile(f)
                    meta = parquet.metadata.metadata or {}
                    counts = json.loads(meta.get(COUNTS_KEY.encode(), b"{}"))
                    uris = parquet.read(columns=["uri"]).column("uri").to_pylist()
                return uris, counts

            return retrying(read, what=f"reading {self.show(name)}")

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, names))
        return (
            {n: r[0] for n, r in zip(names, results)},
            {n: r[1] for n, r in zip(names, results)},
        )

    def committed_uris(self) -> list[str]:
        """Every URI the committed parts hold, part by part (a doubled URI shows twice)."""
        names = self.part_names()
        uris_by_part, _ = self.read_part_uris_and_counts(names)
        return [u for n in names for u in uris_by_part[n]]

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
        for rel in (SPEC_NAME, PLAN_NAME):
            self.remove(rel)
        self.remove_temporaries()


def part_name(uris: list[str]) -> str:
    """``part-<hash>.parquet``, a function of the URIs the part holds."""
    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()
    return f"{PART_PREFIX}{digest[:20]}.parquet"


def part_counts(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    instances = int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0)
    return {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "instances": instances}


def encode_part(table: pa.Table) -> dict[str, Any]:
    """Rows (SCHEMA) -> one Parquet part: {"name", "data" (the file's bytes), counts...}.

    Runs in Ray tasks; the driver writes the bytes (see the module doc).
    """
    table = table.cast(SCHEMA)
    counts = part_counts(table)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA, compression="zstd") as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts)})
    return {"name": part_name(table.column("uri").to_pylist()), "data": buf.getvalue(), **counts}


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
    out: OutputDir, spec: dict[str, Any], plan: list[str], extra: dict[str, Any]
) -> dict[str, Any]:
    """Check the committed parts against the plan, write the manifest, remove _run/.

    Raises RuntimeError (nothing committed) when a URI is doubled or missing.
    """
    names = out.part_names()
    uris_by_part, counts_by_part = out.read_part_uris_and_counts(names)
    _check_against_plan(out, [u for n in names for u in uris_by_part[n]], plan)
    counts = {"images": len(plan), "ok": 0, "error": 0, "instances": 0}
    for c in counts_by_part.values():
        for key in ("ok", "error", "instances"):
            counts[key] += int(c.get(key, 0))
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
    out.remove(PLAN_NAME)
    out.remove(SPEC_NAME)
    return manifest


def _check_against_plan(out: OutputDir, uris: list[str], plan: list[str]) -> None:
    """Raise RuntimeError unless the parts' ``uris`` are the plan, each once."""
    if len(uris) != len(set(uris)):
        raise RuntimeError(
            f"{out.show()}: some URIs are in two parts (did two runs write it at once?); "
            "not committing. Re-run with --overwrite"
        )
    if sorted(uris) != plan:
        missing = len(set(plan) - set(uris))
        extra_uris = len(set(uris) - set(plan))
        raise RuntimeError(
            f"{out.show()}: parts do not match the plan ({missing} URIs missing, "
            f"{extra_uris} not in the plan); not committing. Re-run the same command"
        )
