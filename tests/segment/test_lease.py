"""pipeline/segment/lease.py: one writer per OUTPUT."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from helpers.wait import wait_until

import pipeline.segment.lease as lease_mod
from pipeline.segment.lease import Lease
from pipeline.segment.output import LOCK_NAME, OutputDir, OutputStateError


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
        wait_until(lambda: lease.lost, "the heartbeat to see the other run's lock", 10, 0.01)
        with pytest.raises(RuntimeError, match="lost the lease"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["attempt"] == "intruder"
