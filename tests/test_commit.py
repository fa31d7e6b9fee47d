"""The exactly-once building blocks without Ray: parts, manifest checks, lease, retries."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest

import pipeline.segment.lease as lease_mod
from pipeline.output.schema import MANIFEST_NAME, SCHEMA, read_manifest
from pipeline.segment.commit import (
    LOCK_NAME,
    PLAN_NAME,
    SPEC_NAME,
    OutputDir,
    OutputStateError,
    encode_part,
    finalize,
    part_name,
)
from pipeline.segment.lease import Lease
from pipeline.storage import retrying


def rows(uris: list[str], errors: set[str] = frozenset(), instances: int = 2) -> pa.Table:
    inst = {
        "label": 1,
        "label_name": "square",
        "score": 0.9,
        "box": [1.0, 2.0, 3.0, 4.0],
        "mask_counts": "0b0",
        "area": 3,
    }
    records = [
        {
            "uri": u,
            "status": "error" if u in errors else "ok",
            "error": "decode: empty file" if u in errors else None,
            "width": None if u in errors else 8,
            "height": None if u in errors else 6,
            "instances": [] if u in errors else [inst] * instances,
            "model": "m1",
        }
        for u in uris
    ]
    return pa.Table.from_pylist(records, schema=SCHEMA)


SPEC = {
    "run_id": "r1",
    "model": "m1",
    "model_uri": "/models/m.safetensors",
    "config": {"num_classes": 2},
    "input": "/in",
    "options": {"score_threshold": None, "max_detections": None, "fast": False},
    "started": "2026-01-01T00:00:00+00:00",
}


def test_part_round_trip_counts_and_name(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    part = encode_part(rows(["/in/b.png", "/in/a.png", "/in/c.png"], errors={"/in/c.png"}))
    assert part["name"] == part_name(["/in/a.png", "/in/b.png", "/in/c.png"])  # order-free
    assert (part["rows"], part["ok"], part["error"], part["instances"]) == (3, 2, 1, 4)
    out.write_part(part["name"], part["data"])
    assert out.part_names() == [part["name"]]
    uris, counts = out.read_part_uris_and_counts(out.part_names())
    assert uris[part["name"]] == ["/in/b.png", "/in/a.png", "/in/c.png"]
    assert counts[part["name"]] == {"rows": 3, "ok": 2, "error": 1, "instances": 4}
    assert list(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out" / part["name"]]


def _state(out: OutputDir, plan: list[str]) -> None:
    out.write_plan(plan)
    out.put_json(SPEC_NAME, SPEC)


def test_finalize_writes_manifest_of_exactly_the_parts(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    plan = [f"/in/{i}.png" for i in range(5)]
    _state(out, plan)
    for chunk in (plan[:2], plan[2:]):
        part = encode_part(rows(chunk, errors={"/in/4.png"}))
        out.write_part(part["name"], part["data"])
    manifest = finalize(out, SPEC, plan, {"versions": {}})
    assert read_manifest(str(tmp_path / "out")) == manifest
    assert manifest["files"] == out.part_names() and len(manifest["files"]) == 2
    assert manifest["counts"] == {"images": 5, "ok": 4, "error": 1, "instances": 8}
    assert not out.exists(PLAN_NAME) and not out.exists(SPEC_NAME)


@pytest.mark.parametrize(
    "chunks, match",
    [
        ((["/in/0.png", "/in/1.png"], ["/in/1.png", "/in/2.png"]), "in two parts"),
        ((["/in/0.png", "/in/1.png"],), "1 URIs missing"),
        ((["/in/0.png", "/in/1.png", "/in/2.png", "/in/9.png"],), "1 not in the plan"),
    ],
)
def test_finalize_refuses_doubled_missing_or_foreign_uris(tmp_path, chunks, match):
    out = OutputDir(str(tmp_path / "out"))
    plan = ["/in/0.png", "/in/1.png", "/in/2.png"]
    _state(out, plan)
    for chunk in chunks:
        part = encode_part(rows(chunk))
        out.write_part(part["name"], part["data"])
    with pytest.raises(RuntimeError, match=match):
        finalize(out, SPEC, plan, {})
    assert not out.exists(MANIFEST_NAME) and out.exists(PLAN_NAME)


def test_s3_output_atomic_writes_and_clear(s3_server, s3_bucket):
    out = OutputDir(f"s3://{s3_bucket}/out", s3_server["storage_options"])
    plan = ["s3://b/in/0.png", "s3://b/in/1.png"]
    _state(out, plan)
    part = encode_part(rows(plan))
    out.write_part(part["name"], part["data"])
    assert out.read_json(SPEC_NAME) == SPEC and out.read_plan() == plan
    finalize(out, SPEC, plan, {})
    assert out.exists(MANIFEST_NAME) and out.part_names() == [part["name"]]
    out.clear()
    assert not out.exists(MANIFEST_NAME) and out.part_names() == []


def _write_lock(out: OutputDir, **fields) -> None:
    lock = {
        "run_id": "other",
        "attempt": "a0",
        "host": "elsewhere",
        "pid": 1,
        "heartbeat": time.time(),
    }
    lock.update(fields)
    out.put_json(LOCK_NAME, lock)


def test_lease_one_writer_at_a_time(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    first, second = Lease(out, "run-1"), Lease(out, "run-2")
    first.acquire()
    try:
        with pytest.raises(
            OutputStateError, match=r"being written by another segment run \(run run-1"
        ):
            second.acquire()
    finally:
        first.release()
    assert not out.exists(LOCK_NAME)
    second.acquire()
    second.release()


def test_lease_taken_over_when_stale_or_its_process_is_gone(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    _write_lock(out, heartbeat=time.time() - lease_mod.LEASE_SECONDS - 5)  # other host, silent
    lease = Lease(out, "mine")
    lease.acquire()
    lease.release()

    _write_lock(out)  # other host, fresh heartbeat: its process may well be running
    with pytest.raises(OutputStateError, match="host elsewhere"):
        Lease(out, "mine").acquire()

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    _write_lock(out, host=socket.gethostname(), pid=int(gone.stdout))  # this host, pid exited
    lease = Lease(out, "mine")
    lease.acquire()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["run_id"] == "mine"
    lease.release()


def test_lease_lost_to_another_run_stops_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_SECONDS", 0.05)
    out = OutputDir(str(tmp_path / "out"))
    lease = Lease(out, "mine")
    lease.acquire()
    try:
        lease.check(read=True)  # still ours
        _write_lock(out, attempt="intruder")
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval, not synchronisation
        with pytest.raises(RuntimeError, match="lost the lease"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["attempt"] == "intruder"


def test_retrying_retries_transient_and_raises_permanent_at_once():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retrying(flaky, what="read") == "ok" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retrying(missing)
    assert len(calls) == 1

    def always() -> None:
        raise TimeoutError("slow down")

    with pytest.raises(OSError, match="write x: slow down"):
        retrying(always, what="write x", attempts=2)
