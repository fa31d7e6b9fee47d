"""Node loss (issue 7, item 1): a worker node of a real multi-node Ray cluster is lost
mid-job, and the job still finishes with the promised output.

The cluster is `ray start` processes on this machine (tests/helpers/cluster_fixture.py,
token auth), one for the module: a 3-CPU head, to which each test adds the worker nodes
it needs and from which they are removed after it (so a test starts from the head
alone). The jobs are the CLI submitted with `ray job submit --working-dir`, reading and
writing S3 (the loopback moto server), so the driver lives on the head as it does on a
real cluster. Each node-loss test adds a fresh worker node of its own; once the job is
seen working on it, that node's raylet is SIGKILLed (the node, and every worker process
on it, is gone for good), then:

* segment: Ray restarts the lost model actor on the head once there is room for it and
  retries the batches it held; the output holds every input exactly once (pyarrow
  and DuckDB).
* train: Ray Train's FailureConfig tears the worker group down and starts a new one
  from the last registered checkpoint; both workers cannot fit on the head, so a
  replacement node joins (what an autoscaler does for a lost node). The resumed run
  redoes the iterations after the checkpoint with the same losses.

The module also checks the cluster fixture itself: token auth enforced, a killed raylet
loses its node for good, and a teardown that stops the cluster's processes and nothing
else.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request

import fsspec
import pytest
from conftest import REPO
from helpers import cluster_fixture
from helpers.cluster_fixture import LocalRayCluster
from helpers.segment_data import (
    assert_exactly_once,
    duckdb_counts,
    make_images,
    read_back,
    tiny_model,
    write_s3,
)
from helpers.train_logs import CLASS_NAMES, losses_by_iteration, registered_checkpoint
from helpers.wait import wait_until

from maskrcnn.checkpoint import load, model_id
from pipeline.formats.shapes import make_shapes_dataset
from pipeline.output.schema import committed_files

pytestmark = pytest.mark.slow

# Each node has 3 CPUs and a model actor or a train worker takes 2: one per node, so
# one of them must run on the worker node, and after the loss the head holds one only.
NODE_CPUS, CPUS_PER_ACTOR = 3, 2
# segment: images, 4 per batch, 2 per part.
IMAGES, PARTS = 32, 16
CLUSTER_ENV = {
    # Worker lines reach the job log as printed (Ray would otherwise fold similar ones).
    "RAY_DEDUP_LOGS": "0",
    # The GCS declares a node dead after 5 failed health checks: 5 s instead of 15 s.
    # A check fails on no answer within 10 s (unchanged), so a busy node is not lost.
    "RAY_health_check_period_ms": "1000",
    # Task states reach the state API from a buffer each worker flushes: every 0.2 s
    # instead of every second, so few are lost with a worker killed at the job's end.
    "RAY_task_events_report_interval_ms": "200",
}


@pytest.fixture(scope="module")
def head_cluster(s3_server):
    """The module's cluster: a head node alone (tests add workers). Teardown checks that
    it stopped every process of the cluster and nothing else (a bystander outlives it)."""
    bystander = subprocess.Popen(["sleep", "900"], start_new_session=True)
    try:
        env = {**s3_server["env"], **CLUSTER_ENV}
        with LocalRayCluster(head_cpus=NODE_CPUS, worker_cpus=[], env=env) as c:
            yield c
            ours = c.processes()
        assert ours and not any(p.alive() for p in ours), "teardown left cluster processes"
        assert c.processes() == []
        assert all(n.process.poll() is not None for n in [c.head, *c.workers])
        assert bystander.poll() is None, "a process the cluster did not start was stopped"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.fixture
def cluster(head_cluster):
    """The module's cluster; the worker nodes the test adds are removed after it."""
    added = len(head_cluster.workers)
    yield head_cluster
    for node in head_cluster.workers[added:]:
        head_cluster.remove_node(node)


def poll(condition, what: str, cluster: LocalRayCluster, job_id: str, timeout: float = 180.0):
    """``condition()``'s first truthy value (wait_until); fails when the job ends first.

    Once a second: each look is several requests to the dashboard, whose answers cost the
    cores the job runs on, and what is looked for (a batch, an iteration) takes longer.
    """

    def job_ended() -> str | None:
        status = cluster.job(job_id)["status"]
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            return None
        return f"job {status}:\n{cluster.job_logs(job_id)[-3000:]}"

    return wait_until(condition, what, timeout, interval=1.0, gave_up=job_ended)


def alive_actors_on(cluster: LocalRayCluster, node_id: str, name_part: str, job_id: str):
    """ALIVE actors of the job on ``node_id`` whose class or repr names ``name_part``."""
    info = cluster.job(job_id)
    return [
        a
        for a in cluster.actors()
        if a["job_id"] == info.get("job_id")
        and a["state"] == "ALIVE"
        and a["node_id"] == node_id
        and name_part in (a.get("repr_name") or "") + a["class_name"]
    ]


