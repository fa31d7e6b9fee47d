"""Which Ray cluster a job runs on, and what that cluster looks like.

:func:`init_ray` is the one place every job starts Ray: ``--address``, else
``RAY_ADDRESS`` (``ray job submit`` sets it), else the cluster that the last
``ray start`` on this machine recorded (``ray_current_cluster`` under Ray's temp
dir) when it still answers, else an embedded instance. A dead record (a cluster
killed uncleanly) is reported in one line instead of Ray's minutes of retries.

:func:`node_shapes` and :func:`pending_demands` read the cluster for the
resource decisions and the watchdog of the segment job and for train's
placement messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONNECT_TIMEOUT_S = 2.0
WAIT_INTERVAL_ENV = "MASKRCNN_WAIT_INTERVAL_S"  # seconds between "waiting for resources" lines


def wait_interval() -> float:
    """How often a job that waits on resources says so: MASKRCNN_WAIT_INTERVAL_S, else 60 s."""
    text = os.environ.get(WAIT_INTERVAL_ENV, "").strip()
    try:
        value = float(text) if text else 60.0
    except ValueError:
        raise ValueError(f"{WAIT_INTERVAL_ENV}={text!r}: not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{WAIT_INTERVAL_ENV}={text!r}: must be more than 0 seconds")
    return value


def recorded_address() -> str | None:
    """The GCS address the last ``ray start`` recorded on this machine, None when none."""
    from ray._common.utils import get_ray_address_file  # lazy: loads ray (0.3 s), as in init_ray

    try:
        with open(get_ray_address_file(None)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def answers(address: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# --- what Ray prints -------------------------------------------------------------------
# Ray Data's console notices that a user of these jobs cannot act on: the INFO records of
# these loggers ("Starting execution of Dataset ...", its plan, "execution finished";
# "A new progress UI is available ...", "Progress will be logged because ..."). They stay
# in Ray Data's log file; warnings and errors, and the progress lines, stay on the console.
CONSOLE_QUIET = ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress")
CONSOLE_KEPT = ("ray.data._internal.progress.logging_progress",)
DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"  # Ray Data's logging config file
# Lines of other processes that Ray forwards to the driver, dropped by the driver (Ray's
# RAY_DEDUP_LOGS_SKIP_REGEX): a core worker's C++ error-level notice, printed for every
# actor Ray Data starts with its arguments in the object store (ray-project/ray#53727);
# only Ray's C++ log level could silence it at its source, and that would hide every
# error of Ray's core too.
DRIVER_SKIP_REGEX = r"has constructor arguments in the object store and max_restarts > 0"
SKIP_REGEX_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
SETUP_HOOK = "pipeline.cluster.quiet_ray_data"


def _under(name: str, loggers: tuple[str, ...]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in loggers)


class RayDataConsoleFilter(logging.Filter):
    """The filter of Ray Data's console handler: drops CONSOLE_QUIET's INFO records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or _under(record.name, CONSOLE_KEPT):
            return True
        return not _under(record.name, CONSOLE_QUIET)


def ray_data_logging_config() -> dict[str, Any]:
    """Ray Data's default logging config (ray.data._internal.logging.DEFAULT_CONFIG, Ray
    2.60) with :class:`RayDataConsoleFilter` on its console handler."""
    data_logging = "ray.data._internal.logging"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
        },
        "filters": {
            "console_filter": {"()": f"{data_logging}.HiddenRecordFilter"},
            "quiet_filter": {"()": f"{__name__}.RayDataConsoleFilter"},
        },
        "handlers": {
            "file": {
                "class": f"{data_logging}.SessionFileHandler",
                "formatter": "ray",
                "filename": "ray-data.log",
            },
            "console": {
                "class": "ray._private.log.PlainRayHandler",
                "formatter": "ray",
                "level": "INFO",
                "filters": ["console_filter", "quiet_filter"],
            },
        },
        "loggers": {
            "ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}
        },
    }


def quiet_ray_data() -> None:
    """Ray Data in this process (and in the processes it starts) logs with
    :func:`ray_data_logging_config`, unless the user chose a config: the file is written
    to the temporary folder, named by its content. Ray's worker setup hook of the jobs
    that join a cluster; the driver of an embedded instance, whose workers inherit it."""
    if os.environ.get(DATA_LOGGING_ENV):
        return
    text = json.dumps(ray_data_logging_config(), indent=1)  # JSON is YAML
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"maskrcnn-ray-data-logging-{digest}.yaml")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    os.environ[DATA_LOGGING_ENV] = path


