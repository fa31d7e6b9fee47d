"""Ray Data's executor off the driver: an actor beside it runs the pipeline and hands the
driver its records (pipeline.segment.parts.RECORD) one at a time.

Ray Data schedules a dataset in the process that iterates it, with a loop that costs
about 0.07 of a core whatever the row rate (bench/executor_floor_bench.py); in the
driver, that cost grew with the run's length and shared one interpreter with the
driver's own work. Here the driver does only what the run needs of it (lease, counts,
watchdog) and blocks in ``ray.get`` between records, at Ray core's floor. The same
pattern as Ray Train's dataset split coordinator.

The actor asks for no logical CPU, runs on the driver's node and is owned by the
driver, so it ends with the driver however the driver ends; leaving the ``with`` block
(done, an error, a stall, Ctrl-C) kills it, which stops the pipeline as leaving Ray
Data's iterator in the driver did. A part already written stays written, under the
lease's rules (pipeline.segment.parts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class PipelineError(RuntimeError):
    """The pipeline failed; the first line of the message is the first error raised (a
    stage's own, e.g. ``RuntimeError: ... holds 3 URIs, the plan says 5``), the rest is
    Ray's account of it, through each process it crossed."""


# A line of a Python traceback that names an exception: "pkg.mod.Name: message", where
# Ray writes wrappers as "ray.exceptions.RayTaskError(UserCodeException): ...".
_RAISED = re.compile(r"^((?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*)(?:\([\w.]+\))?): (.+)$", re.M)
_WRAPPERS = ("RayTaskError", "UserCodeException", "RaySystemError", "RayActorError")


def root_cause(text: str) -> str | None:
    """``Name: message`` of the first exception a traceback ``text`` shows that is not one
    of Ray's wrappers (Python prints a chain's first cause first); None when none is."""
    for match in _RAISED.finditer(text):
        name = match.group(2)
        if name not in _WRAPPERS and name.endswith(("Error", "Exception")):
            return f"{name}: {match.group(3).strip()}"
    return None


class PipelineExecutor:
    """The actor: builds the dataset (``build()``) and iterates it, one row per
    :meth:`next` call. Built here, the dataset's input blocks are this actor's objects:
    the driver owns none of the pipeline's blocks."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._rows = iter(build().iter_rows())

    def next(self) -> dict[str, Any] | None:
        """The next row, None at the end; raises what the pipeline raised."""
        return next(self._rows, None)


@contextmanager
def remote_rows(build: Callable[[], Any]) -> Iterator[RemoteRows]:
    """The rows of the dataset ``build()`` returns, built and executed in a
    :class:`PipelineExecutor` actor."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
    """Iterates the rows a :class:`PipelineExecutor` actor (``actor``) hands over."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (row := self._next()) is not None:
            yield row

    def _next(self) -> dict[str, Any] | None:
        import ray

        from pipeline.storage import first_line

        try:
            return ray.get(self.actor.next.remote())
        except ray.exceptions.RayTaskError as exc:
            root = root_cause(str(exc))
            if root is None:
                raise
            raise PipelineError(f"{root}\n{exc}") from exc
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"the actor running the pipeline died ({first_line(exc)}); the parts "
                "written so far are kept: re-run the same command to resume"
            ) from exc
