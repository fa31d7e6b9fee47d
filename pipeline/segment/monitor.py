"""The driver's side of a running pipeline, all in the driver's own thread: the executor
actor that runs the pipeline, the tracker that counts its records, and the watchdog that
reports progress and ends a stall.

The executor: Ray Data schedules a dataset in the process that iterates it, with a loop
that costs about 0.07 of a core whatever the row rate (bench/executor_floor_bench.py); in
the driver, that cost grew with the run's length and shared one interpreter with the
driver's own work. Here an actor beside the driver runs the pipeline and hands the driver
its records one at a time (the same pattern as Ray Train's dataset split coordinator).
The actor asks for no logical CPU, runs on the driver's node and is owned by the driver,
so it ends with the driver however the driver ends; leaving the ``with`` block (done, an
error, a stall, Ctrl-C) kills it, which stops the pipeline. A part already written stays
written, under the lease's rules (stages/write.py).

The driver waits for the next record at most ``poll`` seconds at a time and looks at the
cluster in between (:class:`Watchdog`): no thread, no signal, so :func:`segment` ends a
stall the same way from any thread of any process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import cluster
from pipeline.segment.commit import Counts
from pipeline.segment.lease import Lease
from pipeline.segment.output import OutputDir
from pipeline.segment.plan import Plan
from pipeline.segment.stages.write import ShardRecord, assemble_part
from pipeline.storage import first_line

POLL_S = 5.0  # the longest the driver waits without looking at the cluster
ASSEMBLE_CPUS = 0.25
ASSEMBLE_RETRIES = 3


class PipelineError(RuntimeError):
    """The pipeline failed; the first line of the message is the first error raised (a
    stage's own, e.g. ``RuntimeError: ... holds 3 URIs, the plan says 5``), the rest is
    Ray's account of it, through each process it crossed."""


class StallError(RuntimeError):
    """The run made no progress while Ray could not place what it asked for."""


# --- the executor ------------------------------------------------------------------------
class PipelineExecutor:
    """The actor: builds the dataset (``build()``) and iterates it, one row per
    :meth:`next` call. Built here, the dataset's input blocks are this actor's objects:
    the driver owns none of the pipeline's blocks."""

    def __init__(self, build: Callable[[], Any]) -> None:
        dataset = build()
        # A stage's own exception, not Ray Data's UserCodeException around it: crossing a
        # process, an exception keeps its message but loses its ``__cause__``.
        dataset.context.raise_original_map_exception = True
        self._rows = iter(dataset.iter_rows())

    def next(self) -> dict[str, Any] | None:
        """The next row, None at the end. Raises PipelineError naming the first error the
        pipeline raised (Ray's wrappers hold it as their ``cause``)."""
        try:
            return next(self._rows, None)
        except Exception as exc:
            root = root_cause(exc)
            if root is None or root is exc:
                raise
            raise PipelineError(f"{type(root).__name__}: {first_line(root)}") from exc


@contextmanager
def remote_rows(build: Callable[[], Any]) -> Iterator[RemoteRows]:
    """The rows of the dataset ``build()`` returns, built and executed in a
    :class:`PipelineExecutor` actor."""
    here = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(PipelineExecutor)
        .options(
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(build)
    )
    try:
        yield RemoteRows(actor)
    finally:
        ray.kill(actor)


class RemoteRows:
    """The rows a :class:`PipelineExecutor` actor (``actor``) hands over."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.rows()

    def rows(
        self, waiting: Callable[[], None] | None = None, poll: float = POLL_S
    ) -> Iterator[dict[str, Any]]:
        """Each row in turn; ``waiting()`` is called each ``poll`` seconds a row is late
        (what it raises ends the iteration, and leaving the block ends the actor)."""
        while True:
            ref = self.actor.next.remote()
            while waiting is not None and not ray.wait([ref], timeout=poll)[0]:
                waiting()
            row = self._get(ref)
            if row is None:
                return
            yield row

    @staticmethod
    def _get(ref: Any) -> dict[str, Any] | None:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"the actor running the pipeline died ({first_line(exc)}); the parts "
                "written so far are kept: re-run the same command to resume"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, PipelineError):
                raise
            raise PipelineError(f"{exc.cause}\n{exc}") from exc


def root_cause(exc: BaseException) -> BaseException | None:
    """The first exception down ``exc``'s chain of causes (Ray's ``cause``, Python's
    ``__cause__``) that is not one of Ray's wrappers; None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not isinstance(current, _ray_wrappers()):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _ray_wrappers() -> tuple[type, ...]:
    # lazy: the driver never imports ray.data otherwise (0.8 s, measured on 2 cores)
    from ray.data.exceptions import UserCodeException

    return (ray.exceptions.RayError, UserCodeException)


