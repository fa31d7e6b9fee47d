"""`maskrcnn train --init URI`: start from pretrained weights, keeping the classes that stay.

An init is one of (found by its contents, not its name):

    our safetensors checkpoint (any preset)          architecture + class names in its metadata
    torchvision Mask R-CNN v1/v2 (.pth or .safetensors)  through maskrcnn.checkpoint.from_torchvision
    torchvision ResNet-18/34/50/101 classification   the body only; the rest as for a fresh model

The driver reads it once to settle the run's architecture, check shapes and map
classes by name (pipeline.train.options.init_record); the mapping travels in the
TrainSpec, and when a run starts without a checkpoint of its own, rank 0 reads the
init again, loads it and sends its weights to the other ranks (:func:`apply_init`). A
resumed run restores its checkpoint instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.backbone import RESNET_LAYOUTS
from maskrcnn.checkpoint import (
    FORMAT,
    CheckpointError,
    from_torchvision,
    is_pickle,
    model_from_safetensors,
    read_metadata,
    torchvision_state_from_bytes,
)
from maskrcnn.transfer import CLASS_TENSORS, copy_class_rows
from pipeline import storage

MASK_RCNN_KEY = "roi_heads.box_predictor.cls_score.weight"
NOT_A_CLASS = ("N/A", "__background__")  # torchvision's unused COCO ids, and the background
# (blocks per stage, bottleneck) -> torchvision ResNet name
RESNETS = {(depths, bottleneck): name for name, (bottleneck, depths) in RESNET_LAYOUTS.items()}


@dataclass
class Init:
    """Pretrained weights in our key names, and what they are."""

    kind: str  # e.g. "torchvision Mask R-CNN v1 state dict (91 classes)"
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # MaskRCNNConfig dict; None for a classification body
    backbone: str

    @property
    def class_names(self) -> list[str]:
        return list((self.config or {}).get("class_names") or [])


def _read(uri: str, options: dict[str, Any]) -> bytes:
    fs, path = storage.get_fs(uri, options)
    try:
        return storage.retrying(fs.cat_file, path, what=f"read {storage.redact(uri)}")
    except FileNotFoundError:
        raise FileNotFoundError(f"--init {storage.redact(uri)}: no such file") from None


def read_init(uri: str, options: dict[str, Any]) -> Init:
    """The init at ``uri``; a CheckpointError (a ValueError) naming it for anything else."""
    data, name = _read(uri, options), f"--init {storage.redact(uri)}"
    if not is_pickle(data) and read_metadata(data, name).get("format") == FORMAT:
        model = model_from_safetensors(data, name, pickle_hint="", torchvision_hint="")
        return Init(
            f"maskrcnn checkpoint ({model.cfg.backbone}, {model.cfg.num_classes} classes)",
            model.state_dict(),
            model.cfg.to_dict(),
            model.cfg.backbone,
        )
    sd = torchvision_state_from_bytes(data, name)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if MASK_RCNN_KEY in sd:
        return _torchvision_detector(sd, name)
    if "fc.weight" in sd and "layer4.0.conv1.weight" in sd:
        return _resnet_body(sd, name)
    raise CheckpointError(
        f"{name}: neither a maskrcnn checkpoint, a torchvision Mask R-CNN state dict nor a "
        f"torchvision ResNet classification state dict (keys {sorted(sd)[:3]})"
    )


def _torchvision_detector(sd: dict[str, torch.Tensor], name: str) -> Init:
    variant = "v2" if any(k.startswith("roi_heads.box_head.0.") for k in sd) else "v1"
    try:
        model = from_torchvision(sd, variant=variant)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    n = model.cfg.num_classes
    return Init(
        f"torchvision Mask R-CNN {variant} state dict ({n} classes)",
        model.state_dict(),
        model.cfg.to_dict(),
        model.cfg.backbone,
    )


def _resnet_body(sd: dict[str, torch.Tensor], name: str) -> Init:
    blocks = tuple(
        len({m[1] for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)
    )
    backbone = RESNETS.get((blocks, "layer1.0.conv3.weight" in sd))
    if backbone is None:
        raise CheckpointError(f"{name}: a ResNet of {blocks} blocks per stage is not one we build")
    state = {f"backbone.body.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    return Init(f"torchvision {backbone} classification state dict (body only)", state, None,
                backbone)  # fmt: skip


def parse_class_map(text: str | None) -> dict[str, str]:
    """``old=new,...`` -> {old: new}; ValueError naming the bad item."""
    renames: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--class-map {item!r}: expected OLD=NEW (an init class = a new name)")
        renames[old.strip()] = new.strip()
    return renames


@dataclass
class ClassMapping:
    """Which labels of the run come from which labels of the init."""

    pairs: list[tuple[int, int]]  # (run label, init label), background (0, 0) first
    kept: dict[str, str]  # run class name -> init class name
    new: list[str]  # run classes initialised fresh
    init_classes: int  # named classes of the init (without background and N/A)

    def line(self) -> str:
        """kept N of M classes (names), new K (names)."""
        kept = ", ".join(k if k == v else f"{v} -> {k}" for k, v in self.kept.items())
        return (
            f"kept {len(self.kept)} of {self.init_classes} classes ({kept or 'none'}), "
            f"new {len(self.new)} ({', '.join(self.new) or 'none'})"
        )


def map_classes(
    init_names: list[str], run_names: list[str], renames: dict[str, str], what: str
) -> ClassMapping:
    """Match the run's class names (the data's categories) against the init's, by name.

    ``renames`` ({init name: run name}, from --class-map) applies first. Index 0
    of both lists is the background, always kept.
    """
    if not init_names:
        raise ValueError(
            f"{what}: has no class names, so none can be matched to --data's categories "
            "(give an init whose config holds class_names)"
        )
    index: dict[str, int] = {}
    for i, n in enumerate(init_names):
        if i > 0 and n not in NOT_A_CLASS:
            index.setdefault(n, i)
    for old in renames:
        if old not in index:
            raise ValueError(f"--class-map {old}={renames[old]}: {what} has no class {old!r}")
    renamed = {renames.get(n, n): i for n, i in index.items()}
    pairs, kept, new = [(0, 0)], {}, []
    for label, n in enumerate(run_names[1:], start=1):
        if n in renamed:
            pairs.append((label, renamed[n]))
            kept[n] = init_names[renamed[n]]
        else:
            new.append(n)
    return ClassMapping(pairs, kept, new, len(index))


def _skipped(key: str) -> bool:
    """Tensors that need not agree: class-indexed rows (mapped) and BN step counters."""
    return key in CLASS_TENSORS or key.endswith("num_batches_tracked")


def check_shapes(init: Init, cfg: dict[str, Any], name: str, what: str) -> None:
    """ValueError naming the first tensor in which ``init`` and a model of ``cfg`` differ.

    A classification init is compared on the ResNet body only; class-indexed tensors
    on their per-class shape (their class counts differ by design).
    """
    with torch.device("meta"):
        own = MaskRCNN(MaskRCNNConfig.from_dict(cfg)).state_dict()
    for k, v in own.items():
        if _skipped(k) or (init.config is None and not k.startswith("backbone.body.")):
            continue
        if k not in init.state:
            raise ValueError(f"{name} does not fit {what}: {what} has {k}, the init does not")
        if init.state[k].shape != v.shape:
            raise ValueError(
                f"{name} does not fit {what}: {k} is {list(init.state[k].shape)} in the init, "
                f"{list(v.shape)} in {what}"
            )
    extra = [k for k in init.state if not _skipped(k) and k not in own]
    if extra:
        raise ValueError(f"{name} does not fit {what}: the init has {extra[0]}, {what} does not")
    for k in CLASS_TENSORS:
        if k in init.state and init.state[k].shape[1:] != own[k].shape[1:]:
            raise ValueError(f"{name} does not fit {what}: {k} rows differ in shape")


@torch.no_grad()
def load_init(model: torch.nn.Module, init: Init, pairs: list[tuple[int, int]]) -> None:
    """Copy ``init`` into ``model`` in place: every tensor both have (shapes checked by
    :func:`check_shapes`), and the class rows of ``pairs`` (run label, init label)."""
    own = model.state_dict()
    for k, v in init.state.items():
        if not _skipped(k) and k in own:
            own[k].copy_(v)
    copy_class_rows(own, init.state, pairs)


def apply_init(model: torch.nn.Module, record: dict[str, Any], options: dict[str, Any]) -> None:
    """Load the init a TrainSpec's ``init`` record names into ``model``.

    In a worker group (torch.distributed initialised, more than one rank) rank 0 alone
    reads the file and sends the model's tensors to the others: one download of an
    init of hundreds of MB, not one per worker. Every rank must call it.
    """
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not group or dist.get_rank() == 0:
        init = read_init(record["uri"], options)
        load_init(model, init, [tuple(p) for p in record["pairs"]])
    if group:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
