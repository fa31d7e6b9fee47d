"""maskrcnn.ops: torchvision's kernels without its package, equal to torchvision.ops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision.ops as tv
from conftest import REPO

from maskrcnn import ops


def _boxes(n: int, groups: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 60], dim=1)
    scores = torch.rand(n, generator=g).round(decimals=2)  # ties, where the order could differ
    return boxes, scores, torch.randint(0, groups, (n,), generator=g)


@pytest.mark.parametrize("n", [0, 300, 1500])  # 1500 boxes: past 4000 coordinates, per group
def test_batched_nms_keeps_what_torchvision_keeps_in_its_order(n):
    boxes, scores, groups = _boxes(n, 5, seed=n)
    got = ops.batched_nms(boxes, scores, groups, 0.5)
    assert torch.equal(got, tv.batched_nms(boxes, scores, groups, 0.5))
    assert torch.equal(ops.nms(boxes, scores, 0.3), tv.nms(boxes, scores, 0.3))
    assert torch.equal(ops.box_iou(boxes, boxes[:7]), tv.box_iou(boxes, boxes[:7]))


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_and_its_gradient_equal_torchvision(aligned):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 20, 24, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, 5.5, 0.5, 40.0, 38.0]])
    with torch.no_grad():
        got = ops.roi_align(features, rois, (7, 7), 0.5, 2, aligned)
    assert torch.equal(got, tv.roi_align(features, rois, (7, 7), 0.5, 2, aligned))
    grads = []
    for roi_align in (ops.roi_align, tv.roi_align):
        x = features.clone().requires_grad_(True)
        roi_align(x, rois, (7, 7), 0.5, 2, aligned).square().sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_a_model_is_built_and_run_without_importing_torchvision():
    """What an actor imports to predict: torch, and torchvision's op library alone."""
    code = (
        "import sys, torch\n"
        "from maskrcnn import MaskRCNN, MaskRCNNConfig\n"
        "import maskrcnn.checkpoint\n"
        "model = MaskRCNN(MaskRCNNConfig.preset('tiny', num_classes=3)).eval()\n"
        "with torch.no_grad():\n"
        "    model.predict([torch.zeros(3, 64, 64, dtype=torch.uint8)])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