# --- the tracker -------------------------------------------------------------------------
class ShardTracker:
    """The driver's view of a run's shards: counts from small records, never rows.

    Ray Data delivers each record of the last stage once (a retried task's output is
    delivered instead of, not as well as, the lost one's), so summing a shard's rows tells
    when all of its pieces are in; then one :func:`assemble_part` task joins them. What the
    driver holds is a counter per shard in flight.
    """

    def __init__(self, out: OutputDir, plan: Plan, lease: Lease, started: float) -> None:
        self.out, self.plan, self.lease, self.started = out, plan, lease, started
        self.counts = Counts()
        self.parts = 0
        self.first_part: tuple[float, int] | None = None  # (seconds, rows) to the first part
        self.received: defaultdict[int, int] = defaultdict(int)  # rows of shards in pieces
        self.assembling: dict[Any, int] = {}  # object ref -> shard
        self._assemble = ray.remote(
            num_cpus=ASSEMBLE_CPUS, max_retries=ASSEMBLE_RETRIES, retry_exceptions=True
        )(assemble_part)

    def add(self, record: ShardRecord) -> int:
        """Count one record; returns its rows. Raises when the lease is lost."""
        if record.lost:
            self.lease.mark_lost(record.lost)
        self.lease.check()  # never let the pipeline go on once another run took OUTPUT over
        self.counts += record.counts
        if record.whole:
            self._committed(record.counts.rows)
        else:
            self.received[record.shard] += record.counts.rows
            if self.received[record.shard] >= self.plan.rows(record.shard):
                del self.received[record.shard]
                self._start_assembly(record.shard)
        self._collect(timeout=0)
        return record.counts.rows

    def wait(self, waiting: Callable[[], None], poll: float = POLL_S) -> None:
        """Wait for every assembly still running, calling ``waiting()`` every ``poll``
        seconds; raises as :meth:`add` does, or when a shard's pieces lack rows."""
        while self.assembling:
            self._collect(timeout=poll)
            if self.assembling:
                waiting()

    def summary(self, seconds: float) -> dict[str, Any]:
        """This run's figures: rows, ok, error, instances, parts, seconds, and
        first_part_s / first_part_rows when a part came out."""
        summary: dict[str, Any] = {**self.counts.to_dict(), "parts": self.parts}
        if self.first_part is not None:
            summary["first_part_s"], summary["first_part_rows"] = self.first_part
        return {**summary, "seconds": seconds}

    def _committed(self, rows: int) -> None:
        self.parts += 1
        if self.first_part is None:  # startup (actors, first batches) shows here
            self.first_part = (time.monotonic() - self.started, rows)

    def _start_assembly(self, shard: int) -> None:
        out, attempt = self.out, self.lease.attempt
        ref = self._assemble.remote(
            out.uri, out.options, attempt, shard, self.plan.rows(shard), out.parts
        )
        self.assembling[ref] = shard

    def _collect(self, timeout: float) -> None:
        """Count the assemblies that end within ``timeout`` seconds."""
        if not self.assembling:
            return
        done, _ = ray.wait(list(self.assembling), num_returns=1, timeout=timeout)
        while done:
            for ref in done:
                self._assembled(self.assembling.pop(ref), ray.get(ref))
            refs = list(self.assembling)
            done = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []

    def _assembled(self, shard: int, result: ShardRecord) -> None:
        if result.lost:
            self.lease.mark_lost(result.lost)
            self.lease.check()
        if result.missing:
            raise RuntimeError(
                f"{self.out.show()}: the pieces of shard {shard} lack {result.missing} of "
                f"its {self.plan.rows(shard)} rows; not committing it. Re-run the same command"
            )
        self._committed(result.counts.rows)