@dataclass
class LocalRay:
    """How :func:`start_local_ray` starts an embedded instance; the jobs' flags set it."""

    dashboard: bool = False  # --dashboard


LOCAL_RAY = LocalRay()


def progress_env(terminal: bool) -> dict[str, str]:
    """Environment of the job's workers that picks Ray Data's progress display.

    A pipeline runs in a worker (segment's executor actor). On a terminal: tqdm bars that
    the worker sends to the driver, which draws them in place (Ray's distributed tqdm,
    RAY_TQDM=1). Elsewhere (a pipe, a file, `ray job logs`): Ray Data's plain progress
    lines every 10 s instead of bars redrawn with escape codes (RAY_TQDM=0).
    """
    return {"RAY_TQDM": "1" if terminal else "0"}


def job_runtime_env(local: bool) -> dict[str, Any]:
    """The runtime_env of the job's ray.init, after this process is set up.

    An embedded instance's workers inherit this process's environment: :func:`progress_env`
    for this driver's stderr and :func:`quiet_ray_data` go there, and the runtime_env is
    empty (one that names variables or a setup hook costs every worker start of the run
    about half a second on a 2-core machine). Joining a cluster, they go in the runtime_env
    (the hook sets Ray Data up on each node). What the user set (their environment, or the
    job's runtime_env under `ray job submit`) wins.
    """
    submitted = _submitted_runtime_env()
    env = {
        k: v
        for k, v in progress_env(_stderr_is_terminal()).items()
        if k not in os.environ and k not in submitted.get("env_vars", {})
    }
    if local:
        os.environ.update(env)
        quiet_ray_data()
        return {}
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if "worker_process_setup_hook" not in submitted:
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    return runtime_env


def _submitted_runtime_env() -> dict[str, Any]:
    """The runtime_env `ray job submit` gave this job ({} when none)."""
    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return dict(json.loads(text).get("runtime_env") or {}) if text else {}
    except (ValueError, AttributeError, TypeError):
        return {}


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def quiet_driver() -> None:
    """This process, before it starts or joins Ray: DRIVER_SKIP_REGEX."""
    pattern = os.environ.get(SKIP_REGEX_ENV) or ""
    if DRIVER_SKIP_REGEX not in pattern:
        pattern = f"{pattern}|{DRIVER_SKIP_REGEX}" if pattern else DRIVER_SKIP_REGEX
    os.environ[SKIP_REGEX_ENV] = pattern
    # Ray reads the variable when it is first imported; once imported, its two
    # deduplicators (forwarded stdout and stderr) hold the pattern.
    ray_logging = sys.modules.get("ray._private.ray_logging")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(ray_logging, name, None)
        if dedup is not None and hasattr(dedup, "skip_re"):
            dedup.skip_re = re.compile(pattern)


def init_ray(address: str | None, log: Callable[[str], None], job: str, **local: Any) -> str | None:
    """Start or join Ray unless it is initialised; returns the address joined (None: local).

    ``address``: the job's --address; None falls back to RAY_ADDRESS, then to the
    recorded cluster when it answers, then to an embedded instance started with
    ``local`` (ray.init keyword arguments, see :func:`start_local_ray`). ``job``
    prefixes the one line logged.
    """
    import ray  # lazy: a bad INPUT or flag fails before Ray loads (ray: 0.3 s, measured)

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and (recorded := recorded_address()) is not None:
        if answers(recorded):
            log(f"{job}: joining the Ray cluster at {recorded} (started by `ray start`)")
            address = recorded
        else:
            log(
                f"{job}: the Ray cluster at {recorded} that `ray start` recorded does not "
                "answer; starting a local Ray instance (--address to choose a cluster)"
            )
    if address is None:
        if dashboard := start_local_ray(**local):
            log(f"{job}: Ray dashboard at {dashboard}")
    else:
        quiet_driver()
        ray.init(address=address, configure_logging=False, runtime_env=job_runtime_env(False))
    return address


def start_local_ray(**local: Any) -> str | None:
    """An embedded Ray instance for this process, quiet, without the dashboard unless
    ``include_dashboard`` (in ``local``, else ``--dashboard``: :data:`LOCAL_RAY`) says so;
    returns the dashboard's URL (None without it).

    The dashboard costs about a tenth of a 2-core machine for the whole run and 0.7 s of
    start-up; a user who wants it asks with --dashboard.
    """
    import ray  # lazy: see init_ray

    local.setdefault("include_dashboard", LOCAL_RAY.dashboard)
    quiet_driver()
    # Ray's note that it turned token authentication on for a local cluster: this
    # instance lives and dies with the job, and no one else is meant to join it.
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth.level
    auth.setLevel(logging.ERROR)
    try:
        context = ray.init(
            address="local", configure_logging=False, runtime_env=job_runtime_env(True), **local
        )
    finally:
        auth.setLevel(level)
    url = context.dashboard_url if local["include_dashboard"] else None
    return f"http://{url}" if url and "://" not in url else url or None


