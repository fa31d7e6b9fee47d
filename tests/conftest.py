"""Shared fixtures: a real local Ray instance and a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two xdist workers' Ray processes share 2 cores: torch's OpenMP threads would spin
# while waiting for work, taking the cores the other processes need. Every process the
# tests start inherits this (it must be set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Fixtures shared by the modules of a test folder, which has no conftest.py of its own: a
# second conftest module outside a package would take `conftest`'s name from this one.
pytest_plugins = ["helpers.stage_fixtures"]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session, in a process of its own: some
    of delta-rs's calls hold the GIL while they wait on storage, so a server in the test's
    own process would never answer them.

    Yields a dict with ``endpoint_url`` and ``storage_options`` (for fsspec /
    s3fs) and sets the standard AWS environment variables, so that processes
    started afterwards (Ray workers, subprocesses) reach the same endpoint.
    """
    import subprocess
    import urllib.request

    from helpers.wait import wait_until

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return True
        except OSError:
            return False

    gave_up = lambda: f"exit code {server.poll()}" if server.poll() is not None else None  # noqa: E731
    wait_until(answers, "the moto S3 server to answer", 60, 0.1, gave_up)
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
        server.terminate()
        server.wait(timeout=30)
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
    """One embedded Ray instance shared by the tests of a session that run on Ray: the
    in-process ones, and CLI processes that join it (``ray_address``).

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


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The shared instance's address, for a `maskrcnn` process to join (--address)."""
    return ray_local.get_runtime_context().gcs_address


# Fixtures that start or join Ray: the shared instance, and the `ray start` clusters.
LOCAL_RAY_FIXTURES = {"ray_local", "ray_address"}
CLUSTER_FIXTURES = {"head_cluster", "shapes_cluster"}

# The modules with tests that run Ray, by the xdist group that runs them. A group is one
# unit of work: one worker runs its tests one after the other, so at most two Rays run
# at once (one per core) and the modules without Ray fill in around them.
RAY_MODULES = {
    "tests/fault/test_node_loss.py": "ray start clusters",
    "tests/test_cluster_shapes.py": "ray start clusters",
    # Its two CLI runs (about 3 minutes, each with its own embedded Ray) even out the two
    # groups: in the `ray` group it made that group the suite's critical path (about 15
    # of its 16 minutes in a clean run). A group runs one test at a time, so it never
    # runs beside this group's clusters.
    "tests/test_train.py": "ray start clusters",
    "tests/fault/test_bad_data_at_scale.py": "ray",
    "tests/fault/test_concurrent_runs.py": "ray",
    "tests/fault/test_storage_faults.py": "ray",
    "tests/test_demo.py": "ray",
    "tests/test_first_run.py": "ray",
    "tests/segment/inputs/test_inventory.py": "ray",
    "tests/segment/inputs/test_prefix.py": "ray",
    "tests/test_install.py": "ray",
    "tests/segment/test_driver.py": "ray",
    "tests/segment/test_monitor.py": "ray",
    "tests/segment/test_shards.py": "ray",
}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's own scheduling by scope, with RAY_MODULES' groups as scopes (its
    ``xdist_group`` marker does not group under this pytest: it rewrites a node id that
    pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return RAY_MODULES.get(_module(nodeid), nodeid)

    return RayGroupScheduling(config, log)


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True)
def _ray_only_in_a_ray_group(request):
    """A test outside the Ray groups that starts Ray in this process fails: that Ray would
    run beside the Ray groups' own."""
    before = _ray_is_up()
    yield
    if request.node.get_closest_marker("ray") is None and not before and _ray_is_up():
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray: mark it `ray` or use the ray_local fixture")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks ``ray`` every test that runs Ray (by marker, or through a Ray fixture); each
    must be in a module of RAY_MODULES. In a module, its tests on `ray start` clusters
    run first and those on the shared instance last, so that the shared instance starts
    after the tests whose process runs a Ray of its own."""

    def order(item) -> int:
        fixtures = set(getattr(item, "fixturenames", ()))
        if not item.get_closest_marker("ray"):
            return 3
        if fixtures & CLUSTER_FIXTURES:
            return 0
        return 2 if fixtures & LOCAL_RAY_FIXTURES else 1

    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("ray") or fixtures & (LOCAL_RAY_FIXTURES | CLUSTER_FIXTURES):
            item.add_marker(pytest.mark.ray)
            if _module(item.nodeid) not in RAY_MODULES:
                raise pytest.UsageError(
                    f"{item.nodeid} runs Ray: add its module to RAY_MODULES in tests/conftest.py"
                )
    items.sort(key=order)  # stable: collection order within


def pytest_ignore_collect(collection_path, config):
    """tests/gpu is collected only when the marker is asked for (`make test-gpu`: -m gpu):
    `make test` and CI never collect it, so a machine without a GPU neither runs nor skips it."""
    if collection_path == Path(__file__).parent / "gpu":
        return True if "gpu" not in (config.getoption("markexpr") or "") else None
    return None
