"""Exactly-once output for `maskrcnn segment`: parts, promotion, lease, manifest.

Layout of an OUTPUT (any fsspec URI)::

    OUTPUT/_manifest.json            commit point, written last (pipeline/schema.py)
    OUTPUT/part-<hash>.parquet       committed parts: rows in SCHEMA, disjoint URI sets
    OUTPUT/_run/run.json             the run's spec: model id, options, INPUT, plan size
    OUTPUT/_run/plan.parquet         the sorted, unique input URIs (frozen at first start)
    OUTPUT/_run/lock.json            the lease: run id, host, pid, heartbeat
    OUTPUT/_run/staging/<attempt>/   parts written by Ray tasks, not yet accepted

Protocol:

1. First start: list INPUT once, write the plan, then the spec. A re-run with
   the same command reads them back instead of listing again, so the set of
   images a run covers is fixed when it starts (files added later are not in
   it). A spec that differs (model, INPUT, score threshold, max detections,
   fast) is refused unless --overwrite.
2. Resume: the URIs already committed are the ``uri`` column of the
   ``part-*.parquet`` files in OUTPUT; only the rest of the plan is processed.
3. Ray write tasks put each part (one Parquet file, its counts in the footer)
   under ``_run/staging/<attempt>/``. A task retried after a crash may leave a
   second copy there; that is harmless because only the driver promotes, and
   it promotes exactly the outputs Ray Data delivers to it, each once.
4. Promotion moves a staged part to ``OUTPUT/part-<hash>.parquet``: a rename
   on a local disk, a server-side copy on S3. Both make the whole file appear
   at once, so a killed run never leaves a partial part where resume looks.
   A driver killed between a task's write and the promotion loses only that
   part's work (redone on resume, the staged copy is never read).
5. Finish: read the ``uri`` column of every part, check the URIs are unique
   and equal the plan, then write ``_manifest.json`` listing exactly those
   parts (one PUT, atomic on S3; temp file + rename locally), then delete
   ``_run/``. Readers trust only the manifest.
6. Lease: one run at a time per OUTPUT. ``_run/lock.json`` holds the run's
   id, host, pid and a heartbeat refreshed every HEARTBEAT_SECONDS. A second
   run is refused while the lease is live; a lease whose heartbeat is older
   than LEASE_SECONDS, or whose process is gone on this host, is taken over.
   Object stores have no compare-and-swap here, so two runs starting in the
   same instant could both write the lock: each heartbeat re-reads it and a
   run that finds another id stops before promoting anything else, and the
   uniqueness check of step 5 refuses to commit a doubled URI.

Ray Data's own checkpointing (ray.data.checkpoint, 2.60) records ids after
its writes, separately from the data files, so a crash between the two leaves
rows that are written again; this protocol instead makes the promotion of a
whole part the single step that records progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import FORMAT, MANIFEST_NAME, SCHEMA
from pipeline.storage import get_fs, join, protocol_of, redact

RUN_DIR = "_run"
SPEC_NAME = f"{RUN_DIR}/run.json"
PLAN_NAME = f"{RUN_DIR}/plan.parquet"
LOCK_NAME = f"{RUN_DIR}/lock.json"
STAGING_DIR = f"{RUN_DIR}/staging"
PART_PREFIX = "part-"
COUNTS_KEY = "maskrcnn.counts"

HEARTBEAT_SECONDS = float(os.environ.get("MASKRCNN_HEARTBEAT_SECONDS", "10"))
LEASE_SECONDS = float(os.environ.get("MASKRCNN_LEASE_SECONDS", "60"))

T = TypeVar("T")


class OutputStateError(ValueError):
    """OUTPUT is in a state this run may not touch; the message says why and what to do."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def retrying(fn: Callable[..., T], *args: Any, what: str = "", attempts: int = 5) -> T:
    """``fn(*args)`` retried with exponential backoff on transient storage errors.

    Missing files and refused access are not transient and raise at once.
    """
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn(*args)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            if attempt == attempts - 1:
                raise OSError(f"{what}: {exc}" if what else str(exc)) from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


