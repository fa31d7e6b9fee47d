"""maskrcnn.rpn: head outputs line up with the anchors of every level, and the RPN
losses on a hand-computed case."""

from __future__ import annotations

import pytest
import torch
from helpers.formulas import STRIDES, bce_with_logits, smooth_l1
from helpers.torch_threads import one_thread  # noqa: F401

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.rpn import RPN, flatten_level


def test_model_levels_and_head_outputs_line_up_with_anchors():
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3)
    model = MaskRCNN(cfg).eval()
    padded = (128, 192)
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, *padded))
        logits, deltas = model.rpn.head(feats)
    assert [tuple(f.shape[-2:]) for f in feats] == [(128 // s, 192 // s) for s in STRIDES]
    anchors = model.rpn.anchors(padded, [f.shape[-2:] for f in feats], torch.device("cpu"))
    for a, lg, d in zip(anchors, logits, deltas):
        assert flatten_level(lg, 1).shape[1] == a.shape[0] == lg.shape[-2] * lg.shape[-1] * 3
        assert flatten_level(d, 4).shape[1] == a.shape[0]
    # flatten_level's order is the anchors' (row, column, ratio) order.
    gh, gw, n = 4, 6, 3
    code = torch.zeros(1, n * 4, gh, gw)
    for a in range(n):
        code[0, a * 4] = (
            torch.arange(gh)[:, None] * 100 + torch.arange(gw)[None, :] * 10 + a
        ).float()
    flat = flatten_level(code, 4)[0, :, 0]
    expected = [r * 100 + c * 10 + a for r in range(gh) for c in range(gw) for a in range(n)]
    assert flat.tolist() == expected


def test_rpn_losses_hand_computed():
    cfg = MaskRCNNConfig.preset("tiny", num_classes=2)
    rpn = RPN(cfg, 8)
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 -> positive, target (0, 0, 0, 0)
            [1.0, 0.0, 11.0, 10.0],  # IoU 90/110 -> positive, target (-0.1, 0, 0, 0)
            [0.0, 5.0, 10.0, 15.0],  # IoU 1/3 -> ignored
            [20.0, 20.0, 30.0, 30.0],  # negative
            [40.0, 40.0, 50.0, 50.0],  # negative
        ]
    )
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}, {"boxes": torch.zeros(0, 4)}]
    logits = torch.tensor([[2.0, 0.5, 3.0, -1.0, 1.5], [0.3, -2.0, 1.0, 0.0, -0.7]])
    deltas = torch.tensor(
        [
            [[0.05, -0.2, 0.0, 0.01], [0.1, 0.0, 0.3, 0.0], [9.0] * 4, [7.0] * 4, [5.0] * 4],
            [[6.0] * 4] * 5,  # the empty image has no positives: its deltas never count
        ]
    )
    losses = rpn.losses(logits, deltas, anchors, targets)
    # Sampled: image 0's anchors 0, 1 (y=1), 3, 4 (y=0); all five of image 1 (y=0).
    x = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.3, -2.0, 1.0, 0.0, -0.7])
    y = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0, 0])
    assert losses["loss_objectness"].item() == pytest.approx(bce_with_logits(x, y).mean().item())
    d = torch.tensor([[0.05, -0.2, 0.0, 0.01], [0.1 + 0.1, 0.0, 0.3, 0.0]])
    box = smooth_l1(d, 1 / 9).sum() / 9  # over all sampled anchors of the batch
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(box.item(), rel=1e-5)