def train_lines(logs: str, pid: int) -> list[str]:
    """The job log's "train: " lines printed by worker process ``pid``, each once, in order.

    A process prints a line once, so a line seen twice (a log monitor that replays a file
    after a node restarts) is dropped.
    """
    prefix = re.compile(rf"^(?:\x1b\[\d+m)?\(\w+ pid={pid}(?:, ip=[^)]*)?\)(?:\x1b\[0m)? ")
    lines = [prefix.sub("", line) for line in logs.splitlines() if prefix.match(line)]
    return list(dict.fromkeys(line for line in lines if line.startswith("train: ")))


def actor_tasks(cluster: LocalRayCluster, actor_id: str) -> list[dict]:
    """State API rows of the batches (``submit`` calls) sent to a Ray Data actor."""
    reply = cluster.http(
        "/api/v0/tasks?limit=10000&detail=1&filter_keys=actor_id&filter_predicates=%3D"
        f"&filter_values={actor_id}"
    )
    return [t for t in reply["data"]["result"]["result"] if t["name"].endswith(".submit")]


def finished(cluster: LocalRayCluster, job_id: str, timeout: float) -> str:
    """The job's log, once it ended; fails unless it SUCCEEDED (the CLI exited 0)."""
    info = cluster.wait_job(job_id, timeout)
    logs = cluster.job_logs(job_id)
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {info.get('message')}\n{logs[-4000:]}"
    return logs


