"""Ray Data's executor runs in an actor, not in the driver (pipeline/segment/executor.py):
the dataset is built there, the driver gets the same rows, runs no executor thread, sees
a pipeline error's own first line, and leaving the loop early ends the actor."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from ray import cloudpickle

from pipeline.segment.executor import PipelineError, remote_rows

# The functions below go to Ray workers by value: those cannot import a test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor_threads() -> list[str]:
    """Ray Data's scheduling loop is a thread named StreamingExecutor-<dataset>."""
    return [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")]


def _doubled(batch):
    return {"id": batch["id"], "twice": batch["id"] * 2}


def test_rows_come_through_the_actor_and_no_executor_runs_in_the_driver(ray_local):
    ds = ray_local.data.range(40, override_num_blocks=8).map_batches(_doubled, num_cpus=0.5)
    seen, threads = [], set()
    with remote_rows(lambda: ds) as rows:
        for row in rows:
            seen.append((row["id"], row["twice"]))
            threads.update(_executor_threads())
    assert sorted(seen) == [(i, 2 * i) for i in range(40)]
    assert threads == set()
    # What the driver would have run itself: the check above can see it.
    for _ in ds.iter_rows():
        threads.update(_executor_threads())
    assert threads


def _built_here(ray):
    """A dataset that says which process built it (from_items puts its blocks there)."""
    return ray.data.from_items([{"built_in": os.getpid(), "i": i} for i in range(5)])


def test_the_dataset_is_built_in_the_actor_not_in_the_driver(ray_local):
    with remote_rows(lambda: _built_here(ray_local)) as rows:
        built_in = {row["built_in"] for row in rows}
    assert len(built_in) == 1 and os.getpid() not in built_in, built_in


def _fails_on_block_3(batch):
    if 30 <= batch["id"][0] < 40:
        raise ValueError(f"bad block starting at {batch['id'][0]}")
    return batch


def test_an_error_in_the_pipeline_reaches_the_driver_first_line_first(ray_local):
    ds = ray_local.data.range(80, override_num_blocks=8).map_batches(_fails_on_block_3)
    with pytest.raises(PipelineError) as info, remote_rows(lambda: ds) as rows:
        list(rows)
    # What the stage raised comes first (the CLI prints one line), Ray's account after.
    lines = str(info.value).splitlines()
    assert lines[0] == "ValueError: bad block starting at 30", lines[0]
    assert any("PipelineExecutor.next" in line for line in lines[1:])


def test_leaving_the_loop_early_ends_the_actor(ray_local):
    ds = ray_local.data.range(1000, override_num_blocks=20).map_batches(_doubled)
    with remote_rows(lambda: ds) as rows:
        for _ in rows:
            break
    # ray.kill takes effect asynchronously: a call sent right after it may still be served,
    # but the actor must be gone long before it has handed over the other 999 rows.
    deadline = time.monotonic() + 60
    with pytest.raises(ray_local.exceptions.RayActorError):
        while time.monotonic() < deadline:
            assert ray_local.get(rows.actor.next.remote()) is not None, "the actor ran to the end"
