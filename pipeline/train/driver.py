"""Distributed training on Ray Train: the driver side of `maskrcnn train`.

    check inputs (COCO data, config)  ->  TorchTrainer(train_loop_per_worker, DDP)
      ->  checkpoints in STORAGE/NAME/checkpoint_<iteration>/ (the last K kept)
      ->  STORAGE/NAME/model.safetensors from the last checkpoint

The run is named by STORAGE/NAME: Ray Train keeps a snapshot of the run's
checkpoints there, so a lost worker restarts the worker group from the last
checkpoint (FailureConfig), and running the same command again, after the
driver was stopped, continues from it too. The worker side is
pipeline.train.loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline import storage
from pipeline.train.state import MODEL_FILE, STATE_FILE, TrainSpec

EXPORT_NAME = "model.safetensors"


@dataclass
class TrainOptions:
    """What `maskrcnn train` was asked for (CLI flags, same names)."""

    data: str
    storage: str = "runs"
    name: str | None = None
    val_data: str | None = None
    preset: str | None = None
    config: str | None = None  # JSON/YAML file of MaskRCNNConfig fields (+ optional "preset")
    min_size: int | None = None
    max_size: int | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 2  # images per worker per iteration
    iters: int | None = None
    epochs: float | None = None
    lr: float | None = None  # default: 0.02 * global batch / 16 (linear scaling rule)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int | None = None
    lr_steps: tuple[float, ...] = (0.75, 0.92)  # fractions of the run (or absolute iterations)
    lr_gamma: float = 0.1
    clip_grad: float = 10.0
    amp: bool = False
    scale_jitter: float = 0.25
    flip: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    max_failures: int = 3
    seed: int = 0
    log_every: int | None = None
    loader_workers: int | None = None
    endpoint_url: str | None = None
    anon: bool | None = None
    address: str | None = None


def absolute_paths(opts: TrainOptions) -> TrainOptions:
    """Local paths made absolute: Ray Train workers run in another working directory."""

    def fix(uri: str | None) -> str | None:
        if uri is None or storage.protocol_of(uri) not in ("file", "local"):
            return uri
        return os.path.abspath(uri.removeprefix("file://"))

    return replace(
        opts,
        data=fix(opts.data),
        val_data=fix(opts.val_data),
        storage=fix(opts.storage),
        config=fix(opts.config),
    )


def _options(uri: str, opts: TrainOptions) -> dict[str, Any]:
    return storage.storage_options(uri, endpoint_url=opts.endpoint_url, anon=opts.anon)


def default_name(opts: TrainOptions) -> str:
    """A run name from the preset/config and the data: the same command names the same run."""
    what = opts.preset or os.path.splitext(os.path.basename(opts.config or "config"))[0]
    data = [p for p in opts.data.split("://", 1)[-1].rstrip("/").split("/") if p]
    tail = "-".join(data[-2:]) if data else "data"
    if tail.endswith(".json"):
        tail = tail[: -len(".json")]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{what}-{tail}")


def model_config(opts: TrainOptions, class_names: list[str]) -> dict[str, Any]:
    """The MaskRCNNConfig dict for the run: preset or file, classes from the data, size flags."""
    from maskrcnn import MaskRCNNConfig

    overrides: dict[str, Any] = {}
    preset = opts.preset
    if opts.config:
        fs, path = storage.get_fs(opts.config, _options(opts.config, opts))
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--config {storage.redact(opts.config)}: no such file"
            ) from None
        import yaml

        try:
            overrides = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            raise ValueError(
                f"--config {storage.redact(opts.config)}: not JSON/YAML ({exc})"
            ) from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config {storage.redact(opts.config)}: needs a mapping of fields")
        preset = overrides.pop("preset", None) or "r50-fpn"
        overrides.pop("num_classes", None)
        names = overrides.pop("class_names", None)
        if names and list(names) != class_names:
            raise ValueError(
                f"--config class_names {names} differ from the data's categories "
                f"{class_names}; drop class_names from the file (they come from --data)"
            )
    if opts.min_size:
        overrides["min_size"] = opts.min_size
    if opts.max_size:
        overrides["max_size"] = opts.max_size
    try:
        cfg = MaskRCNNConfig.preset(
            preset or "r50-fpn", num_classes=len(class_names), class_names=class_names, **overrides
        )
    except TypeError as exc:  # an unknown field in the file
        raise ValueError(f"--config: {exc}") from None
    return cfg.to_dict()


def plan_spec(opts: TrainOptions, data_size: int, class_names: list[str]) -> TrainSpec:
    """The worker spec: iteration count, schedule and defaults resolved from the options."""
    if opts.workers < 1 or opts.batch_size < 1:
        raise ValueError("--workers and --batch-size must be at least 1")
    if data_size < opts.workers:
        raise ValueError(
            f"--data has {data_size} usable images, fewer than --workers {opts.workers}"
        )
    global_batch = opts.workers * opts.batch_size
    if opts.iters is not None:
        iterations = opts.iters
    else:
        epochs = 1.0 if opts.epochs is None else opts.epochs
        iterations = math.ceil(epochs * math.ceil(data_size / global_batch))
    if iterations < 1:
        raise ValueError(f"nothing to train: {iterations} iterations (--iters/--epochs)")
    if opts.checkpoint_every < 1 or opts.keep_checkpoints < 1:
        raise ValueError("--checkpoint-every and --keep-checkpoints must be at least 1")
    lr = opts.lr if opts.lr is not None else 0.02 * global_batch / 16
    warmup = opts.warmup_iters
    if warmup is None:
        warmup = min(500, iterations // 10)
    steps = tuple(
        sorted(round(s * iterations) if 0 < s < 1 else int(s) for s in opts.lr_steps if s > 0)
    )
    log_every = opts.log_every or max(1, min(100, iterations // 25))
    loader_workers = opts.loader_workers
    if loader_workers is None:
        loader_workers = 2 if opts.gpus_per_worker > 0 else 0
    run_uri = storage.join(opts.storage, opts.name or default_name(opts))
    return TrainSpec(
        data=opts.data,
        val_data=opts.val_data,
        model_config=model_config(opts, class_names),
        iterations=iterations,
        batch_size=opts.batch_size,
        lr=lr,
        storage=run_uri,
        data_options=_options(opts.data, opts),
        val_options=_options(opts.val_data, opts) if opts.val_data else {},
        storage_options=_options(run_uri, opts),
        momentum=opts.momentum,
        weight_decay=opts.weight_decay,
        warmup_iters=warmup,
        lr_steps=steps,
        lr_gamma=opts.lr_gamma,
        clip_grad=opts.clip_grad,
        amp=opts.amp,
        scale_jitter=opts.scale_jitter,
        flip=opts.flip,
        checkpoint_every=opts.checkpoint_every,
        eval_every=opts.eval_every,
        log_every=log_every,
        seed=opts.seed,
        loader_workers=loader_workers,
        cpus_per_worker=opts.cpus_per_worker,
    )


def ray_storage(uri: str, options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local directory, or any fsspec URI.

    Object stores go through our fsspec filesystem (endpoint and credentials
    as for every other file) wrapped for pyarrow, which Ray Train uses.
    """
    if storage.protocol_of(uri) in ("file", "local"):
        return os.path.abspath(uri.removeprefix("file://")), None
    import pyarrow.fs

    fs, path = storage.get_fs(uri, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _init_ray(opts: TrainOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
        return
    # A local instance: enough logical CPUs for the workers and the Train controller
    # even on a 2-core machine (workers take 1 CPU each by default).
    needed = math.ceil(opts.workers * opts.cpus_per_worker) + 1
    # The dashboard stays on: Ray Train's placement-group cleaner asks the state API.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), configure_logging=False)


def train(opts: TrainOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or continue training) the run STORAGE/NAME; returns its summary.

    Raises ValueError/FileNotFoundError naming the input for bad data or
    options before anything starts, RuntimeError when training fails more
    than --max-failures times.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opts = absolute_paths(opts)
    if opts.preset and opts.config:
        raise ValueError("give --preset or --config, not both")
    data = _dataset("--data", opts.data, _options(opts.data, opts), train=True)
    if opts.val_data:
        val = _dataset("--val-data", opts.val_data, _options(opts.val_data, opts), train=False)
        missing = set(val.class_names[1:]) - set(data.class_names[1:])
        if missing == set(val.class_names[1:]):
            raise ValueError(
                f"--val-data {val.name}: none of its categories {sorted(missing)[:8]} "
                f"is a category of --data {data.name}"
            )
    spec = plan_spec(opts, len(data), data.class_names)
    name = opts.name or default_name(opts)
    log(
        f"train: {storage.redact(spec.storage)}: {len(data)} images, "
        f"{len(data.class_names) - 1} classes, {opts.workers} worker(s) x {opts.batch_size} "
        f"images, {spec.iterations} iterations, lr {spec.lr:g}" + (", amp" if opts.amp else "")
    )

    # Ray Train's print patch sends print() to a logger, which pycocotools'
    # redirected summaries would then reach; our log lines are plain prints.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    _init_ray(opts)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = ray_storage(opts.storage, _options(opts.storage, opts))
    use_gpu = opts.gpus_per_worker > 0
    resources = {"CPU": opts.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = opts.gpus_per_worker
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=asdict(spec),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            # Ray Train's per-report INFO lines would drown the progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(
            f"training failed (after up to {opts.max_failures} restarts): "
            + (str(exc).strip().splitlines() or ["unknown error"])[-1]
        ) from exc
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    state = _export(result.checkpoint, spec.storage, _options(opts.storage, opts))
    model_uri = storage.join(spec.storage, EXPORT_NAME)
    log(
        f"train: finished at iteration {state['iteration']} in {seconds:.0f}s; "
        f"wrote {storage.redact(model_uri)}"
    )
    return {
        "run": storage.redact(spec.storage),
        "model": storage.redact(model_uri),
        "model_id": state.get("model_id"),
        "iteration": state["iteration"],
        "iterations": spec.iterations,
        "seconds": round(seconds, 1),
        "metrics": state.get("metrics", {}),
        "checkpoint": result.checkpoint.path,
    }


def _dataset(flag: str, uri: str, options: dict[str, Any], train: bool) -> Any:
    """A CocoDataset, with a missing file reported against the flag that named it."""
    from pipeline.formats.coco import CocoDataset

    try:
        return CocoDataset(uri, storage_options=options, train=train)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{flag} {exc} (give a COCO annotations JSON, or the folder holding annotations.json)"
        ) from None


def _worker_entry(config: dict[str, Any]) -> None:
    from pipeline.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def _export(checkpoint: Any, run_uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """Copy the checkpoint's model file to RUN/model.safetensors; returns its state.json."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
        state = json.loads(f.read())
    with fs.open_input_stream(f"{path}/{MODEL_FILE}") as f:
        model_bytes = f.read()
    storage.atomic_write(storage.join(run_uri, EXPORT_NAME), model_bytes, options)
    return state
