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

import os
import socket
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


def init_ray(address: str | None, log: Callable[[str], None], job: str, **local: Any) -> str | None:
    """Start or join Ray unless it is initialised; returns the address joined (None: local).

    ``address``: the job's --address; None falls back to RAY_ADDRESS, then to the
    recorded cluster when it answers, then to an embedded instance started with
    ``local`` (ray.init keyword arguments). ``job`` prefixes the one line logged.
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
        ray.init(address="local", configure_logging=False, **local)
    else:
        ray.init(address=address, configure_logging=False)
    return address


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
