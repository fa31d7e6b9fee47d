"""The loop each Ray Train worker runs: DDP Mask R-CNN on its shard of a COCO dataset.

Started by pipeline.train.driver through TorchTrainer; every attempt (first start,
restart after a lost worker, re-run of the same command) begins from
``ray.train.get_checkpoint()`` when there is one. Every worker does the same
number of optimizer steps, so DDP's all-reduces line up whatever each shard
holds. Rank 0 logs, evaluates and writes the checkpoints.

    set up the process -> build the learner -> restore -> shard + status file
      -> wrap in DDP -> per iteration: seed, step, and when due: log, evaluate, report
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import ray.train
import ray.train.torch
import torch

from pipeline.formats.coco import CocoDataset
from pipeline.train.curves import MetricsLog
from pipeline.train.data import AugmentedShard, BatchPlan, LastGoodBatch, train_input_size
from pipeline.train.evaluator import Evaluator
from pipeline.train.learner import Learner
from pipeline.train.progress import LossWindow, format_eval, format_log, write_worker_status
from pipeline.train.spec import TrainSpec

try:  # the logger of Ray Train v2's per-report lines
    from ray.train.v2._internal.execution import context as train_context
except ImportError:  # another Ray version: only noisier
    train_context = None


@dataclass
class Worker:
    """This process's place in the worker group."""

    rank: int
    world: int
    device: torch.device
    metrics_log: MetricsLog | None = None  # rank 0: STORAGE/NAME/metrics/


