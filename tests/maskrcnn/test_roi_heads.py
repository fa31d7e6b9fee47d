"""maskrcnn.roi_heads: the pooled levels, and the classification, box and mask losses
on hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from helpers.formulas import STRIDES, bce_with_logits, smooth_l1
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor, nn

from maskrcnn import MaskRCNNConfig
from maskrcnn.roi_heads import RoIHeads


def test_roi_pool_levels_name_the_pooled_maps_and_hold_the_canonical_level():
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3, roi_pool_levels=(3, 4, 5))
    pyramid = [torch.zeros(1, 8, 256 // s, 256 // s) for s in STRIDES]  # P2..P6
    maps = RoIHeads(cfg, 8).pool_maps(pyramid)
    assert [m.shape[-1] for m in maps] == [32, 16, 8]  # P3, P4, P5
    assert len(RoIHeads(MaskRCNNConfig.preset("tiny"), 8).pool_maps(pyramid)) == 4  # P2..P5
    for bad in [(2, 4, 5), (1, 2, 3, 4), (5, 4, 3), (), (2, 3)]:  # (2, 3): no P4, k0 = 4
        with pytest.raises(ValueError, match="roi_pool_levels"):
            MaskRCNNConfig.preset("tiny", roi_pool_levels=bad)


class _LookupPredictor(nn.Module):
    """Box predictor stand-in: returns the logits/deltas listed for each RoI (rows of x)."""

    def __init__(self, boxes: Tensor, logits: Tensor, deltas: Tensor):
        super().__init__()
        self.boxes, self.logits, self.deltas = boxes, logits, deltas

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hit = (x[:, None, :] == self.boxes[None]).all(-1)
        assert (hit.sum(1) == 1).all(), "a RoI that is not in the table"
        idx = hit.float().argmax(1)
        return self.logits[idx], self.deltas[idx]


def test_roi_head_classification_and_box_losses_hand_computed(monkeypatch):
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3)
    heads = RoIHeads(cfg, 8)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0]])
    proposals = torch.tensor(
        [[1.0, 0.0, 11.0, 10.0], [0.0, 5.0, 10.0, 15.0], [100.0, 100.0, 120.0, 120.0]]
    )
    # RoIs: the proposals and, joined to them, the two ground-truth boxes.
    rois = torch.cat([proposals, gt])
    labels = [2, 0, 0, 2, 1]  # IoU 0.82 -> gt 0 (class 2); 1/3 and 0 -> background
    logits = torch.tensor(
        [[0.2, -1.0, 2.0], [1.5, 0.0, -0.5], [3.0, 1.0, 1.0], [-1.0, 0.5, 1.0], [0.0, 2.0, -2.0]]
    )
    deltas = torch.full((5, 3, 4), 40.0)  # other classes' (and background RoIs') deltas: unused
    deltas[0, 2] = torch.tensor([-0.8, 0.05, 0.0, -0.3])  # target (-1, 0, 0, 0)
    deltas[3, 2] = torch.tensor([0.02, 0.0, 0.5, 0.0])  # target 0: the box itself
    deltas[4, 1] = torch.tensor([0.0, -0.04, 0.0, 0.2])
    monkeypatch.setattr(heads, "_pool", lambda feats, boxes, sizes, size: torch.cat(boxes))
    heads.box_head = nn.Identity()
    heads.box_predictor = _LookupPredictor(rois, logits, deltas.reshape(5, 12))
    monkeypatch.setattr(heads, "mask_loss", lambda *a: torch.tensor(0.0))
    feats = [torch.zeros(1, 8, 32, 32)]
    targets = [{"boxes": gt, "labels": torch.tensor([2, 1]), "masks": torch.zeros(2, 128, 128)}]
    losses = heads.losses(feats, [proposals], [(128, 128)], targets)
    lab = torch.tensor(labels)
    ce = torch.logsumexp(logits, 1) - logits[torch.arange(5), lab]
    assert losses["loss_classifier"].item() == pytest.approx(ce.mean().item(), rel=1e-6)
    d = torch.stack(
        [
            deltas[0, 2] - torch.tensor([-1.0, 0.0, 0.0, 0.0]),
            deltas[3, 2],
            deltas[4, 1],
        ]
    )
    expected_box = smooth_l1(d, 1 / 9).sum() / 5  # normalised by all sampled RoIs
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box.item(), rel=1e-5)


class _FixedMaskHead(nn.Module):
    def __init__(self, logits: Tensor):
        super().__init__()
        self.out = logits

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[0] == self.out.shape[0], "pooled a different number of RoIs"
        return self.out


def test_mask_loss_is_bce_on_the_gt_class_channel_of_positive_rois(monkeypatch):
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3)
    heads = RoIHeads(cfg, 8)
    masks = torch.zeros(2, 56, 56, dtype=torch.uint8)
    masks[0, 8:20, 4:24] = 1
    masks[1, 30:50, 28:40] = 1
    rois = torch.tensor([[0.0, 0.0, 28.0, 28.0], [28.0, 28.0, 56.0, 56.0], [5.0, 5.0, 9.0, 9.0]])
    labels = torch.tensor([2, 1, 0])  # the third RoI is background: no mask loss
    matched = torch.tensor([0, 1, -1])
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(2, 28, 28, generator=g) * 3
    logits = torch.full((2, 3, 28, 28), 1e4)  # other channels: huge loss if used
    logits[0, 2], logits[1, 1] = chosen[0], chosen[1]
    monkeypatch.setattr(heads, "_pool", lambda feats, boxes, sizes, size: torch.cat(boxes))
    heads.mask_head = _FixedMaskHead(logits)
    targets = [{"masks": masks, "mask_scale": torch.ones(4)}]
    loss = heads.mask_loss(
        [torch.zeros(1, 8, 14, 14)], [rois], [labels], [matched], [(56, 56)], targets
    )
    goal = torch.stack([masks[0, :28, :28], masks[1, 28:, 28:]]).float()
    assert loss.item() == pytest.approx(bce_with_logits(chosen, goal).mean().item(), rel=1e-5)
