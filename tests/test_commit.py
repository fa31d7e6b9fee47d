"""The exactly-once building blocks without Ray: the plan in shards, parts and pieces
written by tasks, manifest checks, lease, retries."""

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
from pipeline.segment.commit import Counts, encode_part, finalize, read_counts
from pipeline.segment.lease import Lease
from pipeline.segment.output import (
    LOCK_NAME,
    PLAN_DIR,
    SPEC_NAME,
    OutputDir,
    OutputStateError,
    part_name,
    piece_dir,
    shard_name,
)
from pipeline.segment.plan import (
    Plan,
    SecretsInInput,
    is_plain,
    plan_digest,
    read_shard,
    write_plan,
)
from pipeline.segment.stages.write import ShardRecord, assemble_part, write_parts
from pipeline.storage import redact, retrying


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


def _plan(out: OutputDir, uris: list[str], rows_per_shard: int) -> Plan:
    """Write ``uris`` (sorted) as the plan and SPEC with it, as a first start does."""
    plan = write_plan(out, [uris], rows_per_shard)
    out.put_json(SPEC_NAME, {**SPEC, **plan.to_spec()})
    return plan


def _batch(uris: list[str], shard: int, size: int, **kw) -> pa.Table:
    """encode_rows' output for ``uris`` of shard ``shard`` (of ``size`` rows)."""
    table = rows(uris, **kw)
    n = table.num_rows
    table = table.append_column("shard", pa.array([shard] * n, pa.int64()))
    return table.append_column("shard_rows", pa.array([size] * n, pa.int64()))


def _write(out: OutputDir, batch: pa.Table, attempt: str = "a1") -> list:
    return write_parts(
        batch,
        output_uri=out.uri,
        output_options=out.options,
        attempt=attempt,
    ).to_pylist()


def _lock(out: OutputDir, attempt: str = "a1") -> None:
    out.put_json(LOCK_NAME, {"run_id": "r1", "attempt": attempt, "host": "h"})


def test_plan_is_shard_files_of_sorted_unique_keys(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i:03d}.png" for i in range(23)]
    # Chunks of any size, as a listing yields them.
    plan = write_plan(out, [uris[:3], [], uris[3:17], uris[17:]], 5)
    assert (plan.images, plan.rows_per_shard, plan.shards) == (23, 5, 5)
    assert [plan.rows(i) for i in range(5)] == [5, 5, 5, 5, 3]
    assert plan.digest == plan_digest([uris])
    names = sorted(p.name for p in (tmp_path / "out" / PLAN_DIR).iterdir())
    assert names == [f"shard-{i:06d}.txt" for i in range(5)]
    shards = [read_shard(out.fs, out.path(shard_name(i))) for i in range(5)]
    assert [u for shard in shards for u in shard] == uris
    assert Plan.from_spec(plan.to_spec()) == plan
    assert plan.shard_of_part("part-000004.parquet") == 4
    for foreign in ("part-000005.parquet", "part-4.parquet", "part-0123abcd.parquet", "x"):
        assert plan.shard_of_part(foreign) is None


@pytest.mark.parametrize(
    "chunks, match",
    [
        ([["/in/a.png", "/in/b.png"], ["/in/b.png"]], "comes twice"),
        ([["/in/b.png", "/in/a.png"]], "out of order"),
        ([["/in/a.png", "/in/c.png"], ["/in/b.png"]], "out of order"),
    ],
)
def test_plan_refuses_keys_that_would_overlap_shards(tmp_path, chunks, match):
    with pytest.raises(ValueError, match=match):
        write_plan(OutputDir(str(tmp_path / "out")), chunks, 1)


def test_plan_of_urls_with_secrets_is_made_from_keys(tmp_path):
    signed = "https://h.example/img/a.jpg?X-Amz-Signature=abc"
    with pytest.raises(SecretsInInput):
        write_plan(OutputDir(str(tmp_path / "out")), [["https://h.example/img/0.jpg", signed]], 1)
    for uri in (
        "/local/a.png",
        "s3://bucket/a/b.png",
        "s3://Bucket/a.png",
        "https://user:pw@h/a.png",
        "https://h/a.png#frag",
        "gs://b/a%20b.png",
        "https://h:8080/a.png",
        signed,
    ):
        assert is_plain(uri) == (redact(uri) == uri), uri


def test_part_bytes_are_a_function_of_the_rows_only(tmp_path):
    a = ["/in/a.png", "/in/b.png", "/in/c.png"]
    data, counts = encode_part(rows(a, errors={"/in/c.png"}))
    # Another order, and a row twice (a retried batch): the same bytes.
    again, _ = encode_part(rows(a[::-1] + a[:1], errors={"/in/c.png"}))
    assert again == data
    assert counts == Counts(rows=3, ok=2, error=1, instances=4)
    out = OutputDir(str(tmp_path / "out"))
    out.put_bytes("part-000000.parquet", data)
    assert read_counts(out, "part-000000.parquet") == counts


