"""Shared fixtures: a real local Ray instance and a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session.

    Yields a dict with ``endpoint_url`` and ``storage_options`` (for fsspec /
    s3fs) and sets the standard AWS environment variables, so that processes
    started afterwards (Ray workers, subprocesses) reach the same endpoint.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {
            "endpoint_url": endpoint,
            "env": env,
            "storage_options": {
                "key": env["AWS_ACCESS_KEY_ID"],
                "secret": env["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            },
        }
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket per test; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    name = "".join(c for c in name if c.isalnum() or c == "-")[:60]
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance shared by the unit-level tests of a session.

    Tests that need their own cluster (multi-node, `ray start`) start and stop
    it themselves; they must not use this fixture in the same process.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


def pytest_ignore_collect(collection_path, config):
    """tests/gpu is collected only when the marker is asked for (`make test-gpu`: -m gpu):
    `make test` and CI never collect it, so a machine without a GPU neither runs nor skips it."""
    if collection_path == Path(__file__).parent / "gpu":
        return True if "gpu" not in (config.getoption("markexpr") or "") else None
    return None