@dataclass
class OutputDir:
    """An OUTPUT folder at any fsspec URI, with the storage options to reach it."""

    uri: str
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.fs, self.root = get_fs(self.uri, self.options)
        self.root = self.root.rstrip("/")
        self.local = protocol_of(self.uri) == "file"

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
        """Write ``data`` so that readers see all of it or nothing."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT: an object store shows the whole object or none
            retrying(self.fs.pipe_file, path, data, what=f"writing {self.show(rel)}")

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

    def promote(self, staged_rel: str, name: str) -> None:
        """Move a staged part to ``OUTPUT/name`` as one atomic step (see module doc)."""
        src, dst = self.path(staged_rel), self.path(name)
        if self.local:
            os.replace(src, dst)  # atomic on one filesystem
            return

        def move() -> None:
            try:
                self.fs.copy(src, dst)  # server-side copy: the object appears whole
            except FileNotFoundError:
                if not self.fs.exists(dst):  # an earlier try copied and deleted it
                    raise
                return
            self.fs.rm_file(src)

        retrying(move, what=f"committing {self.show(name)}")

    def remove_empty_run_dir(self) -> None:
        """Remove ``_run/`` when it holds nothing (local folders; object stores have none)."""
        if not self.local:
            return
        for rel in (STAGING_DIR, RUN_DIR):
            try:
                os.rmdir(self.path(rel))
            except OSError:
                pass

    def clear(self) -> None:
        """Remove what segment wrote (manifest first, so no reader sees a half-deleted set)."""
        self.remove(MANIFEST_NAME)
        for name in self.part_names():
            self.remove(name)
        for rel in (SPEC_NAME, PLAN_NAME):
            self.remove(rel)
        self.remove(STAGING_DIR, recursive=True)


def part_name(uris: list[str]) -> str:
    """``part-<hash>.parquet``, a function of the URIs the part holds."""
    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()
    return f"{PART_PREFIX}{digest[:20]}.parquet"


def part_counts(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    instances = int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0)
    return {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "instances": instances}


def write_staged_part(
    table: pa.Table, output_uri: str, options: dict[str, Any] | None, attempt: str
) -> dict[str, Any]:
    """Write rows (SCHEMA) as one staged Parquet part; returns the record the driver promotes."""
    out = OutputDir(output_uri, options)
    table = table.cast(SCHEMA)
    uris = table.column("uri").to_pylist()
    name = part_name(uris)
    counts = part_counts(table)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA, compression="zstd") as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts)})
    staged = f"{STAGING_DIR}/{attempt}/{name}"
    out.put_bytes(staged, buf.getvalue())
    return {"name": name, "staged": staged, **counts}


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
    all_uris = [u for n in names for u in uris_by_part[n]]
    if len(all_uris) != len(set(all_uris)):
        raise RuntimeError(
            f"{out.show()}: some URIs are in two parts (did two runs write it at once?); "
            "not committing. Re-run with --overwrite"
        )
    if sorted(all_uris) != plan:
        missing = len(set(plan) - set(all_uris))
        extra_uris = len(set(all_uris) - set(plan))
        raise RuntimeError(
            f"{out.show()}: parts do not match the plan ({missing} URIs missing, "
            f"{extra_uris} not in the plan); not committing. Re-run the same command"
        )
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
    out.remove(STAGING_DIR, recursive=True)
    out.remove(PLAN_NAME)
    out.remove(SPEC_NAME)
    return manifest


# --- the lease -----------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie has finished running
            return None
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive_here(lock: dict[str, Any]) -> bool | None:
    """True/False when the lock's process is on this host; None when it is elsewhere."""
    if lock.get("host") != socket.gethostname():
        return None
    pid = lock.get("pid")
    if not isinstance(pid, int):
        return False
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    start = _process_start(pid)
    return start is not None and lock.get("pid_start") in (None, start)


class Lease:
    """One writer per OUTPUT: ``_run/lock.json`` with a heartbeat (see module doc)."""

    def __init__(self, out: OutputDir, run_id: str) -> None:
        self.out = out
        self.run_id = run_id
        self.attempt = uuid.uuid4().hex[:12]
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "run_id": self.run_id,
            "attempt": self.attempt,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "heartbeat": time.time(),
            "heartbeat_iso": now_iso(),
        }

    def holder(self) -> dict[str, Any] | None:
        """The live lease of another run, or None when OUTPUT is free to take."""
        lock = self.out.read_json(LOCK_NAME)
        if not lock or lock.get("attempt") == self.attempt:
            return None
        alive = _alive_here(lock)
        if alive is False:
            return None
        age = time.time() - float(lock.get("heartbeat", 0))
        return lock if age <= LEASE_SECONDS else None

    def acquire(self) -> None:
        holder = self.holder()
        if holder is not None:
            age = time.time() - float(holder.get("heartbeat", 0))
            raise OutputStateError(
                f"OUTPUT {self.out.show()} is being written by another segment run "
                f"(run {holder.get('run_id')}, host {holder.get('host')}, pid {holder.get('pid')}, "
                f"heartbeat {age:.0f}s ago); wait for it to finish, or if it is gone, wait "
                f"{LEASE_SECONDS:.0f}s for its lease to expire (or delete {self.out.show(LOCK_NAME)})"
            )
        self.out.put_json(LOCK_NAME, self._record())
        back = self.out.read_json(LOCK_NAME)
        if not back or back.get("attempt") != self.attempt:
            raise OutputStateError(
                f"OUTPUT {self.out.show()}: another segment run took the lease at the same "
                "time; run one at a time"
            )
        self._thread = threading.Thread(target=self._beat, name="segment-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                lock = self.out.read_json(LOCK_NAME)
                if lock is not None and lock.get("attempt") != self.attempt:
                    self.lost = f"run {lock.get('run_id')} (host {lock.get('host')}) took over"
                    return
                self.out.put_json(LOCK_NAME, self._record())
            except Exception:  # flaky storage: try again at the next beat
                continue

    def check(self) -> None:
        """Raise if another run took the lease: this run must not commit anything more."""
        if self.lost:
            raise RuntimeError(
                f"OUTPUT {self.out.show()}: lost the lease ({self.lost}); stopping without "
                "committing more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS + 5)
        lock = self.out.read_json(LOCK_NAME)
        if lock is not None and lock.get("attempt") == self.attempt:
            self.out.remove(LOCK_NAME)
