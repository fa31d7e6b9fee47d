"""TrainSpec: everything a Ray Train worker is told about its run, as plain values.

The driver resolves `maskrcnn train`'s flags into one (pipeline.train.options);
it travels to every worker as TorchTrainer's ``train_loop_config`` (a dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainSpec:
    """Everything a worker needs, as plain values (it travels in train_loop_config)."""

    data: str
    model_config: dict[str, Any]
    iterations: int
    batch_size: int  # images per worker per iteration
    lr: float
    storage: str  # STORAGE/NAME as a URI: where workers write their status files
    val_data: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)  # fsspec options per URI
    val_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip_grad: float = 10.0  # max gradient L2 norm; 0 turns clipping off
    amp: bool = False
    scale_jitter: float = 0.0
    flip: bool = True
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: only at the end (when val_data is given)
    log_every: int = 20
    seed: int = 0
    loader_workers: int = 0
    cpus_per_worker: float = 1.0
    init: dict[str, Any] | None = None  # --init: options.init_record (uri, kind, class pairs)
    init_options: dict[str, Any] = field(default_factory=dict)