@dataclass(frozen=True)
class NodeShape:
    """One alive node's total logical resources."""

    cpus: float
    gpus: float
    memory: float = 0.0


def node_shapes() -> list[NodeShape]:
    """Every alive node's shape (Ray must be initialised)."""
    import ray  # lazy: a bad INPUT or flag fails before Ray loads (ray: 0.3 s, measured)

    shapes = []
    for node in ray.nodes():
        if node.get("Alive", node.get("alive")):
            res = node.get("Resources", {})
            shapes.append(
                NodeShape(
                    float(res.get("CPU", 0)), float(res.get("GPU", 0)), float(res.get("memory", 0))
                )
            )
    return shapes


def unplaceable(demands: list[dict[str, float]], shapes: list[NodeShape]) -> list[dict[str, float]]:
    """The ``demands`` that no node of ``shapes`` could host even idle: what a run waits for
    in vain until nodes change. A demand that fits some node only waits for its work."""

    def fits(demand: dict[str, float], node: NodeShape) -> bool:
        return (
            demand.get("CPU", 0) <= node.cpus
            and demand.get("GPU", 0) <= node.gpus
            and (node.memory <= 0 or demand.get("memory", 0) <= node.memory)
        )

    return [d for d in demands if not any(fits(d, node) for node in shapes)]


def shapes_text(shapes: list[NodeShape]) -> str:
    """``shapes`` for a message, grouped: "3 nodes of 2 CPUs", "1 node of 8 CPUs, 1 GPU"."""
    if not shapes:
        return "no alive nodes"
    groups = Counter((s.cpus, s.gpus) for s in shapes)
    parts = []
    for (cpus, gpus), n in sorted(groups.items(), reverse=True):
        text = f"{n} node{'s' if n > 1 else ''} of {cpus:g} CPU{'s' if cpus != 1 else ''}"
        if gpus:
            text += f", {gpus:g} GPU{'s' if gpus != 1 else ''}"
        parts.append(text)
    return " + ".join(parts)


def _cluster_status() -> Any:
    """Ray's autoscaler view of the cluster (ray.autoscaler.v2.sdk), None when it cannot be
    read: no evidence, then, of a stall or of an autoscaler."""
    import ray  # lazy: a bad INPUT or flag fails before Ray loads (ray: 0.3 s, measured)

    try:
        # in the try: a Ray without this module means no status (0.02 s after ray, measured)
        from ray.autoscaler.v2.sdk import get_cluster_status

        return get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    except Exception:  # noqa: BLE001 - a status we cannot read says nothing either way
        return None


def pending_demands() -> list[dict[str, float]]:
    """Resource shapes of the tasks and actors (and placement group bundles) Ray has not
    placed yet, one entry per shape with ``count``; [] when Ray cannot say."""
    status = _cluster_status()
    if status is None:
        return []
    summary = status.resource_demands
    demands = []
    for group in [*summary.ray_task_actor_demand, *summary.placement_group_demand]:
        for req in group.bundles_by_count:
            demands.append({**req.bundle, "count": float(req.count)})
    return demands


def launching(autoscaling: bool) -> bool:
    """Whether the cluster may add nodes: the user said so, or an autoscaler is launching."""
    if autoscaling:
        return True
    status = _cluster_status()
    if status is None:
        return False
    return bool(status.pending_launches or status.pending_nodes or status.failed_launches)


def demands_text(demands: list[dict[str, float]]) -> str:
    """Pending demands for a message: "2 x {CPU: 3}"."""
    parts = []
    for d in demands:
        shape = ", ".join(
            f"{k}: {v:g}" if k != "memory" else f"memory: {v / 1024**3:.1f} GiB"
            for k, v in d.items()
            if k != "count" and not k.startswith("node:") and "_group_" not in k
        )
        parts.append(f"{int(d.get('count', 1))} x {{{shape}}}")
    return "; ".join(parts) or "nothing"


def resources_text() -> str:
    """The cluster's available / total CPUs and GPUs now, for a message."""
    import ray  # lazy: a bad INPUT or flag fails before Ray loads (ray: 0.3 s, measured)

    total, free = ray.cluster_resources(), ray.available_resources()
    text = f"{free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free"
    if total.get("GPU"):
        text += f", {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs free"
    return text
