"""No silent hang: a thread beside the driver's loop over parts.

While Ray holds demands it has not placed (ray.autoscaler.v2.sdk cluster status),
the watchdog says so every ``interval`` seconds: what waits, what the cluster has,
how far the run got; otherwise it says how far the run got, at the same interval.
When the driver has received no part for ``stall_timeout`` seconds while such
demands are pending, it interrupts the driver's loop, which ends with
:class:`StallError` (the parts committed so far stay committed; a re-run resumes
after them).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline import cluster

POLL_S = 5.0


class StallError(RuntimeError):
    """The run made no progress while Ray could not place what it asked for."""


def interrupt_main_thread() -> None:
    """KeyboardInterrupt in the main thread, even while it blocks on a lock, a queue or
    ``ray.get`` (waiting on the pipeline's next record): a real SIGINT sent to that thread
    ends the wait, where ``_thread.interrupt_main`` only flags it for when the thread next
    runs Python code."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


class Watchdog:
    """Progress is :meth:`progress` calls (one per part received)."""

    def __init__(
        self,
        log: Callable[[str], None],
        stall_timeout: float,
        interval: float = 60.0,
        demands: Callable[[], list[dict[str, float]]] = cluster.pending_demands,
        total: int | None = None,
    ):
        self.log, self.stall_timeout, self.interval = log, stall_timeout, interval
        self.demands, self.total = demands, total
        self.rows = 0
        self._started = time.monotonic()
        self.error: str | None = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._previous: object = signal.default_int_handler  # SIGINT's handler before

    def progress(self, rows: int) -> None:
        self.rows += rows
        self._last = time.monotonic()

    def _tick(self, last_log: float) -> float:
        """One look at the cluster; returns when the last message was logged: waiting for
        resources, else how far the run got (every ``interval`` seconds, once parts come)."""
        pending = self.demands()
        now = time.monotonic()
        if not pending:
            if self.rows and now - last_log >= self.interval:
                of = f" of {self.total}" if self.total is not None else ""
                rate = self.rows / max(now - self._started, 1e-9)
                self.log(
                    f"segment: {self.rows}{of} images done ({rate:.1f} images/s), last part "
                    f"{now - self._last:.0f}s ago"
                )
                return now
            return last_log
        idle = now - self._last
        if self.stall_timeout > 0 and idle >= self.stall_timeout:
            self.error = (
                f"stalled: no part for {idle:.0f}s (--stall-timeout "
                f"{self.stall_timeout:g}) while Ray cannot place {cluster.demands_text(pending)} "
                f"(the cluster has {cluster.shapes_text(cluster.node_shapes())}, "
                f"{cluster.resources_text()}); {self.rows} images committed stay committed: "
                "fix the resources (--actors, --cpus-per-actor, --gpus-per-actor, nodes) "
                "and re-run to resume"
            )
            self._stop.set()
            interrupt_main_thread()
            return now
        if now - last_log >= self.interval:
            self.log(
                f"segment: waiting for resources: {cluster.demands_text(pending)} pending "
                f"(the cluster has {cluster.resources_text()}); {self.rows} images so far, "
                f"last part {idle:.0f}s ago"
            )
            return now
        return last_log

    def _run(self) -> None:
        last_log = time.monotonic()
        poll = min(POLL_S, self.interval, self.stall_timeout or POLL_S)
        while not self._stop.wait(poll):
            try:
                last_log = self._tick(last_log)
            except Exception as exc:  # noqa: BLE001 - the watchdog must never end the run
                self.log(f"segment: watchdog: {exc}")

    def _on_sigint(self, signum: int, frame: object) -> None:
        """SIGINT while watching: the stall's interrupt, else what SIGINT did before."""
        if self.error is not None:
            raise KeyboardInterrupt
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Watch for the block; a stall ends the block with StallError.

        In the main thread, SIGINT gets this watchdog's handler for the block: the
        stall's interrupt must not depend on what SIGINT was set to before (a process
        started with SIGINT ignored, as children of some shells and tools are, would
        otherwise never see it). Ctrl-C keeps its previous effect."""
        installed = threading.current_thread() is threading.main_thread()
        if installed:
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        thread = threading.Thread(target=self._run, name="segment-watchdog", daemon=True)
        thread.start()
        try:
            yield
        except KeyboardInterrupt:
            if self.error is None:
                raise
            raise StallError(self.error) from None
        finally:
            self._stop.set()
            thread.join()
            if installed:
                previous = self._previous
                signal.signal(
                    signal.SIGINT, signal.default_int_handler if previous is None else previous
                )
