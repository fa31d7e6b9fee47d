"""One writer per segment OUTPUT: ``OUTPUT/_run/lock.json`` with a heartbeat.

The lock holds the run's id, host, pid (and the pid's start time) and a
heartbeat time refreshed every HEARTBEAT_SECONDS by a background thread. A
second run is refused while the lease is live. A lease is free when its
heartbeat is older than LEASE_SECONDS, or at once when its process is gone on
this host (the usual case: a killed driver re-run by the same command).

Object stores give no compare-and-swap through fsspec, so two runs started in
the same instant could both write the lock; each reads it back after writing,
and every heartbeat re-reads it: a run that finds another run's id there stops
before writing another part (Lease.check), and the manifest step refuses a
doubled URI in any case (pipeline/segment/commit.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.segment.output import LOCK_NAME, OutputDir, OutputStateError, now_iso
from pipeline.storage import first_line

HEARTBEAT_SECONDS = float(os.environ.get("MASKRCNN_HEARTBEAT_SECONDS", "10"))
LEASE_SECONDS = float(os.environ.get("MASKRCNN_LEASE_SECONDS", "60"))


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


def taken_over(lock: dict[str, Any], attempt: str) -> str | None:
    """Who took the lease over when ``lock`` is another attempt's, else None."""
    if lock.get("attempt") != attempt:
        return f"run {lock.get('run_id')} (host {lock.get('host')}) took over"
    return None


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
        try:
            self.out.put_json(LOCK_NAME, self._record())
        except OSError as exc:  # the first write to OUTPUT: say which and why
            reason = first_line(exc)
            raise OSError(f"OUTPUT {self.out.show()}: cannot write there ({reason})") from exc
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
                lost = self._taken_over()
                if lost:
                    self.lost = lost  # only ever set: check() may be reading it
                    return
                self.out.put_json(LOCK_NAME, self._record())
            except Exception:  # flaky storage: try again at the next beat
                continue

    def _taken_over(self) -> str | None:
        """Who holds the lock now when it is another run's (read from OUTPUT), else None."""
        lock = self.out.read_json(LOCK_NAME)
        return None if lock is None else taken_over(lock, self.attempt)

    def mark_lost(self, reason: str) -> None:
        """Record that the lease is lost (a task found another run's lock): check() raises."""
        self.lost = self.lost or reason

    def check(self, read: bool = False) -> None:
        """Raise if another run took the lease: this run must not commit anything more.

        ``read``: look at the lock now rather than trust the last heartbeat.
        """
        if read and not self.lost:
            self.lost = self._taken_over() or self.lost
        if self.lost:
            raise RuntimeError(
                f"OUTPUT {self.out.show()}: lost the lease ({self.lost}); stopping without "
                "committing more"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS + 5)
        try:
            lock = self.out.read_json(LOCK_NAME)
            if lock is not None and lock.get("attempt") == self.attempt:
                self.out.remove(LOCK_NAME)
        except OSError:
            pass  # storage down: the lease expires by itself after LEASE_SECONDS
