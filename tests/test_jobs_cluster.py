"""`maskrcnn train` then `maskrcnn segment`, submitted with `ray job submit --working-dir .`
to a real two-node Ray cluster of `ray start` processes with token auth, from S3 to S3
(the loopback moto server); and the cluster fixture itself: token auth enforced, node
loss through a killed raylet, a teardown that stops its own processes and nothing else."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers import cluster_fixture
from helpers.cluster_fixture import LocalRayCluster

from pipeline.formats.shapes import make_shapes_dataset
from pipeline.output.schema import SCHEMA, committed_files, read_manifest

pytestmark = pytest.mark.slow

TRAIN_IMAGES, SEGMENT_IMAGES, SIZE = 16, 32, 64


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head and one worker node, 3 CPUs each. Teardown checks that it stopped every
    process of the cluster and nothing else (a bystander process outlives it)."""
    bystander = subprocess.Popen(["sleep", "900"], start_new_session=True)
    try:
        # 2 CPUs per model actor: one segment actor fits a node, so two actors must land
        # on two nodes; the third CPU decodes and encodes beside it.
        with LocalRayCluster(head_cpus=3, worker_cpus=[3], env=s3_server["env"]) as c:
            yield c
            ours = c.processes()
        assert ours and not any(p.alive() for p in ours), "teardown left cluster processes"
        assert c.processes() == []
        assert all(n.process.poll() is not None for n in [c.head, *c.workers])
        assert bystander.poll() is None, "a process the cluster did not start was stopped"
    finally:
        bystander.kill()
        bystander.wait()


def _finished(cluster: LocalRayCluster, job_id: str, timeout: float) -> dict:
    info = cluster.wait_job(job_id, timeout)
    logs = cluster.job_logs(job_id)
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {info.get('message')}\n{logs[-3000:]}"
    return {**info, "logs": logs}


def test_train_then_segment_jobs_on_two_nodes(cluster, s3_server, s3_bucket):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    make_shapes_dataset(f"s3://{s3_bucket}/shapes", TRAIN_IMAGES, SIZE, seed=0, options=storage)
    make_shapes_dataset(f"s3://{s3_bucket}/fresh", SEGMENT_IMAGES, SIZE, seed=1, options=storage)
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert nodes == {cluster.head.node_id, cluster.workers[0].node_id}

    started = time.monotonic()
    train = cluster.submit(
        ["maskrcnn", "train", "--data", f"s3://{s3_bucket}/shapes/train", "--preset", "tiny"]
        + ["--workers", "2", "--batch-size", "2", "--iters", "4", "--checkpoint-every", "2"]
        + ["--storage", f"s3://{s3_bucket}/runs", "--name", "cluster", "--max-failures", "0"],
        working_dir=REPO,
    )
    train_info = _finished(cluster, train, timeout=300)
    train_seconds = time.monotonic() - started
    model = f"s3://{s3_bucket}/runs/cluster/model.safetensors"
    assert fs.exists(model), f"no {model}; train log:\n{train_info['logs'][-2000:]}"
    assert "model.safetensors" in train_info["logs"]

    started = time.monotonic()
    inputs = sorted(f"s3://{p}" for p in fs.find(f"{s3_bucket}/fresh/train/images"))
    assert len(inputs) == SEGMENT_IMAGES
    out = f"s3://{s3_bucket}/segments"
    segment = cluster.submit(
        ["maskrcnn", "segment", f"s3://{s3_bucket}/fresh/train/images/", out, "--model", model]
        + ["--actors", "2", "--cpus-per-actor", "2", "--batch-size", "4", "--rows-per-part", "8"],
        working_dir=REPO,
    )
    segment_info = _finished(cluster, segment, timeout=300)
    segment_seconds = time.monotonic() - started

    # Every input exactly once, in the committed files only, with the model's id.
    manifest = read_manifest(out, storage)
    tables = []
    for uri in committed_files(out, storage):
        with fs.open(uri, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables)
    assert table.schema.equals(SCHEMA)
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == inputs, "every input exactly once"
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert manifest["counts"]["images"] == manifest["counts"]["ok"] == SEGMENT_IMAGES
    assert set(table.column("model").to_pylist()) == {manifest["model"]}

    # The segment job's model actors ran on both nodes.
    segment_actors = [
        a
        for a in cluster.actors()
        if a["job_id"] == segment_info["job_id"]
        and "Segmenter" in (a.get("repr_name") or a.get("name") or a["class_name"])
    ]
    assert len(segment_actors) >= 2, [(a["class_name"], a.get("repr_name")) for a in segment_actors]
    assert {a["node_id"] for a in segment_actors} == nodes, "model actors on more than one node"
    print(f"cluster jobs: train {train_seconds:.0f}s, segment {segment_seconds:.0f}s")


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
    """What issue 7's node-loss tests rely on: kill_raylet() takes one node away (its
    raylet and everything under it) and the GCS reports it dead; the rest stay alive."""
    victim = cluster.add_node(1)
    victim_procs = victim.processes()
    assert len(victim_procs) >= 3  # ray start, raylet, agents
    cluster.kill_raylet(victim)
    states = {n["node_id"]: n["state"] for n in cluster.nodes()}
    assert states[victim.node_id] == "DEAD"
    assert states[cluster.head.node_id] == states[cluster.workers[0].node_id] == "ALIVE"
    deadline = time.monotonic() + 30
    while any(p.alive() for p in victim_procs) and time.monotonic() < deadline:
        time.sleep(0.2)  # the victim's `ray start --block` stops the rest of its node
    assert not any(p.alive() for p in victim_procs), "the lost node is gone entirely"
