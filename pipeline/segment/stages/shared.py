"""A value the driver puts in Ray's object store once, for every task of a stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shared:
    """A value in Ray's object store, handed to a stage by reference: Ray Data ships a
    stage's arguments as one object, so a bare ObjectRef in them would not be resolved,
    and every task would otherwise carry its own copy of the value."""

    ref: Any

    def get(self) -> Any:
        import ray  # here: bench/gpu_check.py runs the stages where Ray is not installed

        return ray.get(self.ref)
