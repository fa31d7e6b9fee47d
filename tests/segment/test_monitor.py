"""pipeline/segment/monitor.py: Ray Data's executor runs in an actor, not in the driver
(the dataset is built there, the driver gets the same rows, runs no executor thread, sees
a pipeline error's own first line, and leaving the loop early ends the actor); the
watchdog reports progress and ends a stall in the thread that runs segment, whichever
thread that is, without touching any other."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from helpers.segment_data import make_images, tiny_model, write_local
from helpers.wait import wait_until
from ray import cloudpickle

from maskrcnn.checkpoint import save
from pipeline.cluster import pending_demands
from pipeline.segment.driver import SegmentOptions, segment
from pipeline.segment.model_source import ModelSource
from pipeline.segment.monitor import PipelineError, StallError, Watchdog, remote_rows

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


def test_the_watchdog_says_how_far_the_run_got_while_nothing_waits():
    lines: list[str] = []
    dog = Watchdog(lines.append, stall_timeout=0, interval=0, demands=lambda: [], total=1000)
    dog.check()
    assert lines == []  # nothing done yet: nothing to say
    dog.progress(250)
    dog.check()
    assert lines and lines[0].startswith("segment: 250 of 1000 images done ("), lines


def test_a_stall_is_what_a_look_at_the_cluster_finds_past_the_timeout(ray_local):
    """On Ray: a stall is a demand no node can host (the shared instance: one node of 4
    CPUs), and its message reads the cluster's shapes. A demand that fits a node is work
    queued behind other work (a busy cluster, a slow start): said, never a stall."""
    lines: list[str] = []
    waiting = [{"CPU": 1.0, "count": 3.0}, {"CPU": 64.0, "count": 1.0}]
    patient = Watchdog(lines.append, stall_timeout=3600, interval=0, demands=lambda: waiting)
    patient.check()  # within the timeout: it says what waits
    assert "waiting for resources: 3 x {CPU: 1}; 1 x {CPU: 64} pending" in lines[0], lines
    queued = Watchdog(lines.append, stall_timeout=1e-9, demands=lambda: waiting[:1])
    queued.check()  # past the timeout, but every demand fits the node: no stall
    stalled = Watchdog(lines.append, stall_timeout=1e-9, demands=lambda: waiting)
    with pytest.raises(StallError, match=r"cannot place 1 x \{CPU: 64\} \(the cluster has 1 node"):
        stalled.check()


@pytest.mark.timeout(240)
def test_a_stalled_segment_raises_in_its_own_thread_and_leaves_the_main_thread_alone(
    ray_local, tmp_path
):
    """A library user runs segment in a worker thread (a notebook's, a service's): a stall
    ends that call with StallError; the main thread, blocked meanwhile, goes on untouched
    and its SIGINT handler is what it was."""
    save(tiny_model(0), str(tmp_path / "m.safetensors"))
    write_local(tmp_path / "in", make_images(2, seed=3))
    too_big = SegmentOptions(  # an actor no node can host; the cluster "may add one"
        actors=(1, 1), cpus_per_actor=64, autoscaling=True, stall_timeout=2, wait_interval=1
    )
    handler = signal.getsignal(signal.SIGINT)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            segment(
                str(tmp_path / "in"),
                str(tmp_path / "out"),
                ModelSource(checkpoint=str(tmp_path / "m.safetensors")),
                too_big,
                log=lambda line: None,
            )
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="segment-caller")
    thread.start()
    thread.join(timeout=200)  # a KeyboardInterrupt sent to this thread would end the test
    assert not thread.is_alive(), "segment did not end"
    assert isinstance(outcome.get("error"), StallError), outcome
    assert "while Ray cannot place" in str(outcome["error"]), outcome
    assert signal.getsignal(signal.SIGINT) is handler
    # The run's actors and tasks went with it: the shared instance is left as it was.
    wait_until(lambda: pending_demands() == [], "the stalled run's demands to go", timeout=60)
