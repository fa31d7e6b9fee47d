"""What a worker tells the outside: its status file, losses averaged over ranks, log lines.

Log lines (printed by rank 0; tests/helpers/train_logs.py reads them):

    train: iter   40/120  loss 1.234 (obj 0.1 ...)  lr 0.01000  12.3 img/s  ETA 1m05s
    train: eval at iteration 120: bbox AP 0.512  segm AP 0.498  AP50 0.801  (8 images, 1.2s)
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.train.spec import TrainSpec

LOSS_NAMES = {
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
}
WORKERS_DIR = "workers"


def write_worker_status(
    spec: TrainSpec, rank: int, world: int, start: int, shard_images: int
) -> None:
    """STORAGE/NAME/workers/rank-R.json: which process is worker R and where it started.

    Written at the start of every attempt: operators (and the fault-tolerance
    test) find a worker's process and the iteration it resumed from.
    """
    status = {
        "rank": rank,
        "world_size": world,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "start_iteration": start,
        "shard_images": shard_images,
        "time": time.time(),
    }
    uri = storage.join(spec.storage, WORKERS_DIR, f"rank-{rank}.json")
    # atomic_write retries what storage throws now and then (throttling, a reset
    # connection): a worker must not fail its start for that.
    storage.atomic_write(uri, json.dumps(status).encode(), spec.storage_options)


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class LossWindow:
    """Losses and images summed over the iterations since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """An empty window starting now (evaluation and checkpoint time are not in img/s)."""
        self.losses: dict[str, float] = {}
        self.steps, self.start, self.images = 0, time.perf_counter(), 0

    def add(self, loss: torch.Tensor, loss_dict: dict[str, torch.Tensor], images: int) -> None:
        """One iteration's total loss, its parts and its number of images."""
        self.steps += 1
        self.images += images
        for k, v in {"loss": loss, **loss_dict}.items():
            self.losses[k] = self.losses.get(k, 0.0) + float(v.detach())

    def seconds_per_step(self) -> float:
        """Wall seconds per iteration in the window so far."""
        return (time.perf_counter() - self.start) / max(self.steps, 1)

    def mean_over_ranks(self, device: torch.device, world: int) -> tuple[dict[str, float], float]:
        """(mean loss per name, images per second of all ranks) of the window.

        A collective: every rank must call it at the same iterations.
        """
        names = sorted(self.losses)
        local = torch.tensor(
            [self.losses[k] / self.steps for k in names] + [self.images], dtype=torch.float64
        )
        mean = _all_reduce_mean(local.to(device)).cpu()
        losses = dict(zip(names, mean[:-1].tolist()))
        seconds = time.perf_counter() - self.start
        return losses, float(mean[-1]) * world / max(seconds, 1e-9)


def format_log(
    step: int,
    iterations: int,
    losses: dict[str, float],
    lr: float,
    ips: float,
    seconds_per_step: float | None = None,
) -> str:
    """The progress line of iteration ``step`` (without the 'train: ' prefix); with
    ``seconds_per_step`` (of the last window) it ends with the time the remaining
    iterations take at that pace (evaluations and checkpoints not counted)."""
    parts = " ".join(f"{LOSS_NAMES.get(k, k)} {v:.3f}" for k, v in losses.items() if k != "loss")
    width = len(str(iterations))
    line = (
        f"iter {step:>{width}}/{iterations}  loss {losses['loss']:.3f} ({parts})  "
        f"lr {lr:.5f}  {ips:.1f} img/s"
    )
    if seconds_per_step is not None and step < iterations:
        line += f"  ETA {duration_text((iterations - step) * seconds_per_step)}"
    return line


def duration_text(seconds: float) -> str:
    """``seconds`` as "45s", "12m05s" or "3h07m"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_eval(step: int, metrics: dict[str, Any]) -> str:
    """The evaluation line of iteration ``step`` (without the 'train: ' prefix)."""
    return (
        f"eval at iteration {step}: bbox AP {metrics.get('bbox_AP', -1):.3f}  "
        f"segm AP {metrics.get('segm_AP', -1):.3f}  AP50 {metrics.get('segm_AP50', -1):.3f}"
        f"  ({metrics['eval_images']} images, {metrics['eval_seconds']:.1f}s)"
    )
