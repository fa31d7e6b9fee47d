"""The loop each Ray Train worker runs: DDP Mask R-CNN on its shard of a COCO dataset.

Started by pipeline.train.driver through TorchTrainer; every attempt (first start,
restart after a lost worker, re-run of the same command) begins from
``ray.train.get_checkpoint()`` when there is one. Every worker does the same
number of optimizer steps, so DDP's all-reduces line up whatever each shard
holds. Rank 0 logs, evaluates and writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.train.data import AugmentedShard, BatchPlan, input_size, train_input_size
from pipeline.train.state import (
    Evaluator,
    TrainSpec,
    amp_mode,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
)

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
    fs, path = storage.get_fs(storage.join(spec.storage, WORKERS_DIR), spec.storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/rank-{rank}.json", json.dumps(status).encode())


def _quiet_logs() -> None:
    """Keep the console to our progress lines.

    Ray Train's workers log at INFO to the console through the root logger:
    one line per ray.train.report (from a logger named after its file, so
    LoggingConfig's level does not reach it) and botocore's credential notes.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: only noisier
        pass
    logging.getLogger("botocore").setLevel(logging.WARNING)


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _format_log(it: int, spec: TrainSpec, losses: dict[str, float], lr: float, ips: float) -> str:
    parts = " ".join(f"{LOSS_NAMES.get(k, k)} {v:.3f}" for k, v in losses.items() if k != "loss")
    width = len(str(spec.iterations))
    return (
        f"iter {it:>{width}}/{spec.iterations}  loss {losses['loss']:.3f} ({parts})  "
        f"lr {lr:.5f}  {ips:.1f} img/s"
    )


def _build(spec: TrainSpec, device: torch.device):
    from maskrcnn import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(spec.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = MaskRCNN(MaskRCNNConfig.from_dict(spec.model_config)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec))
    amp = amp_mode(spec.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return model, params, optimizer, scheduler, scaler, amp


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is a TrainSpec as a dict."""
    import ray.train
    import ray.train.torch

    from pipeline.formats.coco import CocoDataset

    spec = TrainSpec(**config)
    _quiet_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    model, params, optimizer, scheduler, scaler, amp = _build(spec, device)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = load_checkpoint(directory, model, optimizer, scheduler, scaler)
    shard = CocoDataset(spec.data, storage_options=spec.data_options).shard(rank, world)
    write_worker_status(spec, rank, world, start, len(shard))
    if rank == 0:
        if checkpoint is not None:
            print(f"train: resumed from the checkpoint of iteration {start}", flush=True)
        else:
            print(f"train: {world} worker(s) on {device.type}, starting at iteration 0", flush=True)
    if start >= spec.iterations:
        return

    # Conv weights channels_last before DDP wraps the model. On CPU, oneDNN returns
    # convolution weight gradients channels_last even for contiguous weights, and
    # in the first backward after DDP is built (the first iteration of every
    # start and restart) DDP wrote the averaged gradient back into such a
    # gradient's memory in its bucket's contiguous order: a scrambled step
    # (torch 2.14, gloo; seen as a resumed run diverging from the uninterrupted
    # one). With channels_last weights, gradients, buckets and weights agree; the
    # bf16 fast path wants this layout anyway.
    model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)

    plan = BatchPlan(
        len(shard), spec.batch_size, spec.seed, rank, start, spec.iterations, flip=spec.flip
    )
    loader = torch.utils.data.DataLoader(
        AugmentedShard(shard),
        batch_sampler=plan,
        collate_fn=CocoDataset.collate,
        num_workers=spec.loader_workers,
        pin_memory=device.type == "cuda",
    )
    evaluator = None
    if rank == 0 and spec.val_data:
        evaluator = Evaluator(spec.val_data, model.cfg.label_names, spec.val_options)

    fallback = None
    window_losses: dict[str, float] = {}
    window_steps, window_start, images_seen = 0, time.perf_counter(), 0
    for it, (images, targets) in zip(range(start, spec.iterations), loader):
        step = it + 1  # optimizer steps done after this iteration
        # The model samples anchors and RoIs at random: a seed per (rank, iteration)
        # makes a resumed run draw what the uninterrupted one would have drawn.
        torch.manual_seed(int(np.random.SeedSequence([spec.seed, rank, it]).generate_state(1)[0]))
        min_size, max_size = train_input_size(
            model.cfg.min_size, model.cfg.max_size, spec.scale_jitter, spec.seed, rank, it
        )
        if images:
            fallback = (images, targets)
        else:
            # Every image of this batch was unreadable (each logged once): every rank
            # must still step, so this one repeats its last good batch.
            fallback = fallback or CocoDataset.collate([next(iter(shard))])
            images, targets = fallback
        autocast = (
            torch.autocast(device.type, dtype=torch.float16)
            if amp == "fp16"
            else contextlib.nullcontext()
        )
        with input_size(model, min_size, max_size), autocast:
            loss_dict = ddp_model(images, targets, fast=amp == "bf16")
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {step} "
                f"({ {k: round(v.item(), 4) for k, v in loss_dict.items()} }); "
                "lower --lr or raise --warmup-iters"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if spec.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, spec.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        window_steps += 1
        images_seen += len(images)
        for k, v in {"loss": loss, **loss_dict}.items():
            window_losses[k] = window_losses.get(k, 0.0) + float(v.detach())

        last = step == spec.iterations
        log_now = step % spec.log_every == 0 or last or step == start + 1
        checkpoint_now = step % spec.checkpoint_every == 0 or last
        eval_now = bool(spec.val_data) and (
            (spec.eval_every > 0 and step % spec.eval_every == 0) or last
        )
        if not (log_now or checkpoint_now or eval_now):
            continue

        # Every rank gets here at the same iterations: the mean over ranks is a collective.
        names = sorted(window_losses)
        local = torch.tensor(
            [window_losses[k] / window_steps for k in names] + [images_seen], dtype=torch.float64
        )
        mean = _all_reduce_mean(local.to(device)).cpu()
        losses = dict(zip(names, mean[:-1].tolist()))
        seconds = time.perf_counter() - window_start
        images_per_second = float(mean[-1]) * world / max(seconds, 1e-9)
        lr = optimizer.param_groups[0]["lr"]
        metrics: dict[str, Any] = {"iteration": step, "lr": lr, "images_per_s": images_per_second}
        metrics.update(losses)
        if rank == 0 and log_now:
            print("train: " + _format_log(step, spec, losses, lr, images_per_second), flush=True)
        if eval_now and rank == 0:
            metrics.update(evaluator(model, fast=amp == "bf16"))
            print(
                f"train: eval at iteration {step}: bbox AP {metrics.get('bbox_AP', -1):.3f}  "
                f"segm AP {metrics.get('segm_AP', -1):.3f}  AP50 {metrics.get('segm_AP50', -1):.3f}"
                f"  ({metrics['eval_images']} images, {metrics['eval_seconds']:.1f}s)",
                flush=True,
            )
        if checkpoint_now or eval_now:
            _report(metrics, rank, step, checkpoint_now, model, optimizer, scheduler, scaler)
        window_losses, window_steps, images_seen = {}, 0, 0
        window_start = time.perf_counter()  # evaluation and checkpoint time not in img/s


def _report(metrics, rank, step, with_checkpoint, model, optimizer, scheduler, scaler) -> None:
    """ray.train.report on every rank; rank 0 attaches the checkpoint when one is due."""
    import ray.train

    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="maskrcnn-ckpt-") as directory:
        save_checkpoint(directory, model, optimizer, scheduler, scaler, step, metrics)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )
