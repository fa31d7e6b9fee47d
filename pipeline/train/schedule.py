"""The learning-rate schedule: linear scaling, linear warm-up, then step decay (detectron's).

The driver resolves the numbers a run leaves open (base lr, warm-up length,
the iterations of the steps) into the TrainSpec; every worker turns the spec
into the factor of torch's LambdaLR (:func:`lr_factor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.train.spec import TrainSpec


def base_lr(global_batch: int) -> float:
    """0.02 per 16 images of global batch (the linear scaling rule)."""
    return 0.02 * global_batch / 16


def default_warmup(iterations: int) -> int:
    """Warm-up length of a run of ``iterations``: a tenth of it, at most 500."""
    return min(500, iterations // 10)


def step_iterations(lr_steps: Sequence[float], iterations: int) -> tuple[int, ...]:
    """The iterations of the lr steps: fractions of the run (0 < s < 1) or absolute ones."""
    return tuple(sorted(round(s * iterations) if 0 < s < 1 else int(s) for s in lr_steps if s > 0))


def lr_factor(spec: TrainSpec) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps (torch LambdaLR's argument).

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters`` steps,
    then times ``lr_gamma`` at each of ``lr_steps`` (detectron's schedule).
    """
    warmup, start, steps, gamma = (
        spec.warmup_iters,
        spec.warmup_factor,
        spec.lr_steps,
        spec.lr_gamma,
    )

    def factor(step: int) -> float:
        decay = gamma ** sum(step >= s for s in steps)
        if step < warmup:
            alpha = step / warmup
            return decay * (start * (1 - alpha) + alpha)
        return decay

    return factor
