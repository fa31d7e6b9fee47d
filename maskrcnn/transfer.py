"""Transfer learning: the class-indexed tensors of a model, copied by class, and which
backbone stages train.

A model's classes live in three places: the box predictor's score rows (one per
class), its box-regression rows (four per class) and the mask head's logit
channels (one per class). Fine-tuning onto new classes copies the rows of the
classes both label sets share and leaves the others as freshly initialised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

CLASS_TENSORS: dict[str, int] = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
    "roi_heads.mask_head.logits.weight": 1,
    "roi_heads.mask_head.logits.bias": 1,
}
"""State-dict keys indexed by class along dim 0, with the rows each class has."""

TRAINABLE_LAYERS: dict[str, int] = {"heads": 0, "5+": 1, "4+": 2, "3+": 3, "2+": 4, "all": 5}
"""matterport's names for what trains -> MaskRCNNConfig.trainable_layers (ResNet stages
trainable from the top). ``heads``: RPN, FPN and RoI heads only; ``5+``: and ResNet
stage 5 (layer4); ... ``all``: the whole body, conv1 included. torchvision's default: 3+."""

FINE_TUNE_LAYERS = "3+"
"""What trains in a fine-tune unless --trainable-layers says otherwise (torchvision's
pretrained default)."""


@torch.no_grad()
def copy_class_rows(
    target: dict[str, Tensor], source: dict[str, Tensor], pairs: Iterable[tuple[int, int]]
) -> None:
    """Copy the class-indexed rows of ``source`` into ``target`` in place.

    Args:
        target (dict[str, Tensor]): a model's state dict (tensors sharing the
            model's storage, as ``model.state_dict()`` gives), num_classes C.
        source (dict[str, Tensor]): the state dict rows come from, C' classes.
        pairs (iterable of (int, int)): (label in target, label in source); include
            (0, 0) to copy the background. Rows of labels not named stay as they are.

    For every key of CLASS_TENSORS present in both, rows ``[r*label, r*label + r)``
    (r: rows per class) of ``source`` replace those of ``target``.
    """
    pairs = list(pairs)
    for key, rows in CLASS_TENSORS.items():
        if key not in target or key not in source:
            continue
        dst, src = target[key], source[key]
        if dst.shape[1:] != src.shape[1:]:
            raise ValueError(f"{key}: per-class shape {list(src.shape[1:])} in the source, "
                             f"{list(dst.shape[1:])} in the target")  # fmt: skip
        for new, old in pairs:
            dst[rows * new : rows * (new + 1)] = src[rows * old : rows * (old + 1)].to(dst)


def trainable_layers(name: str) -> int:
    """The MaskRCNNConfig.trainable_layers of a TRAINABLE_LAYERS name (ValueError otherwise)."""
    if name not in TRAINABLE_LAYERS:
        raise ValueError(
            f"--trainable-layers {name!r}: expected one of {', '.join(TRAINABLE_LAYERS)}"
        )
    return TRAINABLE_LAYERS[name]
