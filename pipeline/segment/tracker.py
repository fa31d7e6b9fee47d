"""The driver's view of a run's shards: counts from small records, never rows.

The pipeline's last stage (pipeline.segment.parts.write_parts) returns one record per
shard in a batch: the shard's number, the rows it saw, their counts, and whether it
wrote the whole part or a piece of it. Ray Data delivers each record once (a retried
task's output is delivered instead of, not as well as, the lost one's), so summing a
shard's rows tells when all of its pieces are in; then one :func:`assemble_part` task
joins them. What the driver holds is a counter per shard in flight.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from pipeline.segment.commit import OutputDir
from pipeline.segment.lease import Lease
from pipeline.segment.plan import Plan

ASSEMBLE_CPUS = 0.25
ASSEMBLE_RETRIES = 3


class ShardTracker:
    """Counts a run's records (:meth:`add`) and joins shards written in pieces."""

    def __init__(self, out: OutputDir, plan: Plan, lease: Lease, started: float) -> None:
        self.out, self.plan, self.lease, self.started = out, plan, lease, started
        self.processed: dict[str, Any] = {"rows": 0, "ok": 0, "error": 0, "instances": 0}
        self.processed["parts"] = 0
        self.received: defaultdict[int, int] = defaultdict(int)  # rows of shards in pieces
        self.assembling: dict[Any, int] = {}  # object ref -> shard
        self._task: Any = None

    def add(self, record: dict[str, Any]) -> int:
        """Count one record; returns its rows. Raises when the lease is lost."""
        if record["lost"]:
            self.lease.mark_lost(record["lost"])
        self.lease.check()  # never let the pipeline go on once another run took OUTPUT over
        shard, rows = int(record["shard"]), int(record["rows"])
        for key in ("rows", "ok", "error", "instances"):
            self.processed[key] += int(record[key])
        if record["whole"]:
            self._committed(rows)
        else:
            self.received[shard] += rows
            if self.received[shard] >= self.plan.rows(shard):
                del self.received[shard]
                self._assemble(shard)
        self._collect(block=False)
        return rows

    def wait(self) -> None:
        """Wait for every assembly still running; raises as :meth:`add` does, or when a
        shard's pieces lack rows the records counted."""
        self._collect(block=True)

    def _committed(self, rows: int) -> None:
        self.processed["parts"] += 1
        if self.processed["parts"] == 1:  # startup (actors, first batches) shows here
            self.processed["first_part_s"] = time.monotonic() - self.started
            self.processed["first_part_rows"] = rows

    def _assemble(self, shard: int) -> None:
        import ray

        from pipeline.segment.parts import assemble_part

        if self._task is None:
            self._task = ray.remote(
                num_cpus=ASSEMBLE_CPUS, max_retries=ASSEMBLE_RETRIES, retry_exceptions=True
            )(assemble_part)
        ref = self._task.remote(
            self.out.uri,
            self.out.options,
            self.plan.rows_per_shard,
            self.lease.attempt,
            shard,
            self.plan.rows(shard),
        )
        self.assembling[ref] = shard

    def _collect(self, block: bool) -> None:
        import ray

        while self.assembling:
            refs = list(self.assembling)
            done, _ = ray.wait(
                refs, num_returns=len(refs) if block else 1, timeout=None if block else 0
            )
            if not done:
                return
            for ref in done:
                shard = self.assembling.pop(ref)
                result = ray.get(ref)
                if result.get("lost"):
                    self.lease.mark_lost(result["lost"])
                    self.lease.check()
                if result["missing"]:
                    raise RuntimeError(
                        f"{self.out.show()}: the pieces of shard {shard} lack "
                        f"{result['missing']} of its {self.plan.rows(shard)} rows; not "
                        "committing it. Re-run the same command"
                    )
                self._committed(int(result["rows"]))
