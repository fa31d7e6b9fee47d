"""torchvision reference models for parity tests and benchmarks.

Built as torchvision builds its COCO-trained models (v1: FrozenBatchNorm2d
body with epsilon 0; v2: FrozenBatchNorm2d body, BatchNorm FPN and heads),
with seeded random weights made to behave like trained ones: every
normalisation layer gets the statistics of its real input on calibration
images (so activations stay normalised, as in a trained network), the box
classifier is sharpened so that images have dozens of detections, and the
mask logits get a bias and gain so that masks are not flat at 0.5.
"""

from __future__ import annotations

import torch
from torch import nn


def build_torchvision(variant: str, num_classes: int, seed: int = 0) -> nn.Module:
    """An untrained torchvision Mask R-CNN v1/v2 with COCO-model layers, seeded."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import (
        FastRCNNConvFCHead,
        RPNHead,
        _default_anchorgen,
    )
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(seed)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if variant == "v1":
        model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 0.0
    elif variant == "v2":
        backbone = _resnet_fpn_extractor(body, 3, norm_layer=nn.BatchNorm2d)
        model = MaskRCNN(
            backbone,
            num_classes=num_classes,
            rpn_anchor_generator=_default_anchorgen(),
            rpn_head=RPNHead(256, 3, conv_depth=2),
            box_head=FastRCNNConvFCHead(
                (256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
            ),
            mask_head=MaskRCNNHeads(256, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d),
        )
    else:
        raise ValueError(variant)
    return model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, images: list[torch.Tensor], seed: int = 0) -> nn.Module:
    """Give a reference model trained-like statistics and outputs (see module docstring).

    images: float [3, H, W] in 0..1, passed once through the model.
    """
    from torchvision.ops import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d | nn.BatchNorm2d)]
    for m in norms:
        n = m.weight.shape[0]
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))

    # Trained ResNets keep residual branches small next to the identity path
    # (their last BN gains end up small); without this a random ResNet-50 is
    # chaotic: a 0.1% input change grows to ~13% at C5.
    for name, m in model.named_modules():
        if name.endswith(".bn3"):
            m.weight.mul_(0.15)

    # Sharpen the classifier first, so the calibration pass has detections and
    # the mask head's normalisation layers (v2) see real RoIs.
    model.roi_heads.box_predictor.cls_score.weight.mul_(8)

    def set_stats(module, inputs):
        x = inputs[0].float()
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            return
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    try:
        model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    logits.bias.copy_(torch.randn(logits.bias.shape, generator=g))
    logits.weight.mul_(4)
    return model


def smooth_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """uint8 [3, H, W] images of smooth random colour fields (structure at several scales)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        x = torch.rand((1, 3, max(2, h // 16), max(2, w // 16)), generator=g)
        x = nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
        x = x + 0.15 * torch.rand((1, 3, h, w), generator=g)
        out.append((x[0].clamp(0, 1) * 255).to(torch.uint8))
    return out
