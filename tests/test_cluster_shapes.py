"""Segment on any cluster shape (issue 17): defaults per node, an up-front feasibility
check, a stall that ends with an error instead of a silent hang, and a stale
`ray start` record that does not stop a run.

The cluster is `ray start` processes on this machine (tests/helpers/cluster_fixture.py):
a head and two workers of 2 CPUs each, token auth. The CLI runs as a driver process
on this machine joining it with --address, reading and writing local files (every
node shares this filesystem). The unit tests of the rules themselves need no Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO
from helpers.cluster_fixture import LocalRayCluster, free_port
from helpers.proc import kill_group, maskrcnn_process
from helpers.segment_data import (
    assert_exactly_once,
    make_images,
    read_back,
    tiny_model,
    write_local,
)
from helpers.wait import wait_until

from pipeline.cluster import NodeShape
from pipeline.formats.shapes import make_shapes_dataset
from pipeline.segment.resources import InfeasibleError, actor_plan, check

THREE_NODES = [NodeShape(2, 0)] * 3

# --- the rules (no Ray) ---------------------------------------------------------------


def _not_asked() -> bool:
    raise AssertionError("a feasible plan asked whether the cluster may add nodes")


def test_defaults_come_from_each_node_not_the_sum():
    plan = actor_plan(None, None, None, THREE_NODES)
    # Half the cluster's 6 CPUs (the old default) is a 3-CPU actor no node can host.
    assert (plan.gpus, plan.cpus, plan.actors) == (0.0, 1.0, (1, 3))
    check(plan, THREE_NODES, _not_asked, print)  # feasible: no raise, the autoscaler not asked
    gpu = actor_plan(None, None, None, [NodeShape(8, 2), NodeShape(8, 2)])
    assert (gpu.gpus, gpu.cpus, gpu.actors) == (1.0, 1.0, (1, 4))


def test_infeasible_requests_fail_in_one_line_or_warn_when_nodes_may_come():
    no_node = actor_plan(None, 3, None, THREE_NODES)
    with pytest.raises(InfeasibleError) as exc:
        check(no_node, THREE_NODES, lambda: False, print)
    line = str(exc.value)
    assert "\n" not in line
    assert "--cpus-per-actor 3" in line and "no node can host" in line
    assert "3 nodes of 2 CPUs" in line and "try --cpus-per-actor 1" in line
    # Two 2-CPU actors on two 2-CPU nodes leave decode no CPU: the silent hang.
    two = [NodeShape(2, 0)] * 2
    with pytest.raises(InfeasibleError, match="leaves no CPU on any node.*try --cpus-per-actor 1"):
        check(actor_plan(None, 2, (2, 2), two), two, lambda: False, print)
    warned: list[str] = []
    check(no_node, THREE_NODES, lambda: True, warned.append)
    assert len(warned) == 1 and "no node can host" in warned[0] and "autoscaler" in warned[0]


# --- on a real cluster ----------------------------------------------------------------

IMAGES = 8
CLUSTER_ENV = {"RAY_health_check_period_ms": "1000"}  # a lost node is dead within ~5 s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from maskrcnn.checkpoint import save

    root = tmp_path_factory.mktemp("shapes")
    uris = write_local(root / "in", make_images(IMAGES, seed=5, odd=False))
    save(tiny_model(0), str(root / "tiny.safetensors"))
    return {
        "root": root,
        "input": str(root / "in"),
        "model": str(root / "tiny.safetensors"),
        "uris": uris,
    }


@pytest.fixture(scope="module")
def shapes_cluster():
    with LocalRayCluster(head_cpus=2, worker_cpus=[2, 2], env=CLUSTER_ENV) as c:
        yield c


def segment_argv(data, out, *flags) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.cli",
        "segment",
        data["input"],
        str(out),
        "--model",
        data["model"],
        "--batch-size",
        "2",
        "--rows-per-part",
        "2",
        *flags,
    ]


def run_cli(argv, env, timeout=420) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:  # its output so far is bytes, whatever text=
        out, err = ((data or b"").decode(errors="replace") for data in (exc.stdout, exc.stderr))
        pytest.fail(f"{argv[3]} still running after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_two_cpu_nodes(shapes_cluster, data, tmp_path):
    """Default flags and --actors 2 each finish with every input once; a 3-CPU actor,
    which no node hosts, fails before any row with the one-line message."""
    for name, flags in (("default", []), ("two", ["--actors", "2"])):
        out = tmp_path / name
        done = run_cli(
            segment_argv(data, out, "--address", shapes_cluster.address, *flags), shapes_cluster.env
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        table, _ = read_back(str(out))
        assert_exactly_once(table, data["uris"])

    out = tmp_path / "three"
    bad = run_cli(
        segment_argv(data, out, "--address", shapes_cluster.address, "--cpus-per-actor", "3"),
        shapes_cluster.env,
    )
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, bad.stderr[-3000:]
    assert "--cpus-per-actor 3" in errors[0] and "no node can host" in errors[0]
    assert "3 nodes of 2 CPUs" in errors[0] and "try --cpus-per-actor 1" in errors[0]
    assert not list(out.glob("run-*/part-*.parquet")), "no row before the check"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stall_ends_with_an_error_and_a_rerun_completes_once(shapes_cluster, data, tmp_path):
    """The only node that hosts a 3-CPU actor is lost after the first part: the run
    ends with the stall error, its parts stay, and a re-run with such a node back
    completes the output exactly once."""
    from maskrcnn.checkpoint import save

    # A slower model (inputs upscaled): the actor still has work when its node goes.
    slow = tiny_model(0)
    slow.cfg = slow.cfg.replace(min_size=512, max_size=800)
    save(slow, str(tmp_path / "slow.safetensors"))
    many = write_local(tmp_path / "in", make_images(12, seed=6, odd=False))
    big = shapes_cluster.add_node(3)
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "jobs.cli",
        "segment",
        str(tmp_path / "in"),
        str(out),
        "--model",
        str(tmp_path / "slow.safetensors"),
        "--batch-size",
        "1",
        "--rows-per-part",
        "1",
        "--actors",
        "1",
        "--cpus-per-actor",
        "3",
        "--stall-timeout",
        "20",
        "--address",
        shapes_cluster.address,
    ]
    env = {**shapes_cluster.env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(
            lambda: list(out.glob("run-*/part-*.parquet")),
            "the first part",
            # A slow start is no stall (a demand that fits a node only waits): on a
            # slow shared machine this test took over 7 minutes alone.
            timeout=420,
            gave_up=lambda: None if proc.poll() is None else proc.communicate()[1][-3000:],
        )
        shapes_cluster.kill_raylet(big)
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"no stall error within 240 s:\n{proc.communicate()[1][-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, stderr[-3000:]
    assert "stalled: no part for" in stderr and "--stall-timeout 20" in stderr, stderr[-3000:]
    assert "CPU: 3" in stderr, stderr[-3000:]
    committed = len(list(out.glob("run-*/part-*.parquet")))
    assert 0 < committed < len(many), committed

    shapes_cluster.add_node(3)
    again = run_cli(argv, shapes_cluster.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{committed} of {len(many)} images already committed" in again.stdout + again.stderr
    table, _ = read_back(str(out))
    assert_exactly_once(table, many)


# Its own Ray: starting a local instance when the recorded cluster is gone is the point.
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_dead_recorded_cluster_does_not_stop_segment(data, tmp_path):
    """`ray start` recorded a cluster that is gone: segment says so and runs locally."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()  # Ray's temp dir is RAY_TMPDIR/ray
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    try:
        out = tmp_path / "out"
        done = run_cli(segment_argv(data, out, "--actors", "1", "--cpus-per-actor", "1"), env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"the Ray cluster at {dead} that `ray start` recorded does not answer" in done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    table, _ = read_back(str(out))
    assert_exactly_once(table, data["uris"])


# Last in the module: the killed run's 5-CPU placement group can stay pending on this
# cluster for minutes after its driver is gone (seen under load), and the stall test's
# watchdog would take it for its own run's unplaceable demand.
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_whose_workers_no_node_can_host_says_so(shapes_cluster, tmp_path):
    """`maskrcnn train` asking for 5-CPU workers on 2-CPU nodes says what waits and why,
    every MASKRCNN_WAIT_INTERVAL_S, instead of waiting silently."""
    make_shapes_dataset(str(tmp_path / "shapes"), 4, size=64)
    log = tmp_path / "train.log"
    proc = maskrcnn_process(
        ["train", "--data", str(tmp_path / "shapes" / "train"), "--preset", "tiny",
         "--workers", "1", "--cpus-per-worker", "5", "--iters", "2",
         "--storage", str(tmp_path / "runs"), "--address", shapes_cluster.address],
        cwd=tmp_path, env_extra={**shapes_cluster.env, "MASKRCNN_WAIT_INTERVAL_S": "2"},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(
            lambda: "train: waiting for resources" in log.read_text(),
            "train to say it waits for resources",
            timeout=240,
            gave_up=lambda: None if proc.poll() is None else log.read_text()[-3000:],
        )
    finally:
        kill_group(proc)
    line = next(x for x in log.read_text().splitlines() if "waiting for resources" in x)
    assert "1 worker(s) of {5 CPU} each (no node can host one)" in line, line
    # The stall test before it may have left a 3-CPU node beside the three 2-CPU ones.
    assert "CPU: 5" in line and "the cluster has " in line and "3 nodes of 2 CPUs" in line, line
