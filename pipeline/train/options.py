"""From `maskrcnn train`'s flags to the TrainSpec every worker gets.

TrainOptions holds the flags as given; plan_spec resolves what they leave
open (run name, model config, iteration count, learning-rate schedule,
defaults that depend on the hardware) into a TrainSpec.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import yaml

from pipeline import storage
from pipeline.train.schedule import base_lr, default_warmup, step_iterations
from pipeline.train.spec import TrainSpec


@dataclass
class TrainOptions:
    """What `maskrcnn train` was asked for (CLI flags, same names). Flags that pass
    straight into the TrainSpec take its defaults: each default is written once."""

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
    cpus_per_worker: float = TrainSpec.cpus_per_worker
    batch_size: int = 2  # images per worker per iteration
    iters: int | None = None
    epochs: float | None = None
    lr: float | None = None  # default: 0.02 * global batch / 16 (linear scaling rule)
    momentum: float = TrainSpec.momentum
    weight_decay: float = TrainSpec.weight_decay
    warmup_iters: int | None = None
    lr_steps: tuple[float, ...] = (0.75, 0.92)  # fractions of the run (or absolute iterations)
    lr_gamma: float = TrainSpec.lr_gamma
    clip_grad: float = TrainSpec.clip_grad
    amp: bool = TrainSpec.amp
    scale_jitter: float = 0.25
    flip: bool = TrainSpec.flip
    checkpoint_every: int = TrainSpec.checkpoint_every
    keep_checkpoints: int = 3
    eval_every: int = TrainSpec.eval_every
    max_failures: int = 3
    seed: int = TrainSpec.seed
    log_every: int | None = None
    loader_workers: int | None = None
    endpoint_url: str | None = None
    anon: bool | None = None
    address: str | None = None
    init: str | None = None  # pretrained weights (pipeline.train.init)
    class_map: str | None = None  # "old=new,...": init class names renamed before matching
    trainable_layers: str | None = None  # maskrcnn.transfer.TRAINABLE_LAYERS (fine-tune: 3+)
    train_norms: bool = False  # keep BatchNorm training in a fine-tune (default: frozen)


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
        init=fix(opts.init),
    )


def uri_options(uri: str, opts: TrainOptions) -> dict[str, Any]:
    """fsspec options for ``uri`` from the flags (endpoint, anonymous access)."""
    return storage.storage_options(uri, endpoint_url=opts.endpoint_url, anon=opts.anon)


def run_name(opts: TrainOptions) -> str:
    """NAME of STORAGE/NAME: --name, else :func:`default_name`."""
    return opts.name or default_name(opts)


def default_name(opts: TrainOptions) -> str:
    """A run name from the preset/config and the data: the same command names the same run."""
    source = opts.config or (opts.init and not opts.preset and opts.init.rstrip("/")) or "config"
    what = opts.preset or os.path.splitext(os.path.basename(source))[0]
    data = [p for p in opts.data.split("://", 1)[-1].rstrip("/").split("/") if p]
    tail = "-".join(data[-2:]) if data else "data"
    if tail.endswith(".json"):
        tail = tail[: -len(".json")]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{what}-{tail}")


def _config_file(opts: TrainOptions, class_names: list[str]) -> tuple[str, dict[str, Any]]:
    """(preset, field overrides) of the --config file (JSON or YAML)."""
    fs, path = storage.get_fs(opts.config, uri_options(opts.config, opts))
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {storage.redact(opts.config)}: no such file") from None
    try:
        overrides = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {storage.redact(opts.config)}: not JSON/YAML ({exc})") from None
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
    return preset, overrides


def model_config(opts: TrainOptions, class_names: list[str], init: Any = None) -> dict[str, Any]:
    """The MaskRCNNConfig dict for the run: preset or file (else the --init's architecture),
    classes from the data, size flags, and what trains (:func:`_fine_tune_fields`)."""
    # lazy: the driver imports this module, and its flag and data errors come before
    # torchvision and maskrcnn load (1.2 s after torch, measured)
    from maskrcnn import MaskRCNNConfig

    preset, overrides = opts.preset, {}
    if opts.config:
        preset, overrides = _config_file(opts, class_names)
    if opts.min_size:
        overrides["min_size"] = opts.min_size
    if opts.max_size:
        overrides["max_size"] = opts.max_size
    base: dict[str, Any] = {}
    if init is not None and not (opts.preset or opts.config):
        if init.config is None:
            preset = _body_preset(opts, init)
        else:
            base = {k: v for k, v in init.config.items() if k not in ("num_classes", "class_names")}
    try:
        if base:
            cfg = MaskRCNNConfig.from_dict(
                {**base, **overrides, "num_classes": len(class_names), "class_names": class_names}
            )
        else:
            cfg = MaskRCNNConfig.preset(
                preset or "r50-fpn", num_classes=len(class_names), class_names=class_names,
                **overrides,
            )  # fmt: skip
    except TypeError as exc:  # an unknown field in the file
        raise ValueError(f"--config: {exc}") from None
    return cfg.replace(**_fine_tune_fields(opts, cfg)).to_dict()


# The architecture an --init that is a ResNet classification body defaults to.
BODY_PRESETS = {"resnet50": "r50-fpn", "resnet101": "r101-fpn"}


def _body_preset(opts: TrainOptions, init: Any) -> str:
    if init.backbone not in BODY_PRESETS:
        raise ValueError(
            f"--init {storage.redact(opts.init)}: a {init.backbone} body has no default "
            "architecture; give --preset or --config"
        )
    return BODY_PRESETS[init.backbone]


def _fine_tune_fields(opts: TrainOptions, cfg: Any) -> dict[str, Any]:
    """trainable_layers from --trainable-layers (a fine-tune's default: 3+), and frozen
    backbone norms whenever layers are frozen or weights are pretrained (unless
    --train-norms), as torchvision's pretrained models have."""
    from maskrcnn.transfer import FINE_TUNE_LAYERS, trainable_layers  # lazy: see model_config

    layers = opts.trainable_layers or (FINE_TUNE_LAYERS if opts.init else None)
    if layers is None:
        return {}
    fields: dict[str, Any] = {"trainable_layers": trainable_layers(layers)}
    if cfg.norm == "bn" and not opts.train_norms and (opts.init or layers != "all"):
        fields["norm"] = "frozen_bn"
    return fields


def plan_iterations(opts: TrainOptions, data_size: int) -> int:
    """Optimizer steps of the run: --iters, or --epochs (default 1) of the global batch."""
    if opts.workers < 1 or opts.batch_size < 1:
        raise ValueError("--workers and --batch-size must be at least 1")
    if data_size < opts.workers:
        raise ValueError(
            f"--data has {data_size} usable images, fewer than --workers {opts.workers}"
        )
    if opts.iters is not None:
        n = opts.iters
    else:
        epochs = 1.0 if opts.epochs is None else opts.epochs
        n = math.ceil(epochs * math.ceil(data_size / (opts.workers * opts.batch_size)))
    if n < 1:
        raise ValueError(f"nothing to train: {n} iterations (--iters/--epochs)")
    return n


def init_record(
    opts: TrainOptions, init: Any, cfg: dict[str, Any], class_names: list[str]
) -> dict[str, Any]:
    """What the run takes from --init (JSON values): the URI, what it is, the class
    mapping, what trains. Checks shapes against --preset/--config first."""
    # lazy: pipeline.train.init loads maskrcnn, as model_config says
    from maskrcnn.transfer import FINE_TUNE_LAYERS
    from pipeline.train.init import check_shapes, map_classes, parse_class_map

    name = f"--init {storage.redact(opts.init)}"
    if opts.preset or opts.config:
        what = f"--preset {opts.preset}" if opts.preset else f"--config {opts.config}"
        check_shapes(init, cfg, name, what)
    renames = parse_class_map(opts.class_map)
    record: dict[str, Any] = {
        "uri": opts.init,
        "kind": init.kind,
        "trainable_layers": opts.trainable_layers or FINE_TUNE_LAYERS,
        "pairs": [],
        "kept": {},
        "new": class_names[1:],
        "classes": "heads initialised fresh (a classification body has no detection classes)",
    }
    if init.config is None:
        if renames:
            raise ValueError(f"--class-map: {name} is a classification body, it has no classes")
        return record
    mapping = map_classes(init.class_names, class_names, renames, name)
    record.update(pairs=mapping.pairs, kept=mapping.kept, new=mapping.new, classes=mapping.line())
    return record


def plan_spec(
    opts: TrainOptions, data_size: int, class_names: list[str], init: Any = None
) -> TrainSpec:
    """The worker spec: iteration count, schedule and defaults resolved from the options
    (``init``: the --init's pipeline.train.init.Init, read by the driver)."""
    if opts.class_map and not opts.init:
        raise ValueError("--class-map renames the classes of an --init; give --init too")
    n = plan_iterations(opts, data_size)
    if opts.checkpoint_every < 1 or opts.keep_checkpoints < 1:
        raise ValueError("--checkpoint-every and --keep-checkpoints must be at least 1")
    lr = opts.lr if opts.lr is not None else base_lr(opts.workers * opts.batch_size)
    warmup = opts.warmup_iters if opts.warmup_iters is not None else default_warmup(n)
    loader_workers = opts.loader_workers
    if loader_workers is None:
        loader_workers = 2 if opts.gpus_per_worker > 0 else 0
    run_uri = storage.join(opts.storage, run_name(opts))
    cfg = model_config(opts, class_names, init)
    return TrainSpec(
        data=opts.data,
        val_data=opts.val_data,
        model_config=cfg,
        init=init_record(opts, init, cfg, class_names) if init is not None else None,
        init_options=uri_options(opts.init, opts) if opts.init else {},
        iterations=n,
        batch_size=opts.batch_size,
        lr=lr,
        storage=run_uri,
        data_options=uri_options(opts.data, opts),
        val_options=uri_options(opts.val_data, opts) if opts.val_data else {},
        storage_options=uri_options(run_uri, opts),
        momentum=opts.momentum,
        weight_decay=opts.weight_decay,
        warmup_iters=warmup,
        lr_steps=step_iterations(opts.lr_steps, n),
        lr_gamma=opts.lr_gamma,
        clip_grad=opts.clip_grad,
        amp=opts.amp,
        scale_jitter=opts.scale_jitter,
        flip=opts.flip,
        checkpoint_every=opts.checkpoint_every,
        eval_every=opts.eval_every,
        log_every=opts.log_every or max(1, min(100, n // 25)),
        seed=opts.seed,
        loader_workers=loader_workers,
        cpus_per_worker=opts.cpus_per_worker,
    )
