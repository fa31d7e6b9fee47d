"""What one worker trains: the model with its optimizer, lr scheduler and grad scaler.

Built the same on every rank (same seed: same initial weights), restored from
and saved to a checkpoint directory (pipeline.train.checkpoint), wrapped in
DDP, and stepped once per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray.train.torch
import torch

from maskrcnn import MaskRCNN, MaskRCNNConfig
from pipeline.train.amp import amp_mode, autocast, fast_path, grad_scaler
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.data import input_size
from pipeline.train.init import apply_init
from pipeline.train.schedule import lr_factor
from pipeline.train.spec import TrainSpec


@dataclass
class Learner:
    """The model (a maskrcnn.MaskRCNN) and everything that updates it."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: str  # pipeline.train.amp mode
    device: torch.device
    clip_grad: float
    ddp_model: Any = None  # the model in DDP, after wrap_ddp()
    init: dict[str, Any] | None = None  # the spec's --init record (into checkpoint metadata)

    @classmethod
    def build(cls, spec: TrainSpec, device: torch.device) -> Learner:
        """A fresh model from the spec's config, with SGD and the spec's lr schedule."""
        torch.manual_seed(spec.seed)  # same initial weights on every rank (DDP also broadcasts)
        model = MaskRCNN(MaskRCNNConfig.from_dict(spec.model_config)).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec))
        amp = amp_mode(spec.amp, device)
        scaler = grad_scaler(amp, device)
        return cls(
            model, params, optimizer, scheduler, scaler, amp, device, spec.clip_grad,
            init=spec.init,
        )  # fmt: skip

    @property
    def fast(self) -> bool:
        """Whether the model runs its bf16 fast path (training and evaluation alike)."""
        return fast_path(self.amp)

    def start(
        self, directory: str | None, init: dict[str, Any] | None, options: dict[str, Any]
    ) -> int:
        """The iteration to start at: a checkpoint directory's (restored; ``init`` is then
        not re-applied: the run's own weights win), else 0 after loading ``init`` (a
        TrainSpec's --init record, read with fsspec ``options``) when there is one."""
        if directory is not None:
            return self.restore(directory)
        if init:
            apply_init(self.model, init, options)
        return 0

    def restore(self, directory: str) -> int:
        """Load a checkpoint directory; returns its iteration."""
        return load_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.scaler)

    def save(self, directory: str, iteration: int, metrics: dict[str, Any]) -> None:
        """Write a checkpoint directory of the state after ``iteration`` steps."""
        save_checkpoint(
            directory, self.model, self.optimizer, self.scheduler, self.scaler, iteration, metrics,
            init=self.init,
        )  # fmt: skip

    def wrap_ddp(self) -> None:
        """Set the model's layout, then wrap it in DDP (ray.train.torch.prepare_model)."""
        # Conv weights channels_last before DDP wraps the model. On CPU, oneDNN returns
        # convolution weight gradients channels_last even for contiguous weights, and
        # in the first backward after DDP is built (the first iteration of every
        # start and restart) DDP wrote the averaged gradient back into such a
        # gradient's memory in its bucket's contiguous order: a scrambled step
        # (torch 2.14, gloo; seen as a resumed run diverging from the uninterrupted
        # one). With channels_last weights, gradients, buckets and weights agree; the
        # bf16 fast path wants this layout anyway.
        self.model.to_layout(channels_last=True)
        self.ddp_model = ray.train.torch.prepare_model(self.model)

    def step(
        self, images: list, targets: list[dict], size: tuple[int, int], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step on a batch at input ``size`` (min, max); (loss, its parts).

        ``step`` is the number of optimizer steps done after this one (for the
        error a non-finite loss raises).
        """
        with input_size(self.model, *size), autocast(self.amp, self.device):
            loss_dict = self.ddp_model(images, targets, fast=self.fast)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {step} "
                f"({ {k: round(v.item(), 4) for k, v in loss_dict.items()} }); "
                "lower --lr or raise --warmup-iters"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, loss_dict