# --- the watchdog ------------------------------------------------------------------------
class Watchdog:
    """No silent hang. :meth:`progress` counts the rows of each part received; :meth:`poll`,
    called by the driver at least every POLL_S seconds, looks at the cluster when POLL_S
    have passed since it last did (:meth:`check`).

    While Ray holds demands it has not placed (cluster.pending_demands), it says so every
    ``interval`` seconds: what waits, what the cluster has, how far the run got; otherwise
    it says how far the run got, at the same interval. When no part came for
    ``stall_timeout`` seconds while a pending demand fits no alive node
    (``unplaceable``, by default cluster.unplaceable over the nodes now), :meth:`check`
    raises :class:`StallError` (the parts committed so far stay committed; a re-run
    resumes after them). A demand that fits a node is work queued behind other work, on
    a busy cluster or a slow start: a stall only while it cannot be hosted at all.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        stall_timeout: float,
        interval: float = 60.0,
        demands: Callable[[], list[dict[str, float]]] = cluster.pending_demands,
        total: int | None = None,
        unplaceable: Callable[[list[dict[str, float]]], list[dict[str, float]]] | None = None,
    ):
        self.log, self.stall_timeout, self.interval = log, stall_timeout, interval
        self.demands, self.total = demands, total
        self.unplaceable = unplaceable or (lambda d: cluster.unplaceable(d, cluster.node_shapes()))
        self.every = min(POLL_S, interval, stall_timeout or POLL_S)
        self.rows = 0
        self._started = self._last_part = self._last_log = self._last_check = time.monotonic()

    def progress(self, rows: int) -> None:
        self.rows += rows
        self._last_part = time.monotonic()

    def poll(self) -> None:
        """:meth:`check` when ``every`` seconds have passed since the last look."""
        if time.monotonic() - self._last_check >= self.every:
            self.check()

    def check(self) -> None:
        """One look at the cluster: logs what is due; raises StallError on a stall. A
        failure to look is logged, never raised: the watchdog must not end the run."""
        self._last_check = time.monotonic()
        try:
            self._look(self.demands())
        except StallError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.log(f"segment: watchdog: {exc}")

    def _look(self, pending: list[dict[str, float]]) -> None:
        now = time.monotonic()
        idle = now - self._last_part
        if pending and self.stall_timeout > 0 and idle >= self.stall_timeout:
            stuck = self.unplaceable(pending)
            if stuck:
                raise StallError(self._stall_text(stuck, idle))
        if now - self._last_log < self.interval or not (pending or self.rows):
            return
        self._last_log = now
        if pending:
            self.log(
                f"segment: waiting for resources: {cluster.demands_text(pending)} pending "
                f"(the cluster has {cluster.resources_text()}); {self.rows} images so far, "
                f"last part {idle:.0f}s ago"
            )
        else:
            of = f" of {self.total}" if self.total is not None else ""
            rate = self.rows / max(now - self._started, 1e-9)
            self.log(
                f"segment: {self.rows}{of} images done ({rate:.1f} images/s), last part "
                f"{idle:.0f}s ago"
            )

    def _stall_text(self, pending: list[dict[str, float]], idle: float) -> str:
        return (
            f"stalled: no part for {idle:.0f}s (--stall-timeout {self.stall_timeout:g}) while "
            f"Ray cannot place {cluster.demands_text(pending)} (the cluster has "
            f"{cluster.shapes_text(cluster.node_shapes())}, {cluster.resources_text()}); "
            f"{self.rows} images committed stay committed: fix the resources (--actors, "
            "--cpus-per-actor, --gpus-per-actor, nodes) and re-run to resume"
        )