class Due(NamedTuple):
    """What iteration ``step`` ends with, besides its optimizer step."""

    log: bool
    checkpoint: bool
    evaluate: bool

    @classmethod
    def at(cls, spec: TrainSpec, step: int, start: int) -> Due:
        last = step == spec.iterations
        return cls(
            log=step % spec.log_every == 0 or last or step == start + 1,
            checkpoint=step % spec.checkpoint_every == 0 or last,
            evaluate=bool(spec.val_data)
            and ((spec.eval_every > 0 and step % spec.eval_every == 0) or last),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is a TrainSpec as a dict."""
    spec = TrainSpec(**config)
    worker = _set_up_process(spec)
    learner = Learner.build(spec, worker.device)
    start, resumed = _restore(learner, spec)
    shard = CocoDataset(spec.data, storage_options=spec.data_options).shard(
        worker.rank, worker.world
    )
    write_worker_status(spec, worker.rank, worker.world, start, len(shard))
    if worker.rank == 0:
        _announce(worker, start, resumed, spec)
        worker.metrics_log = MetricsLog(spec.storage, spec.storage_options, start)
    if start >= spec.iterations:
        return
    learner.wrap_ddp()
    loader = _loader(spec, worker, shard, start)
    evaluator = None
    if worker.rank == 0 and spec.val_data:
        evaluator = Evaluator(spec.val_data, learner.model.cfg.label_names, spec.val_options)
    _iterate(spec, worker, learner, shard, loader, evaluator, start)


def _quiet_logs() -> None:
    """Keep the console to our progress lines.

    Ray Train's workers log at INFO to the console through the root logger:
    one line per ray.train.report (from a logger named after its file, so
    LoggingConfig's level does not reach it) and botocore's credential notes.
    """
    if train_context is not None:
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)


def _set_up_process(spec: TrainSpec) -> Worker:
    """Quiet logs, this worker's rank and device, and its CPU threads."""
    _quiet_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    return Worker(rank, world, device)


def _restore(learner: Learner, spec: TrainSpec) -> tuple[int, bool]:
    """(iteration to start at, whether it came from Ray Train's latest checkpoint).

    A run with a checkpoint of its own restores it and never re-applies --init.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return learner.start(None, spec.init, spec.init_options), False
    with checkpoint.as_directory() as directory:
        return learner.start(directory, spec.init, spec.init_options), True


def _announce(worker: Worker, start: int, resumed: bool, spec: TrainSpec) -> None:
    if resumed:
        print(f"train: resumed from the checkpoint of iteration {start}", flush=True)
    else:
        print(
            f"train: {worker.world} worker(s) on {worker.device.type}, starting at iteration 0"
            + (" from --init" if spec.init else ""),
            flush=True,
        )


def _loader(
    spec: TrainSpec, worker: Worker, shard: CocoDataset, start: int
) -> torch.utils.data.DataLoader:
    """The batches of iterations start .. spec.iterations - 1 of this worker (data.BatchPlan)."""
    plan = BatchPlan(
        len(shard), spec.batch_size, spec.seed, worker.rank, start, spec.iterations, flip=spec.flip
    )
    return torch.utils.data.DataLoader(
        AugmentedShard(shard),
        batch_sampler=plan,
        collate_fn=CocoDataset.collate,
        num_workers=spec.loader_workers,
        pin_memory=worker.device.type == "cuda",
    )


def _seed_iteration(spec: TrainSpec, rank: int, model: Any, it: int) -> tuple[int, int]:
    """Seed torch for iteration ``it`` of ``rank``; returns its input (min_size, max_size).

    The model samples anchors and RoIs at random: a seed per (rank, iteration)
    makes a resumed run draw what the uninterrupted one would have drawn.
    """
    torch.manual_seed(int(np.random.SeedSequence([spec.seed, rank, it]).generate_state(1)[0]))
    return train_input_size(
        model.cfg.min_size, model.cfg.max_size, spec.scale_jitter, spec.seed, rank, it
    )


def _iterate(
    spec: TrainSpec,
    worker: Worker,
    learner: Learner,
    shard: CocoDataset,
    loader: torch.utils.data.DataLoader,
    evaluator: Evaluator | None,
    start: int,
) -> None:
    """Iterations start + 1 .. spec.iterations: a step each, then what is due."""
    stand_in = LastGoodBatch(shard)
    window = LossWindow()
    for it, (images, targets) in zip(range(start, spec.iterations), loader):
        step = it + 1  # optimizer steps done after this iteration
        size = _seed_iteration(spec, worker.rank, learner.model, it)
        images, targets = stand_in(images, targets)
        loss, loss_dict = learner.step(images, targets, size, step)
        window.add(loss, loss_dict, len(images))
        due = Due.at(spec, step, start)
        if any(due):
            _report(spec, worker, learner, evaluator, window, step, due)
            window.reset()


def _report(
    spec: TrainSpec,
    worker: Worker,
    learner: Learner,
    evaluator: Evaluator | None,
    window: LossWindow,
    step: int,
    due: Due,
) -> None:
    """Log, evaluate (rank 0) and ray.train.report what is due at ``step``."""
    # Every rank gets here at the same iterations: the mean over ranks is a collective.
    seconds_per_step = window.seconds_per_step()
    losses, images_per_second = window.mean_over_ranks(worker.device, worker.world)
    lr = learner.optimizer.param_groups[0]["lr"]
    metrics: dict[str, Any] = {"iteration": step, "lr": lr, "images_per_s": images_per_second}
    metrics.update(losses)
    if worker.rank == 0 and due.log:
        line = format_log(step, spec.iterations, losses, lr, images_per_second, seconds_per_step)
        print("train: " + line, flush=True)
    if due.evaluate and worker.rank == 0:
        metrics.update(evaluator(learner.model, fast=learner.fast))
        print("train: " + format_eval(step, metrics), flush=True)
    if worker.metrics_log is not None:
        worker.metrics_log.add(metrics, close=due.checkpoint)
    if due.checkpoint or due.evaluate:
        with_checkpoint = due.checkpoint and worker.rank == 0
        _ray_report(metrics, step, learner if with_checkpoint else None)


def _ray_report(metrics: dict[str, Any], step: int, learner: Learner | None) -> None:
    """ray.train.report on every rank; with ``learner`` (rank 0) it carries the checkpoint."""
    if learner is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="maskrcnn-ckpt-") as directory:
        learner.save(directory, step, metrics)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )
