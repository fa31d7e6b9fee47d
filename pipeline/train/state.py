"""What a training checkpoint holds, the learning-rate schedule, and evaluation on rank 0.

A checkpoint is a directory:

    model.safetensors   the model alone (maskrcnn.checkpoint.save: usable on its own)
    train_state.pt      optimizer, scheduler and grad-scaler state (tensors and numbers
                        only: loaded with weights_only=True)
    state.json          iteration, model id, metrics at that point

Ray Train copies the directory to ``STORAGE/NAME/checkpoint_<iteration>``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
STATE_FILE = "state.json"


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


def amp_mode(amp: bool, device: torch.device) -> str:
    """'off', 'bf16' (the model's fast path: autocast bf16 + channels_last) or 'fp16' (+ scaler)."""
    if not amp:
        return "off"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def save_checkpoint(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    iteration: int,
    metrics: dict[str, Any],
) -> None:
    """Write a checkpoint directory (module doc) for ``model`` after ``iteration`` steps."""
    from maskrcnn.checkpoint import model_id, save

    os.makedirs(directory, exist_ok=True)
    save(model, os.path.join(directory, MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
        },
        os.path.join(directory, TRAIN_STATE_FILE),
    )
    state = {"iteration": iteration, "model_id": model_id(model), "metrics": metrics}
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> int:
    """Restore everything from a checkpoint directory; returns its iteration."""
    from safetensors.torch import load_file

    tensors = load_file(
        os.path.join(directory, MODEL_FILE), device=str(next(model.parameters()).device)
    )
    model.load_state_dict(tensors)
    state = torch.load(
        os.path.join(directory, TRAIN_STATE_FILE), map_location="cpu", weights_only=True
    )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"])


class Evaluator:
    """COCO bbox/segm AP of a model on a validation set (run on rank 0 only).

    Decoded images are kept in memory after the first pass when the whole set
    fits in ``cache_bytes`` (small validation sets are evaluated often).
    """

    def __init__(
        self,
        val_uri: str,
        class_names: Sequence[str],
        storage_options: dict[str, Any] | None,
        batch_size: int = 8,
        cache_bytes: int = 512 << 20,
    ) -> None:
        from pipeline.formats.coco import CocoDataset
        from pipeline.output.evaluate import label_to_category_ids

        self.data = CocoDataset(val_uri, storage_options=storage_options, train=False)
        self.label_map = label_to_category_ids(class_names, self.data.categories)
        self.batch_size = batch_size
        pixels = sum(3 * im["width"] * im["height"] for im in self.data.coco.dataset["images"])
        self._cache: list | None = [] if pixels <= cache_bytes else None
        self._cached = False

    def _batches(self):
        if self._cached:
            yield from self._cache
            return
        batch_images, batch_ids = [], []
        for image, target in self.data:  # unloadable images are skipped (and logged) here
            batch_images.append(image)
            batch_ids.append(target["image_id"])
            if len(batch_images) == self.batch_size:
                if self._cache is not None:
                    self._cache.append((batch_images, batch_ids))
                yield batch_images, batch_ids
                batch_images, batch_ids = [], []
        if batch_images:
            if self._cache is not None:
                self._cache.append((batch_images, batch_ids))
            yield batch_images, batch_ids
        self._cached = self._cache is not None

    def __call__(self, model: Any, fast: bool) -> dict[str, float]:
        """Metrics ``{bbox_AP, bbox_AP50, ..., segm_AP, ...}`` of ``model`` (a MaskRCNN)."""
        from pipeline.output.evaluate import coco_evaluate, predictions_to_coco_results

        start = time.perf_counter()
        results, ids = [], []
        for images, image_ids in self._batches():
            preds = model.predict(images, fast=fast)
            preds = [{k: v.cpu() for k, v in p.items()} for p in preds]
            results += predictions_to_coco_results(preds, image_ids, self.label_map)
            ids += image_ids
        metrics = coco_evaluate(self.data.coco, results, image_ids=ids)
        flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}
        flat["eval_images"] = len(ids)
        flat["eval_seconds"] = round(time.perf_counter() - start, 2)
        return flat