def test_token_auth_is_enforced(cluster):
    anonymous = urllib.request.Request(cluster.dashboard_url + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10)
    assert refused.value.code == 401  # no token
    wrong = urllib.request.Request(anonymous.full_url, headers={"Authorization": "Bearer x"})
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(wrong, timeout=10)
    assert forbidden.value.code == 403  # another token
    assert isinstance(cluster.http("/api/jobs/"), list)  # with the token: answered
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "0" * 64  # a client with the wrong token is refused too
    wrong = subprocess.run(
        [cluster_fixture.RAY, "job", "list", "--address", cluster.dashboard_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0
    assert cluster.ray_cli("job", "list", "--address", cluster.dashboard_url).returncode == 0


def test_kill_raylet_loses_the_node_for_good(cluster):
    """What the node-loss tests rely on: kill_raylet() takes one node away (its raylet
    and everything under it) and the GCS reports it dead; the rest stay alive."""
    other = cluster.add_node(1)
    victim = cluster.add_node(1)
    victim_procs = victim.processes()
    assert len(victim_procs) >= 3  # ray start, raylet, agents
    cluster.kill_raylet(victim)
    states = {n["node_id"]: n["state"] for n in cluster.nodes()}
    assert states[victim.node_id] == "DEAD"
    assert states[cluster.head.node_id] == states[other.node_id] == "ALIVE"
    # The victim's `ray start --block` stops the rest of its node.
    wait_until(lambda: not any(p.alive() for p in victim_procs), "the lost node gone entirely", 30)


@pytest.mark.timeout(420)
def test_segment_survives_losing_a_worker_node_exactly_once(
    cluster, s3_server, s3_bucket, tmp_path
):
    from maskrcnn.checkpoint import save

    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    uris = write_s3(fs, f"{s3_bucket}/in", make_images(IMAGES, seed=23, odd=False))
    model = f"s3://{s3_bucket}/tiny.safetensors"
    # Inputs upscaled to 384 px: the model actors become the slow stage, so they are
    # at work (and parts stream out) for most of the run rather than done early.
    tiny = tiny_model(0)
    tiny.cfg = tiny.cfg.replace(min_size=384, max_size=640)
    save(tiny, str(tmp_path / "tiny.safetensors"))
    fs.put(str(tmp_path / "tiny.safetensors"), model[len("s3://") :])
    out = f"s3://{s3_bucket}/out"

    def parts() -> list[str]:
        fs.invalidate_cache()
        return fs.glob(f"{s3_bucket}/out/run-*/part-*.parquet")

    worker = cluster.add_node(NODE_CPUS)  # this test's own, to lose
    job = cluster.submit(
        ["maskrcnn", "segment", f"s3://{s3_bucket}/in", out, "--model", model]
        + ["--actors", "2", "--cpus-per-actor", str(CPUS_PER_ACTOR), "--batch-size", "4"]
        + ["--rows-per-part", "2", "--score-threshold", "0", "--max-detections", "10"],
        working_dir=REPO,
    )

    # The two model actors, one per node (a node hosts one 2-CPU actor beside the CPU
    # stages), then in progress on the worker node: its model actor has done a batch
    # and holds another (task states reach the state API within about a second; a
    # batch takes longer, and Ray Data queues more than one per actor).
    def model_actors_on_both_nodes():
        on_head = alive_actors_on(cluster, cluster.head.node_id, "Segmenter", job)
        on_worker = alive_actors_on(cluster, worker.node_id, "Segmenter", job)
        return on_worker if on_head and on_worker else None

    victims = poll(model_actors_on_both_nodes, "a model actor on each node", cluster, job)

    def done_and_busy() -> int:
        states = [t["state"] for t in actor_tasks(cluster, victims[0]["actor_id"])]
        done = states.count("FINISHED")
        return done if done and len(states) > done + states.count("FAILED") else 0

    done_at_kill = poll(done_and_busy, "the model actor on the worker node at work", cluster, job)
    committed_at_kill = len(parts())
    killed_at = time.monotonic()
    cluster.kill_raylet(worker)
    dead_after = time.monotonic() - killed_at
    logs = finished(cluster, job, timeout=300)
    recovered_after = time.monotonic() - killed_at

    def lost_and_redone() -> tuple[list[dict], list[dict], set[str]]:
        tasks = actor_tasks(cluster, victims[0]["actor_id"])
        lost = [t for t in tasks if t["state"] == "FAILED" and t["node_id"] == worker.node_id]
        redone = {t["task_id"] for t in tasks if t["state"] == "FINISHED"}
        return tasks, lost, redone & {t["task_id"] for t in lost}

    def victim_restarted_on_the_head() -> bool:
        [actor] = [a for a in cluster.actors() if a["actor_id"] == victims[0]["actor_id"]]
        return int(actor["num_restarts"]) >= 1 and actor["node_id"] == cluster.head.node_id

    # Task states reach the state API a moment after they change (about a second, more
    # on a busy machine): the last attempts may show only after the job has ended.
    seen: list = []

    def lost_and_redone_seen() -> bool:
        seen[:] = lost_and_redone()
        return bool(seen[1] and seen[2])

    # At most 60 s: a retry's last event may never come (below); what was seen is checked.
    deadline = time.monotonic() + 60
    wait_until(
        lambda: lost_and_redone_seen() or time.monotonic() > deadline, "task states", 90, 0.5
    )
    victim_tasks, lost, redone = seen

    # The node was lost with work left, its model actor busy: the batches it held
    # failed with it, and the same actor, restarted on the head (Ray Data's actors
    # restart without limit, and their calls are retried), redid them there.
    assert committed_at_kill < PARTS
    assert lost, victim_tasks
    assert victim_restarted_on_the_head(), victims[0]
    # A retry that finished shows as FINISHED on the head, unless it was the pool's last
    # call: Ray Data kills the actor at the end, and the state its worker had buffered
    # for the state API (flushed every CLUSTER_ENV interval) goes with it. The rows
    # below prove every batch was done; this proves where the retries we saw ran.
    assert all(
        t["node_id"] == cluster.head.node_id
        for t in victim_tasks
        if t["state"] == "FINISHED" and t["task_id"] in redone
    )
    assert f"{IMAGES} images ok, 0 with errors" in logs, logs[-3000:]

    table, manifest = read_back(out, storage)
    assert_exactly_once(table, uris)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("model").to_pylist()) == {manifest["model"]}
    counts = manifest["counts"]
    assert (counts["images"], counts["ok"], counts["error"]) == (IMAGES, IMAGES, 0)
    files = committed_files(out, storage)
    rows, distinct, errors, instances = duckdb_counts(files, storage)
    assert (rows, distinct, errors) == (IMAGES, IMAGES, 0)
    assert instances == manifest["counts"]["instances"]
    print(
        f"segment node loss: killed after {done_at_kill} batch(es) on the worker node and "
        f"{committed_at_kill} of {PARTS} parts; {len(redone)} batch(es) seen redone on the head; "
        f"node dead in the GCS after {dead_after:.1f}s; job done {recovered_after:.1f}s after"
    )


@pytest.mark.timeout(420)
def test_train_survives_losing_a_worker_node_from_its_checkpoint(
    cluster, s3_server, s3_bucket, tmp_path
):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    make_shapes_dataset(f"s3://{s3_bucket}/shapes", 16, 64, seed=5, options=storage)
    run = f"{s3_bucket}/runs/lost-node"
    iterations, every = 8, 2

    def read_text(name: str) -> str | None:
        fs.invalidate_cache()
        try:
            return fs.cat_file(f"{run}/{name}").decode()
        except FileNotFoundError:
            return None

    worker = cluster.add_node(NODE_CPUS)  # this test's own, to lose
    job = cluster.submit(
        ["maskrcnn", "train", "--data", f"s3://{s3_bucket}/shapes/train", "--preset", "tiny"]
        + ["--min-size", "64", "--max-size", "64", "--workers", "2", "--lr", "0.01"]
        + ["--cpus-per-worker", str(CPUS_PER_ACTOR), "--batch-size", "2", "--log-every", "1"]
        + ["--iters", str(iterations), "--checkpoint-every", str(every)]
        + ["--keep-checkpoints", "2", "--max-failures", "3"]
        + ["--storage", f"s3://{s3_bucket}/runs", "--name", "lost-node"],
        working_dir=REPO,
    )

    # Mid-run: a checkpoint registered, the first attempt one iteration past it (so the
    # resumed run redoes an iteration it logged) and one of its workers on the worker node.
    def past_a_checkpoint_with_a_worker_on_the_worker_node():
        checkpoint = registered_checkpoint(read_text)
        if not checkpoint:
            return None
        ranks = [json.loads(read_text(f"workers/rank-{r}.json") or "{}") for r in (0, 1)]
        if not all(s.get("start_iteration") == 0 for s in ranks):
            return None
        logged = losses_by_iteration("\n".join(train_lines(cluster.job_logs(job), ranks[0]["pid"])))
        if checkpoint + 1 not in logged:
            return None
        if not alive_actors_on(cluster, worker.node_id, "RayTrainWorker", job):
            return None
        return checkpoint, ranks

    checkpoint_at_kill, first = poll(
        past_a_checkpoint_with_a_worker_on_the_worker_node,
        "an iteration past a registered checkpoint, a worker on the worker node",
        cluster,
        job,
    )
    killed_at = time.monotonic()
    cluster.kill_raylet(worker)
    dead_after = time.monotonic() - killed_at
    # Two 2-CPU workers do not fit the 3-CPU head: a replacement node joins, as an
    # autoscaler would add one; Ray Train places the new worker group there.
    replacement = cluster.add_node(NODE_CPUS)
    logs = finished(cluster, job, timeout=300)
    recovered_after = time.monotonic() - killed_at
    on_replacement = [
        a
        for a in cluster.actors("RayTrainWorker")
        if a["node_id"] == replacement.node_id and a["job_id"] == cluster.job(job)["job_id"]
    ]

    # Resumed from a checkpoint of the first attempt (the one seen, or one registered
    # between seeing it and the kill), never from 0, and trained the rest exactly once.
    restarted = [json.loads(read_text(f"workers/rank-{r}.json")) for r in (0, 1)]
    start = restarted[0]["start_iteration"]
    assert checkpoint_at_kill <= start < iterations and start % every == 0
    resumed_lines = train_lines(logs, restarted[0]["pid"])
    marker = f"train: resumed from the checkpoint of iteration {start}"
    assert resumed_lines[0] == marker, logs[-3000:]
    resumed = losses_by_iteration("\n".join(resumed_lines))
    assert list(resumed) == list(range(start + 1, iterations + 1)), logs[-3000:]
    # Exactly resumed: iterations the first attempt also logged have the same losses
    # (it logged checkpoint + 1 before the kill; only a checkpoint registered between
    # the poll and the kill can leave nothing to compare).
    before = losses_by_iteration("\n".join(train_lines(logs, first[0]["pid"])))
    redone = sorted(set(before) & set(resumed))
    assert redone or start > checkpoint_at_kill
    assert [before[i] for i in redone] == [resumed[i] for i in redone]
    assert f"finished at iteration {iterations}" in logs
    assert "model.safetensors" in logs  # the log names the model it wrote
    assert [s["start_iteration"] for s in restarted] == [start, start]
    assert {s["pid"] for s in restarted}.isdisjoint(s["pid"] for s in first)
    assert on_replacement, "the new worker group used the replacement node"

    # The last two checkpoints are kept on S3, each complete; the export is the last one's.
    fs.invalidate_cache()
    kept = sorted(p.rsplit("/", 1)[1] for p in fs.ls(run) if "/checkpoint_0" in p)
    assert kept == [f"checkpoint_{i:08d}" for i in (iterations - every, iterations)]
    for name in kept:
        files = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{run}/{name}"))
        assert files == ["model.safetensors", "state.json", "train_state.pt"]
    state = json.loads(read_text(f"checkpoint_{iterations:08d}/state.json"))
    assert state["iteration"] == iterations
    fs.get(f"{run}/model.safetensors", str(tmp_path / "model.safetensors"))
    model = load(str(tmp_path / "model.safetensors"))
    assert model.cfg.class_names == CLASS_NAMES and model.cfg.min_size == 64
    assert model_id(model) == state["model_id"]
    print(
        f"train node loss: killed after checkpoint {checkpoint_at_kill}, resumed from {start}, "
        f"iterations {redone} redone with the same losses; "
        f"node dead in the GCS after {dead_after:.1f}s; job done {recovered_after:.1f}s after"
    )