def test_a_whole_shard_is_its_part_and_a_split_one_is_joined_to_the_same_bytes(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(6)]
    plan = _plan(out, uris, 3)
    _lock(out)
    # Shard 0 whole in one batch; shard 1 split over two batches, one row in both (the
    # same rows twice: a duplicated task).
    records = _write(out, pa.concat_tables([_batch(uris[:3], 0, 3), _batch(uris[3:4], 1, 3)]))
    records += _write(out, _batch(uris[3:6], 1, 3, errors={"/in/5.png"})[1:])
    assert [(r["shard"], r["rows"], r["whole"]) for r in records] == [
        (0, 3, True),
        (1, 1, False),
        (1, 2, False),
    ]
    assert out.part_names() == ["part-000000.parquet"]
    assert len(list((tmp_path / "out" / piece_dir(1)).iterdir())) == 2
    joined = assemble_part(out.uri, None, "a1", 1, 3)
    assert joined == ShardRecord(1, Counts(rows=3, ok=2, error=1, instances=4), whole=True)
    assert not (tmp_path / "out" / piece_dir(1)).exists()
    whole, _ = encode_part(_batch(uris[3:6], 1, 3, errors={"/in/5.png"}))
    assert (tmp_path / "out" / part_name(1)).read_bytes() == whole
    # The same shard written again, whole (a duplicated task): the same object, once.
    _write(out, _batch(uris[3:6], 1, 3, errors={"/in/5.png"}))
    assert (tmp_path / "out" / part_name(1)).read_bytes() == whole
    manifest = finalize(out, {**SPEC, **plan.to_spec()}, plan, {})
    assert manifest["files"] == ["part-000000.parquet", "part-000001.parquet"]
    assert manifest["counts"] == {"images": 6, "ok": 5, "error": 1, "instances": 10}


def test_assembly_writes_nothing_while_rows_are_missing(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(3)]
    _plan(out, uris, 3)
    _lock(out)
    _write(out, _batch(uris[:2], 0, 3))
    assert assemble_part(out.uri, None, "a1", 0, 3).missing == 1
    assert out.part_names() == []


def test_a_task_of_a_run_that_lost_the_lease_writes_nothing(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(4)]
    _plan(out, uris, 2)
    _lock(out, attempt="intruder")
    records = _write(out, pa.concat_tables([_batch(uris[:2], 0, 2), _batch(uris[2:3], 1, 2)]))
    assert {r["lost"] for r in records} == {"run r1 (host h) took over"}
    assert assemble_part(out.uri, None, "a1", 1, 2).lost == "run r1 (host h) took over"
    assert out.part_names() == [] and not (tmp_path / "out" / piece_dir(1)).exists()


def test_finalize_writes_manifest_of_exactly_the_parts(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(5)]
    plan = _plan(out, uris, 2)
    _lock(out)
    for shard in range(3):
        chunk = uris[2 * shard : 2 * shard + 2]
        _write(out, _batch(chunk, shard, len(chunk), errors={"/in/4.png"}))
    manifest = finalize(out, SPEC, plan, {"versions": {}})
    assert read_manifest(str(tmp_path / "out")) == manifest
    assert manifest["files"] == out.part_names() and len(manifest["files"]) == 3
    assert manifest["counts"] == {"images": 5, "ok": 4, "error": 1, "instances": 8}
    assert not out.exists(SPEC_NAME)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("missing", "1 of 3 parts are missing"),
        ("foreign", "1 part.s. are not of this run's plan .first: part-000003.parquet"),
        ("old-style", "not of this run's plan .first: part-0a1b2c3d4e5f60718293.parquet"),
        ("short", "part-000001.parquet holds 1 rows, its shard 2"),
    ],
)
def test_finalize_refuses_a_missing_foreign_or_short_part(tmp_path, extra, match):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(6)]
    plan = _plan(out, uris, 2)
    _lock(out)
    for shard in range(3):
        if extra == "missing" and shard == 2:
            continue
        chunk = uris[2 * shard : 2 * shard + 2]
        if extra == "short" and shard == 1:
            chunk = chunk[:1]
        _write(out, _batch(chunk, shard, len(chunk)))
    if extra in ("foreign", "old-style"):
        data, _ = encode_part(rows(["/in/9.png"]))
        name = "part-000003.parquet" if extra == "foreign" else "part-0a1b2c3d4e5f60718293.parquet"
        out.put_bytes(name, data)
    with pytest.raises(RuntimeError, match=match):
        finalize(out, SPEC, plan, {})
    assert not out.exists(MANIFEST_NAME) and out.exists(SPEC_NAME)


def test_s3_output_atomic_writes_and_clear(s3_server, s3_bucket):
    out = OutputDir(f"s3://{s3_bucket}/out", s3_server["storage_options"])
    uris = ["s3://b/in/0.png", "s3://b/in/1.png", "s3://b/in/2.png"]
    plan = _plan(out, uris, 2)
    _lock(out)
    _write(out, _batch(uris[:2], 0, 2))
    _write(out, _batch(uris[2:], 1, 1))
    assert read_shard(out.fs, out.path(shard_name(1))) == uris[2:]
    finalize(out, SPEC, plan, {})
    assert out.exists(MANIFEST_NAME) and out.part_names() == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    out.clear()
    assert not out.exists(MANIFEST_NAME) and out.part_names() == []
    assert not out.fs.exists(out.path(PLAN_DIR))


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
