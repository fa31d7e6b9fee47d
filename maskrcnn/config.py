"""Every knob of the model in one dataclass, each with its paper / torchvision default."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FPN_LEVELS: tuple[int, ...] = (2, 3, 4, 5, 6)
"""The pyramid levels the backbone returns, in order: P_k has stride 2**k (P6: P5 pooled)."""

RUN_OPTIONS: tuple[str, ...] = ("channels_last", "fast")
"""Keys older configs held that are run options now, not architecture: predict(fast=...)
and MaskRCNN.to_layout(channels_last). from_dict drops them."""


@dataclass
class MaskRCNNConfig:
    # --- classes -------------------------------------------------------------
    num_classes: int = 91
    """Number of classes including background (label 0). COCO: 91 (torchvision's ids)."""
    class_names: list[str] = field(default_factory=list)
    """Names indexed by label; class_names[0] is the background. Empty: "class_<i>"."""

    # --- backbone ------------------------------------------------------------
    backbone: str = "resnet50"
    """ResNet body: resnet18/34/50/101. Paper: ResNet-50/101 (C2..C5 feed the FPN)."""
    norm: str = "frozen_bn"
    """Backbone normalisation: frozen_bn (pretrained, paper), bn (train from scratch)."""
    frozen_bn_eps: float = 1e-5
    """FrozenBatchNorm epsilon. torchvision's COCO-trained v1 weights expect 0.0."""
    trainable_layers: int = 3
    """ResNet stages left trainable, counted from the top (5 = all; torchvision: 3)."""
    fpn_channels: int = 256
    """Channels of every FPN level P2..P6 (paper: 256)."""
    fpn_norm: bool = False
    """BatchNorm in the FPN's lateral and output convs (torchvision v2: True)."""

    # --- anchors / RPN -------------------------------------------------------
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    """Anchor side (pixels) per FPN level P2..P6, one scale per level (paper: 32..512)."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Anchor height/width ratios at every level (paper: 1:2, 1:1, 2:1)."""
    rpn_conv_depth: int = 1
    """3x3 convs in the RPN head before its two 1x1 outputs (torchvision v2: 2)."""
    rpn_pre_nms_top_n_train: int = 2000
    """Top-scoring anchors kept per FPN level before NMS, training."""
    rpn_pre_nms_top_n_test: int = 1000
    """Top-scoring anchors kept per FPN level before NMS, inference."""
    rpn_post_nms_top_n_train: int = 2000
    """Proposals kept per image after NMS, training."""
    rpn_post_nms_top_n_test: int = 1000
    """Proposals kept per image after NMS, inference (paper: 1000)."""
    rpn_nms_thresh: float = 0.7
    """IoU threshold of the proposal NMS (paper: 0.7)."""
    rpn_fg_iou_thresh: float = 0.7
    """Anchor IoU with a ground-truth box at or above which it is positive (paper: 0.7)."""
    rpn_bg_iou_thresh: float = 0.3
    """Anchor IoU below which it is negative (paper: 0.3); between: ignored."""
    rpn_batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN losses (paper: 256)."""
    rpn_positive_fraction: float = 0.5
    """Largest share of positives among the sampled anchors (paper: 50%)."""
    rpn_score_thresh: float = 0.0
    """Proposals with objectness probability below this are dropped."""

    # --- RoI heads -----------------------------------------------------------
    box_roi_size: int = 7
    """RoIAlign output for the box head (paper: 7x7)."""
    mask_roi_size: int = 14
    """RoIAlign output for the mask head (paper: 14x14); masks come out at twice this."""
    roi_sampling_ratio: int = 2
    """Bilinear samples per RoIAlign bin and axis (paper: 2x2 = 4 points)."""
    roi_align_aligned: bool = False
    """Half-pixel offset in RoIAlign (detectron2: True; torchvision: False)."""
    canonical_scale: int = 224
    """FPN level assignment: a box of this side goes to canonical_level (paper: 224)."""
    canonical_level: int = 4
    """FPN level assignment: the level of a canonical_scale box (paper: P4)."""
    roi_pool_levels: tuple[int, ...] = (2, 3, 4, 5)
    """FPN levels P2..P5 RoIAlign pools from (paper): consecutive, among FPN_LEVELS."""
    box_head: str = "2fc"
    """Box head: "2fc" (two 1024-d fc, paper) or "4conv1fc" (torchvision v2, BatchNorm)."""
    box_head_dim: int = 1024
    """Width of the box head's fc layers (paper: 1024)."""
    box_fg_iou_thresh: float = 0.5
    """Proposal IoU at or above which a RoI is foreground (paper: 0.5)."""
    box_bg_iou_thresh: float = 0.5
    """Proposal IoU below which a RoI is background (paper: 0.5)."""
    box_batch_size_per_image: int = 512
    """RoIs sampled per image for the head losses (paper: 512)."""
    box_positive_fraction: float = 0.25
    """Largest share of foreground RoIs in the sample (paper: 25%)."""
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    """Weights of the RoI box coding (t_x, t_y, t_w, t_h) (Detectron: 10, 10, 5, 5)."""
    mask_head_channels: tuple[int, ...] = (256, 256, 256, 256)
    """Channels of the mask head's 3x3 convs (paper: four of 256)."""
    mask_head_norm: bool = False
    """BatchNorm in the mask head convs (torchvision v2: True)."""

    # --- inference -----------------------------------------------------------
    box_score_thresh: float = 0.05
    """Detections below this class probability are dropped."""
    box_nms_thresh: float = 0.5
    """Per-class NMS IoU threshold on the final detections (paper: 0.5)."""
    detections_per_img: int = 100
    """Most detections kept per image (paper: 100)."""
    mask_threshold: float = 0.5
    """Pasted mask probability above which a pixel is in the object (paper: 0.5)."""

    # --- input ---------------------------------------------------------------
    min_size: int = 800
    """Shorter image side after resizing (paper: 800)."""
    max_size: int = 1333
    """Cap on the longer side after resizing (paper: 1333)."""
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean of 0..1 RGB input (ImageNet)."""
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel std of 0..1 RGB input (ImageNet)."""
    size_divisible: int = 32
    """Batched images are zero-padded to a multiple of this (the coarsest stride)."""

    def __post_init__(self) -> None:
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        self.bbox_reg_weights = tuple(float(w) for w in self.bbox_reg_weights)
        self.mask_head_channels = tuple(int(c) for c in self.mask_head_channels)
        self.roi_pool_levels = tuple(int(k) for k in self.roi_pool_levels)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.validate()

    # ------------------------------------------------------------------------
    def validate(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is "
                f"{self.num_classes} (class_names[0] is the background)"
            )
        if self.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown backbone {self.backbone!r}")
        if self.norm not in ("frozen_bn", "bn"):
            raise ValueError(f"unknown norm {self.norm!r} (frozen_bn or bn)")
        if self.box_head not in ("2fc", "4conv1fc"):
            raise ValueError(f"unknown box_head {self.box_head!r} (2fc or 4conv1fc)")
        if len(self.anchor_sizes) != len(FPN_LEVELS):
            raise ValueError("anchor_sizes needs one size per FPN level P2..P6 (5 values)")
        self._validate_pool_levels()
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {self.trainable_layers}")

    def _validate_pool_levels(self) -> None:
        levels = self.roi_pool_levels
        if not levels or not set(levels) <= set(FPN_LEVELS):
            raise ValueError(f"roi_pool_levels must be FPN levels {FPN_LEVELS}, got {levels}")
        if list(levels) != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"roi_pool_levels must be consecutive and ascending, got {levels}")
        if not levels[0] <= self.canonical_level <= levels[-1]:
            raise ValueError(
                f"canonical_level {self.canonical_level} must be one of roi_pool_levels {levels}"
            )

    @property
    def mask_resolution(self) -> int:
        """Side of the predicted masks: the mask head upsamples its RoI by 2."""
        return 2 * self.mask_roi_size

    @property
    def label_names(self) -> list[str]:
        """class_names, or generated names when none were given."""
        if self.class_names:
            return list(self.class_names)
        return ["__background__"] + [f"class_{i}" for i in range(1, self.num_classes)]

    # ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskRCNNConfig:
        """The config of a to_dict() dict; keys in RUN_OPTIONS (older checkpoints and
        manifests hold them) are dropped, any other unknown key is a ValueError."""
        d = {k: v for k, v in d.items() if k not in RUN_OPTIONS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> MaskRCNNConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(
        cls,
        name: str,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        **overrides: Any,
    ) -> MaskRCNNConfig:
        """A named architecture: r50-fpn, r50-fpn-v2, r101-fpn or tiny.

        ``num_classes`` defaults to len(class_names), else 91 (COCO).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        if num_classes is None:
            num_classes = len(class_names) if class_names else 91
        values = dict(PRESETS[name])
        values.update(num_classes=num_classes, class_names=list(class_names or []))
        values.update(overrides)
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's maskrcnn_resnet50_fpn.
    "r50-fpn": {},
    # torchvision's maskrcnn_resnet50_fpn_v2 (Benchmarking Detection Transfer Learning with ViTs).
    "r50-fpn-v2": {
        "fpn_norm": True,
        "rpn_conv_depth": 2,
        "box_head": "4conv1fc",
        "mask_head_norm": True,
    },
    # The paper's deeper body.
    "r101-fpn": {"backbone": "resnet101"},
    # Small enough to train from scratch in minutes on 2 CPU cores (128 px shapes).
    "tiny": {
        "backbone": "resnet18",
        "norm": "bn",
        "trainable_layers": 5,
        "fpn_channels": 64,
        "anchor_sizes": (8, 16, 32, 64, 128),
        "rpn_pre_nms_top_n_train": 600,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_train": 300,
        "rpn_post_nms_top_n_test": 150,
        "rpn_batch_size_per_image": 128,
        "box_batch_size_per_image": 128,
        "box_head_dim": 256,
        "mask_head_channels": (64, 64),
        "roi_align_aligned": True,
        "canonical_scale": 56,
        "min_size": 128,
        "max_size": 224,
        "detections_per_img": 30,
    },
}
