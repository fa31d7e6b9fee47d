"""The model actors' shape and count, from the options and each node's shape.

Ray places an actor on one node, so every default and check here is per node,
never the cluster's sum: an actor must fit a node, and the CPU stages (decode,
paste + RLE, parts) need CPU left somewhere beside the actors or nothing ever
reaches the actors. :func:`actor_plan` decides the defaults; :func:`check`
refuses (or, on a cluster that may add nodes, warns about) a request the live
nodes cannot run, in one line naming the flags, the node shapes and a request
that works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.cluster import NodeShape, shapes_text

# The least CPU the CPU stages need beside the actors somewhere: one decode task.
STAGE_CPUS = 0.5
# What a default CPU actor leaves its node for the CPU stages.
STAGE_ROOM = 1.0


class InfeasibleError(ValueError):
    """The requested actors cannot run on the cluster's nodes."""


@dataclass(frozen=True)
class ActorPlan:
    gpus: float
    cpus: float
    actors: tuple[int, int]


def default_cpus(gpus: float, shapes: list[NodeShape]) -> float:
    """CPUs per actor: 1 with a GPU; else half the largest node's CPUs, leaving that node
    STAGE_ROOM for the CPU stages (half a CPU on a node of one)."""
    if gpus > 0:
        return 1.0
    biggest = max((s.cpus for s in shapes), default=1.0)
    if biggest < 2:
        return max(biggest, 1.0) / 2
    return float(max(1, min(math.floor(biggest / 2), math.floor(biggest - STAGE_ROOM))))


def slots(gpus: float, cpus: float, shapes: list[NodeShape], room: float = 0.0) -> list[int]:
    """Per node, how many actors of (gpus, cpus) it hosts keeping ``room`` CPUs free."""
    out = []
    for s in shapes:
        by_cpu = math.floor((s.cpus - room) / cpus + 1e-9) if cpus > 0 else 10**6
        by_gpu = math.floor(s.gpus / gpus + 1e-9) if gpus > 0 else 10**6
        out.append(max(0, min(by_cpu, by_gpu)))
    return out


def actor_plan(
    gpus: float | None,
    cpus: float | None,
    actors: tuple[int, int] | None,
    shapes: list[NodeShape],
) -> ActorPlan:
    """The options with every None replaced by its default for ``shapes``."""
    if gpus is None:
        gpus = 1.0 if any(s.gpus > 0 for s in shapes) else 0.0
    if cpus is None:
        cpus = default_cpus(gpus, shapes)
    if actors is None:
        # One per node that hosts one with room left for the CPU stages (GPU actors: one
        # per GPU), at least one.
        room = 0.0 if gpus > 0 else STAGE_ROOM
        actors = (1, max(1, sum(slots(gpus, cpus, shapes, room))))
    return ActorPlan(gpus, cpus, actors)


def _flags(plan: ActorPlan) -> str:
    text = f"--cpus-per-actor {plan.cpus:g}"
    if plan.gpus:
        text += f" --gpus-per-actor {plan.gpus:g}"
    lo, hi = plan.actors
    return text + f" --actors {lo}" + (f",{hi}" if hi != lo else "")


def problem(plan: ActorPlan, shapes: list[NodeShape]) -> str | None:
    """Why ``plan`` cannot run on ``shapes`` (None when it can)."""
    if not any(slots(plan.gpus, plan.cpus, shapes)):
        return "asks for a model actor that no node can host"
    # Place the minimum actor count, biggest nodes first; the CPU stages need CPU left.
    free = sorted(((s.cpus, s.gpus) for s in shapes), reverse=True)
    left = plan.actors[0]
    for i, (c, g) in enumerate(free):
        n = min(left, slots(plan.gpus, plan.cpus, [NodeShape(c, g)])[0])
        free[i] = (c - n * plan.cpus, g - n * plan.gpus)
        left -= n
    if left > 0:
        return f"asks for {plan.actors[0]} model actors at once; the nodes host {plan.actors[0] - left}"
    if max(c for c, _ in free) < STAGE_CPUS:
        return "leaves no CPU on any node for decoding and encoding beside the model actors"
    return None


def alternative(plan: ActorPlan, shapes: list[NodeShape]) -> str:
    """Flags that run on ``shapes``: fewer CPUs per actor, then fewer actors."""
    cpus = default_cpus(plan.gpus, shapes)
    for actors in (plan.actors, (1, max(1, plan.actors[1])), (1, 1)):
        for c in (cpus, 1.0, 0.5):
            candidate = ActorPlan(plan.gpus, c, (actors[0], max(actors[0], actors[1])))
            if problem(candidate, shapes) is None:
                return _flags(candidate)
    return "a cluster with more CPUs per node"


def check(
    plan: ActorPlan, shapes: list[NodeShape], may_add_nodes: Callable[[], bool], warn
) -> None:
    """Raise InfeasibleError (one line) when ``plan`` cannot run on ``shapes``; only
    ``warn`` the same line when ``may_add_nodes()`` (--autoscaling, or Ray launching),
    which is asked only then."""
    why = problem(plan, shapes)
    if why is None:
        return
    line = (
        f"{_flags(plan)} {why} (the cluster has {shapes_text(shapes)}); "
        f"try {alternative(plan, shapes)}"
    )
    if not may_add_nodes():
        raise InfeasibleError(line)
    warn("segment: " + line + "; waiting for the autoscaler to add a node that fits")
