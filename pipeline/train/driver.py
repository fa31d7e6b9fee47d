"""Distributed training on Ray Train: the driver side of `maskrcnn train`.

    check inputs (COCO data, config)  ->  TorchTrainer(train_loop_per_worker, DDP)
      ->  checkpoints in STORAGE/NAME/checkpoint_<iteration>/ (the last K kept)
      ->  STORAGE/NAME/model.safetensors from the last checkpoint

The run is named by STORAGE/NAME: Ray Train keeps a snapshot of the run's
checkpoints there, so a lost worker restarts the worker group from the last
checkpoint (FailureConfig), and running the same command again, after the
driver was stopped, continues from it too. The flags become a TrainSpec in
pipeline.train.options; the worker side is pipeline.train.loop.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow.fs

from pipeline import cluster, storage
from pipeline.cluster import init_ray, wait_interval
from pipeline.formats.coco import CocoDataset
from pipeline.train.checkpoint import export_model
from pipeline.train.curves import write_curves
from pipeline.train.options import (
    TrainOptions,
    absolute_paths,
    plan_spec,
    run_name,
    uri_options,
)
from pipeline.train.spec import TrainSpec

EXPORT_NAME = "model.safetensors"


def train(opts: TrainOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or continue training) the run STORAGE/NAME; returns its summary.

    Raises ValueError/FileNotFoundError naming the input for bad data or
    options before anything starts, RuntimeError when training fails more
    than --max-failures times.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opts = absolute_paths(opts)
    data = _check_inputs(opts)
    init = None
    if opts.init:
        # lazy: loads maskrcnn (1.2 s after torch, measured), not needed by the errors above
        from pipeline.train.init import read_init

        init = read_init(opts.init, uri_options(opts.init, opts))
    spec = plan_spec(opts, len(data), data.class_names, init)
    if spec.init:
        log(f"train: --init {storage.redact(opts.init)}: found a {spec.init['kind']}")
        log(f"train: classes: {spec.init['classes']}")
    log(
        f"train: {storage.redact(spec.storage)}: {len(data)} images, "
        f"{len(data.class_names) - 1} classes, {opts.workers} worker(s) x {opts.batch_size} "
        f"images, {spec.iterations} iterations, lr {spec.lr:g}" + (", amp" if opts.amp else "")
    )
    trainer = _trainer(opts, spec, log)
    stop = threading.Event()
    watch = threading.Thread(
        target=_placement_watch, args=(opts, log, stop, wait_interval()), daemon=True
    )
    watch.start()
    try:
        result, seconds = _fit(trainer, opts.max_failures)
    finally:
        stop.set()
    model_uri = storage.join(spec.storage, EXPORT_NAME)
    state = export_model(result.checkpoint, model_uri, uri_options(opts.storage, opts))
    log(
        f"train: finished at iteration {state['iteration']} in {seconds:.0f}s; "
        f"wrote {storage.redact(model_uri)}"
    )
    curves = write_curves(spec.storage, spec.storage_options)
    if curves:
        log(f"train: wrote training curves {storage.redact(curves)}")
    return {
        "run": storage.redact(spec.storage),
        "model": storage.redact(model_uri),
        "model_id": state.get("model_id"),
        "iteration": state["iteration"],
        "iterations": spec.iterations,
        "seconds": round(seconds, 1),
        "metrics": state.get("metrics", {}),
        "checkpoint": result.checkpoint.path,
        "curves": storage.redact(curves) if curves else None,
        "init": spec.init and {k: v for k, v in spec.init.items() if k != "pairs"},
    }


def _check_inputs(opts: TrainOptions) -> CocoDataset:
    """The --data CocoDataset, after checking the flags and --val-data against it."""
    if opts.preset and opts.config:
        raise ValueError("give --preset or --config, not both")
    if not (opts.preset or opts.config or opts.init):
        raise ValueError("give --preset, --config or --init (the architecture of the run)")
    data = _dataset("--data", opts.data, uri_options(opts.data, opts), train=True)
    if opts.val_data:
        val = _dataset("--val-data", opts.val_data, uri_options(opts.val_data, opts), train=False)
        missing = set(val.class_names[1:]) - set(data.class_names[1:])
        if missing == set(val.class_names[1:]):
            raise ValueError(
                f"--val-data {val.name}: none of its categories {sorted(missing)[:8]} "
                f"is a category of --data {data.name}"
            )
    return data


def _dataset(flag: str, uri: str, options: dict[str, Any], train: bool) -> CocoDataset:
    """A CocoDataset, with a missing file reported against the flag that named it."""
    try:
        return CocoDataset(uri, storage_options=options, train=train)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{flag} {exc} (give a COCO annotations JSON, or the folder holding annotations.json)"
        ) from None


def ray_storage(uri: str, options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local directory, or any fsspec URI.

    Object stores go through our fsspec filesystem (endpoint and credentials
    as for every other file) wrapped for pyarrow, which Ray Train uses.
    """
    if storage.protocol_of(uri) in ("file", "local"):
        return os.path.abspath(uri.removeprefix("file://")), None
    fs, path = storage.get_fs(uri, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _init_ray(opts: TrainOptions, log: Callable[[str], None]) -> None:
    # A local instance: enough logical CPUs for the workers and the Train controller
    # even on a 2-core machine (workers take 1 CPU each by default).
    needed = math.ceil(opts.workers * opts.cpus_per_worker) + 1
    # The dashboard stays on, --dashboard or not: Ray Train's placement-group cleaner asks
    # the state API it serves whether the controller lives, and warns every second when
    # it cannot.
    init_ray(
        opts.address, log, "train", num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=True,
    )  # fmt: skip


def _placement_watch(
    opts: TrainOptions, log: Callable[[str], None], stop: threading.Event, interval: float
) -> None:
    """Every ``interval`` s while ``stop`` is unset and Ray holds demands it has not
    placed: one line naming them, what a worker needs and what the nodes have."""
    worker = f"{opts.cpus_per_worker:g} CPU" + (
        f", {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker > 0 else ""
    )
    while not stop.wait(interval):
        try:
            pending = cluster.pending_demands()
            if not pending:
                continue
            shapes = cluster.node_shapes()
            fits = any(
                s.cpus >= opts.cpus_per_worker and s.gpus >= opts.gpus_per_worker for s in shapes
            )
            log(
                f"train: waiting for resources: {cluster.demands_text(pending)} pending; "
                f"{opts.workers} worker(s) of {{{worker}}} each"
                + ("" if fits else " (no node can host one)")
                + f"; the cluster has {cluster.shapes_text(shapes)}, {cluster.resources_text()}"
            )
        except Exception as exc:  # noqa: BLE001 - a message, never a reason to stop
            log(f"train: placement watch: {exc}")


def _trainer(opts: TrainOptions, spec: TrainSpec, log: Callable[[str], None]) -> Any:
    """A TorchTrainer of the run on Ray (started here when not running)."""
    # Ray Train's print patch sends print() to a logger, which pycocotools'
    # redirected summaries would then reach; our log lines are plain prints.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    _init_ray(opts, log)
    # lazy: every input error comes before Ray Train loads (0.8 s after ray, measured)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = ray_storage(opts.storage, uri_options(opts.storage, opts))
    use_gpu = opts.gpus_per_worker > 0
    resources = {"CPU": opts.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = opts.gpus_per_worker
    return TorchTrainer(
        _worker_entry,
        train_loop_config=asdict(spec),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name(opts),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            # Ray Train's per-report INFO lines would drown the progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit(trainer: Any, max_failures: int) -> tuple[Any, float]:
    """(Ray Train's result, seconds) of the run; RuntimeError if it failed or left no checkpoint."""
    import ray.train  # lazy: see _trainer

    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(
            f"training failed (after up to {max_failures} restarts): "
            + (str(exc).strip().splitlines() or ["unknown error"])[-1]
        ) from exc
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result, seconds


def _worker_entry(config: dict[str, Any]) -> None:
    # lazy: worker-side; at the top it would load maskrcnn and Ray Train (2.5 s, measured)
    # before the driver's input errors
    from pipeline.train.loop import train_loop_per_worker

    train_loop_per_worker(config)
