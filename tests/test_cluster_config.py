"""cluster.yaml passes Ray's own cluster-config checks (the ones `ray up` runs before it
talks to AWS) and says what matters; deploy/rayjob.yaml is a KubeRay RayJob that runs
`maskrcnn segment` from s3:// to s3:// on GPU workers."""

from __future__ import annotations

import copy
import re
import shlex
import sys

import jsonschema
import pytest
import ray
import yaml
from conftest import REPO
from ray.autoscaler._private.util import prepare_config, validate_config

IMAGE = "rayproject/ray:2.60.0-py311-gpu"


def _load(name: str) -> dict:
    with open(REPO / name) as f:
        return yaml.safe_load(f)


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before the provider's bootstrap (which calls AWS):
    merge the provider defaults, check docker, fill per-type bounds, validate the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load("cluster.yaml")


def test_cluster_yaml_passes_rays_validation(cluster):
    prepared = ray_up_checks(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_node_types_resources_and_market(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0, "the head takes no tasks"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert set(gpu_types) == {"gpu_segment", "gpu_train"}
    segment, train = gpu_types["gpu_segment"], gpu_types["gpu_train"]
    assert segment["resources"]["GPU"] == 1
    assert segment["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert train["resources"]["GPU"] >= 2, "training wants several GPUs in one node"
    assert "InstanceMarketOptions" not in train["node_config"]
    for t in gpu_types.values():
        assert t["resources"]["CPU"] >= 4 * t["resources"]["GPU"], "CPUs to feed each GPU"
        assert t["node_config"]["InstanceType"].startswith("g5.")


def test_autoscaling_bounds(cluster):
    prepared = ray_up_checks(cluster)
    total = prepared["max_workers"]
    workers = {
        n: t for n, t in prepared["available_node_types"].items() if n != cluster["head_node_type"]
    }
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes scale from zero"
        assert 1 <= t["max_workers"] <= total, name
    assert sum(t["max_workers"] for t in workers.values()) >= total
    assert prepared["idle_timeout_minutes"] <= 15


def test_image_matches_installed_ray_and_python(cluster):
    assert cluster["docker"]["image"] == IMAGE
    assert "head_image" not in cluster["docker"] and "worker_image" not in cluster["docker"]
    version, py = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d+)-gpu", IMAGE).groups()
    assert version == ray.__version__ == _pins()["ray"]
    assert py == f"{sys.version_info.major}{sys.version_info.minor}", "the tested Python"


def test_setup_installs_the_repo_through_constraints(cluster):
    mounts = cluster["file_mounts"]
    repo_remote = next(remote for remote, local in mounts.items() if local == ".")
    commands = cluster["setup_commands"]
    installs = [shlex.split(c) for c in commands if "pip install" in c]
    assert installs, "setup installs the project"
    for argv in installs:
        assert "-c" in argv, f"every install uses constraints.txt: {argv}"
        assert argv[argv.index("-c") + 1] == f"{repo_remote}/constraints.txt"
        assert repo_remote in argv[argv.index("-c") + 2 :], "installs the mounted repo"
    assert (REPO / "constraints.txt").is_file() and (REPO / "pyproject.toml").is_file()


def test_nodes_start_with_token_auth(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "~/.ray" in cluster["file_mounts"].values(), "the token file reaches every node"


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


BREAKAGES = {
    "misspelled top-level key": (
        lambda c: _rename(c, "max_workers", "max_worker"),
        jsonschema.ValidationError,
        "'max_worker' was unexpected",
    ),
    "misspelled node-type key": (
        lambda c: _rename(c["available_node_types"]["gpu_segment"], "min_workers", "min_worker"),
        jsonschema.ValidationError,
        "'min_worker' was unexpected",
    ),
    "misspelled docker key": (
        lambda c: _rename(c["docker"], "image", "imagee"),
        AssertionError,
        "container & image",
    ),
    "GPU count as a string": (
        lambda c: c["available_node_types"]["gpu_train"]["resources"].update(GPU="4"),
        jsonschema.ValidationError,
        "is not of type 'integer'",
    ),
    "unknown head type": (
        lambda c: c.update(head_node_type="head_node"),
        ValueError,
        "must be one of `available_node_types`",
    ),
    "min_workers above max_workers": (
        lambda c: c["available_node_types"]["gpu_segment"].update(min_workers=c["max_workers"] + 1),
        ValueError,
        "smaller than the sum of `min_workers`",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_copies_fail_validation(cluster, breakage):
    breaker, error, match = BREAKAGES[breakage]
    broken = copy.deepcopy(cluster)
    breaker(broken)
    with pytest.raises(error, match=re.escape(match)):
        ray_up_checks(broken)


# --- deploy/rayjob.yaml -------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("deploy/rayjob.yaml")


def test_rayjob_runs_segment_from_s3_to_s3(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["maskrcnn", "segment"]
    positional = [a for a in argv[2:] if not a.startswith("-")]
    assert positional[0].startswith("s3://") and positional[1].startswith("s3://")
    assert positional[0] != positional[1]
    assert "--model" in argv and argv[argv.index("--model") + 1].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_cli_flags_exist(rayjob):
    """Every flag the entrypoint passes is one `maskrcnn segment` accepts."""
    from jobs.cli import build_parser

    argv = shlex.split(rayjob["spec"]["entrypoint"])[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "segment"


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_gpu_workers_same_image_and_auth(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    head = _containers(cluster_spec["headGroupSpec"])
    groups = cluster_spec["workerGroupSpecs"]
    assert groups, "at least one worker group"
    gpu_groups = [
        g
        for g in groups
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in _containers(g))
    ]
    assert gpu_groups, "a worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in _containers(g):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
            assert c["image"] == IMAGE
    assert all(c["image"] == IMAGE for c in head)
    assert cluster_spec.get("authOptions", {}).get("mode") == "token"


def test_rayjob_installs_the_project(rayjob):
    """Ray's own RuntimeEnv parses the runtime env; the install is pinned by constraints."""
    from ray.runtime_env import RuntimeEnv

    runtime_env = RuntimeEnv(**yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]))
    packages = runtime_env.pip_config()["packages"]
    assert any(p.startswith("maskrcnn-ray") for p in packages), packages
    constraints = [p for p in packages if p.startswith("-c ")]
    assert len(constraints) == 1 and constraints[0].endswith("/constraints.txt"), packages
    with pytest.raises(ValueError):
        RuntimeEnv(pip={"packages": packages, "constraint": "typo"})
