"""maskrcnn unit tests: anchors, box coding, RoIAlign, FPN levels, matching, sampling,
each loss on a hand-computed case, training edge cases, mask pasting, predict's contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.model_inputs import smooth_noise_images
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn import masks as mask_ops
from maskrcnn.anchors import (
    BACKGROUND,
    BBOX_XFORM_CLIP,
    IGNORE,
    AnchorGenerator,
    decode_boxes,
    encode_boxes,
    match,
    sample_balanced,
)
from maskrcnn.masks import mask_targets, paste_masks
from maskrcnn.poolers import assign_levels, multiscale_roi_align, roi_align_gathered
from maskrcnn.roi_heads import RoIHeads
from maskrcnn.rpn import RPN, flatten_level
from maskrcnn.transforms import padded_size, resize_to_model

STRIDES = (4, 8, 16, 32, 64)


def smooth_l1(d: Tensor, beta: float) -> Tensor:
    """The smooth-L1 formula, written out: 0.5 d^2 / beta below beta, |d| - beta / 2 above."""
    a = d.abs()
    return torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def bce_with_logits(x: Tensor, y: Tensor) -> Tensor:
    """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], written out (stable form)."""
    return torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))


# --- anchors ------------------------------------------------------------------------------------


def test_anchor_counts_shapes_centres_and_sizes_per_level():
    cfg = MaskRCNNConfig.preset("r50-fpn")
    padded = (320, 448)  # a padded batch; multiples of 64 so every level divides evenly
    feature_sizes = [(padded[0] // s, padded[1] // s) for s in STRIDES]
    levels = AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios)(
        padded, feature_sizes, torch.device("cpu")
    )
    assert len(levels) == 5
    for anchors, stride, size, (gh, gw) in zip(levels, STRIDES, cfg.anchor_sizes, feature_sizes):
        assert anchors.dtype == torch.float32
        assert anchors.shape == (gh * gw * 3, 4), (stride, anchors.shape)
        grid = anchors.view(gh, gw, 3, 4)  # (row, column, ratio) order
        cx = (grid[..., 0] + grid[..., 2]) / 2
        cy = (grid[..., 1] + grid[..., 3]) / 2
        cols = torch.arange(gw, dtype=torch.float32)[None, :, None] * stride
        rows = torch.arange(gh, dtype=torch.float32)[:, None, None] * stride
        assert torch.equal(cx, cols.expand_as(cx)) and torch.equal(cy, rows.expand_as(cy))
        w = grid[..., 2] - grid[..., 0]
        h = grid[..., 3] - grid[..., 1]
        for k, ratio in enumerate(cfg.aspect_ratios):
            # Corners are rounded to whole pixels: area and ratio hold to rounding.
            assert torch.allclose(w[..., k] * h[..., k], torch.tensor(size**2.0), rtol=0.03)
            assert torch.allclose(h[..., k] / w[..., k], torch.tensor(ratio), rtol=0.06)
    # Identical to torchvision's generator (the reference) for the same batch.
    tv = TVAnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (cfg.aspect_ratios,) * 5)
    tv.set_cell_anchors(torch.float32, torch.device("cpu"))
    strides = [[torch.tensor(s), torch.tensor(s)] for s in STRIDES]
    for ours, ref in zip(levels, tv.grid_anchors([list(f) for f in feature_sizes], strides)):
        assert torch.equal(ours, ref)


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


# --- box coding ------------------------------------------------------------------------------------


def test_box_encoding_hand_case_and_round_trip():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    target = torch.tensor([[2.0, 4.0, 12.0, 28.0]])
    # centres (5, 10) -> (7, 16); sizes (10, 20) -> (10, 24)
    t = encode_boxes(target, anchor, (10.0, 10.0, 5.0, 5.0))
    expected = torch.tensor([[10 * 2 / 10, 10 * 6 / 20, 0.0, 5 * math.log(24 / 20)]])
    assert torch.allclose(t, expected, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 300
    anchors = torch.cat([xy, xy + 4 + torch.rand(500, 2, generator=g) * 200], 1)
    xy = torch.rand(500, 2, generator=g) * 300
    targets = torch.cat([xy, xy + 4 + torch.rand(500, 2, generator=g) * 200], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        back = decode_boxes(encode_boxes(targets, anchors, weights), anchors, weights)
        assert back.shape == (500, 1, 4)
        assert torch.allclose(back[:, 0], targets, atol=1e-3)


def test_decode_clamps_growth_and_matches_torchvision():
    anchors = torch.tensor([[10.0, 10.0, 30.0, 50.0]])  # w 20, h 40, centre (20, 30)
    weights = (10.0, 10.0, 5.0, 5.0)
    # dw, dh far past the clip: the box grows by exactly 1000/16 and no more.
    deltas = torch.tensor([[0.0, 0.0, 5.0 * 20, 5.0 * 20]])
    box = decode_boxes(deltas, anchors, weights)[0, 0]
    assert math.exp(BBOX_XFORM_CLIP) == pytest.approx(1000.0 / 16)
    assert box.tolist() == pytest.approx([20 - 625.0, 30 - 1250.0, 20 + 625.0, 30 + 1250.0])
    # Shrinking is not clamped.
    small = decode_boxes(torch.tensor([[0.0, 0.0, -5.0 * 3, 0.0]]), anchors, weights)[0, 0]
    assert (small[2] - small[0]).item() == pytest.approx(20 * math.exp(-3), rel=1e-5)
    # Random class-specific deltas (some past the clip) decode as torchvision's BoxCoder.
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(200, 2, generator=g) * 300
    props = torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=g) * 100], 1)
    rel = torch.randn(200, 4 * 5, generator=g) * 8
    ours = decode_boxes(rel, props, weights)
    ref = BoxCoder(weights).decode(rel, [props])
    assert ours.shape == (200, 5, 4)
    assert torch.allclose(ours, ref.view(200, 5, 4), rtol=1e-5, atol=1e-3)


# --- RoIAlign ------------------------------------------------------------------------------------


def seed_feature_map(size: int = 16) -> Tensor:
    """[1, 1, size, size] zeros with the seed's four values. With aligned=True the centre of
    pixel (row j, column i) sits at (i + 0.5, j + 0.5): 0.1 at (9.5, 6.5) is pixel (6, 9)."""
    f = torch.zeros(1, 1, size, size)
    f[0, 0, 6, 9], f[0, 0, 6, 10], f[0, 0, 7, 9], f[0, 0, 7, 10] = 0.1, 0.2, 1.0, 0.7
    return f


# The seed's bilinear interpolation at (9.94, 6.50): y is on the row of Q11, Q21, so
# P = (10.5 - 9.94) * 0.1 + (9.94 - 9.5) * 0.2 = 0.144 (the seed prints it rounded: 0.14).
SEED_VALUE = (10.5 - 9.94) * 0.1 + (9.94 - 9.5) * 0.2


def test_roi_align_seed_worked_example():
    assert round(SEED_VALUE, 2) == 0.14
    # One 1x1 bin with one sample: the sample is the RoI's centre, (9.94, 6.50).
    roi = torch.tensor([[0.0, 9.94 - 0.5, 6.5 - 0.5, 9.94 + 0.5, 6.5 + 0.5]])
    v = roi_align(seed_feature_map(), roi, (1, 1), 1.0, sampling_ratio=1, aligned=True)
    assert v.item() == pytest.approx(SEED_VALUE, abs=1e-5)
    # A point off the row mixes in the lower pair: (9.94, 7.0) is half way to y = 7.5.
    roi = torch.tensor([[0.0, 9.44, 6.5, 10.44, 7.5]])
    v = roi_align(seed_feature_map(), roi, (1, 1), 1.0, sampling_ratio=1, aligned=True)
    lower = 0.56 * 1.0 + 0.44 * 0.7
    assert v.item() == pytest.approx(0.5 * SEED_VALUE + 0.5 * lower, abs=1e-5)


def test_roi_align_seed_example_through_the_fpn_pooler():
    # A 64x64 image; P2 (stride 4) is the seed's 16x16 map, P3..P5 are zeros that a
    # wrongly routed box would read. A 4-pixel box is far below 224: it goes to P2.
    feats = [seed_feature_map(16)] + [torch.zeros(1, 1, 64 // s, 64 // s) for s in (8, 16, 32)]
    # Image pixels are 4x the feature map's: centre (9.94, 6.5) on P2 is (39.76, 26.0).
    box = torch.tensor([[39.76 - 2, 26.0 - 2, 39.76 + 2, 26.0 + 2]])
    out = multiscale_roi_align(feats, [box], [(64, 64)], 1, 1, aligned=True)
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(SEED_VALUE, abs=1e-5)


def test_fpn_level_assignment():
    def square(side: float) -> list[float]:
        return [10.0, 10.0, 10.0 + side, 10.0 + side]

    boxes = torch.tensor(
        [square(224), square(112), square(448), square(8), square(2000), square(223)]
        + [[0.0, 0.0, 112.0, 448.0]]  # sqrt(area) 224 -> P4 whatever the shape
    )
    levels = assign_levels(boxes, 224, 4, 2, 5) + 2  # index 0 is P2
    assert levels.tolist() == [4, 3, 5, 2, 5, 3, 4]
    assert levels.dtype == torch.int64


def test_roi_pool_levels_name_the_pooled_maps_and_hold_the_canonical_level():
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3, roi_pool_levels=(3, 4, 5))
    pyramid = [torch.zeros(1, 8, 256 // s, 256 // s) for s in STRIDES]  # P2..P6
    maps = RoIHeads(cfg, 8).pool_maps(pyramid)
    assert [m.shape[-1] for m in maps] == [32, 16, 8]  # P3, P4, P5
    assert len(RoIHeads(MaskRCNNConfig.preset("tiny"), 8).pool_maps(pyramid)) == 4  # P2..P5
    for bad in [(2, 4, 5), (1, 2, 3, 4), (5, 4, 3), (), (2, 3)]:  # (2, 3): no P4, k0 = 4
        with pytest.raises(ValueError, match="roi_pool_levels"):
            MaskRCNNConfig.preset("tiny", roi_pool_levels=bad)


# --- matching and sampling -------------------------------------------------------------------------


def test_match_thresholds_and_low_quality_matches():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    cands = torch.tensor(
        [
            [0.0, 0.0, 10.0, 7.5],  # IoU 0.75 with gt 0 -> fg
            [0.0, 0.0, 10.0, 5.0],  # 0.5 -> between the thresholds: ignored
            [0.0, 0.0, 10.0, 2.5],  # 0.25 -> background
            [100.0, 100.0, 110.0, 104.0],  # 0.4 with gt 1: its best candidate (tied)
            [100.0, 106.0, 110.0, 110.0],  # 0.4 with gt 1: its best candidate (tied)
            [100.0, 100.0, 110.0, 102.0],  # 0.2 with gt 1 -> background
            [300.0, 300.0, 310.0, 310.0],  # no overlap -> background
        ]
    )
    plain = match(gt, cands, 0.7, 0.3, low_quality=False)
    assert plain.tolist() == [0, IGNORE, BACKGROUND, IGNORE, IGNORE, BACKGROUND, BACKGROUND]
    low = match(gt, cands, 0.7, 0.3, low_quality=True)
    assert low.tolist() == [0, IGNORE, BACKGROUND, 1, 1, BACKGROUND, BACKGROUND]
    # The RoI thresholds (0.5 / 0.5): exactly 0.5 is foreground, just below is background.
    roi = match(
        gt[:1], torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9]]), 0.5, 0.5, False
    )
    assert roi.tolist() == [0, BACKGROUND]
    # An image without objects: every candidate is background.
    assert match(torch.zeros(0, 4), cands, 0.7, 0.3, True).tolist() == [BACKGROUND] * 7


@pytest.mark.parametrize(
    ("num_pos", "num_neg", "batch", "fraction", "want_pos", "want_neg"),
    [
        (10, 1000, 256, 0.5, 10, 246),  # few positives: negatives fill the batch
        (500, 1000, 256, 0.5, 128, 128),  # many positives: capped at the fraction
        (500, 20, 256, 0.5, 128, 20),  # few negatives: the batch is not filled
        (300, 2000, 512, 0.25, 128, 384),  # the RoI head's 512 at 25%
    ],
)
def test_sample_balanced_counts(num_pos, num_neg, batch, fraction, want_pos, want_neg):
    g = torch.Generator().manual_seed(0)
    labels = torch.cat(
        [
            torch.randint(1, 4, (num_pos,), generator=g),
            torch.zeros(num_neg, dtype=torch.int64),
            torch.full((50,), -1, dtype=torch.int64),  # ignored: never sampled
        ]
    )
    labels = labels[torch.randperm(len(labels), generator=g)]
    pos, neg = sample_balanced(labels, batch, fraction, generator=g)
    assert (len(pos), len(neg)) == (want_pos, want_neg)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == len(pos) and len(set(neg.tolist())) == len(neg)
    # Random subsets, not the first indices.
    if want_pos < num_pos:
        first = torch.nonzero(labels >= 1).squeeze(1)[:want_pos]
        assert set(pos.tolist()) != set(first.tolist())


# --- losses on hand-computed cases ----------------------------------------------------------------


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


def test_mask_targets_resample_the_gt_mask_into_the_roi():
    masks = torch.zeros(1, 56, 56, dtype=torch.uint8)
    masks[0, 8:20, 4:24] = 1  # rows 8..19, columns 4..23
    # A box over the top-left 28x28 pixels: one target cell per pixel.
    t = mask_targets(masks, torch.tensor([[0.0, 0.0, 28.0, 28.0]]), torch.tensor([0]), 28)
    assert torch.equal(t[0], masks[0, :28, :28].float())
    # The whole 56x56 image: each cell is a 2x2 block.
    t = mask_targets(masks, torch.tensor([[0.0, 0.0, 56.0, 56.0]]), torch.tensor([0]), 28)
    expected = torch.zeros(28, 28)
    expected[4:10, 2:12] = 1
    assert torch.equal(t[0], expected)


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


# --- training edge cases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cfg() -> MaskRCNNConfig:
    return MaskRCNNConfig.preset("tiny", num_classes=4)


def square_target(h: int, w: int, box: list[int], label: int) -> dict[str, Tensor]:
    x0, y0, x1, y1 = box
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, y0:y1, x0:x1] = 1
    return {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([label]),
        "masks": masks,
    }


def empty_target(h: int, w: int) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.uint8),
    }


@pytest.mark.parametrize("with_objects", [True, False], ids=["mixed-batch", "all-empty"])
def test_images_without_objects_train_without_nan(tiny_cfg, with_objects):
    torch.manual_seed(0)
    model = MaskRCNN(tiny_cfg).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 120, 100)]
    targets = [empty_target(96, 128), empty_target(120, 100)]
    if with_objects:
        targets[1] = square_target(120, 100, [20, 30, 70, 90], 2)
    losses = model(images, targets)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), (name, value)
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0
    if not with_objects:
        # No positives anywhere: the box and mask losses are exactly zero.
        for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
            assert losses[name].item() == 0.0, name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize(
    "bad_box", [[10.0, 10.0, 10.0, 20.0], [30.0, 40.0, 20.0, 60.0], [5.0, 50.0, 25.0, 50.0]]
)
def test_degenerate_box_names_the_image_and_the_box(tiny_cfg, bad_box):
    model = MaskRCNN(tiny_cfg).train()
    good = square_target(80, 80, [10, 10, 40, 40], 1)
    bad = square_target(80, 80, [10, 10, 40, 40], 1)
    bad["boxes"] = torch.tensor([[1.0, 1.0, 20.0, 20.0], bad_box])
    bad["labels"] = torch.tensor([1, 2])
    bad["masks"] = torch.zeros(2, 80, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"image 1\b.*degenerate box 1") as err:
        model([torch.rand(3, 80, 80), torch.rand(3, 80, 80)], [good, bad])
    assert str([round(v, 2) for v in bad_box]) in str(err.value)


# --- mask pasting ------------------------------------------------------------------------------------


def random_boxes(n: int, h: int, w: int, g: torch.Generator) -> Tensor:
    """Boxes of 0.5..60 pixels overlapping an h x w image, many partly outside it."""
    x0 = torch.rand(4 * n, generator=g) * (w + 40) - 30
    y0 = torch.rand(4 * n, generator=g) * (h + 40) - 30
    bw = 0.5 + torch.rand(4 * n, generator=g) * 60
    bh = 0.5 + torch.rand(4 * n, generator=g) * 60
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
    # torchvision's reference cannot paste a box wholly outside the image (nor do
    # detections, which are clipped to it): keep boxes that overlap it.
    overlap = (boxes[:, 2] > 1) & (boxes[:, 3] > 1) & (boxes[:, 0] < w - 1) & (boxes[:, 1] < h - 1)
    return boxes[overlap][:n]


def test_paste_masks_equals_torchvision_paste_thresholded(monkeypatch):
    g = torch.Generator().manual_seed(0)
    h, w = 57, 83
    probs = torch.rand(60, 28, 28, generator=g)
    probs[:20] = torch.sigmoid(torch.randn(20, 28, 28, generator=g) * 4)  # peaked ones too
    boxes = random_boxes(60, h, w, g)
    assert (
        (boxes[:, 0] < 0) | (boxes[:, 2] > w) | (boxes[:, 1] < 0) | (boxes[:, 3] > h)
    ).sum() > 10
    ref = paste_masks_in_image(probs[:, None], boxes, (h, w), padding=1)[:, 0]
    ours = paste_masks(probs, boxes, h, w, threshold=0.5)
    assert ours.dtype == torch.bool and ours.shape == (60, h, w)
    differ = ours != (ref > 0.5)
    assert (ref[differ] - 0.5).abs().max().item() < 1e-5 if differ.any() else True
    assert differ.sum().item() <= 5, f"{differ.sum().item()} pixels differ"
    assert (ref > 0.5).sum() > 1000  # non-vacuous: plenty of foreground
    soft = paste_masks(probs, boxes, h, w, threshold=None)
    assert soft.dtype == torch.float32 and torch.allclose(soft, ref, atol=1e-5)
    # Pasting in small chunks gives the same pixels.
    for budget in (h * w * 7, 1):  # several masks per chunk; one mask per chunk
        monkeypatch.setattr(mask_ops, "PASTE_CHUNK_ELEMENTS", budget)
        assert torch.equal(paste_masks(probs, boxes, h, w, threshold=0.5), ours)
    # A box wholly outside the image pastes nothing and leaves the others as they were.
    outside = torch.cat([boxes[:3], torch.tensor([[w + 5.0, 2.0, w + 30.0, 20.0]])])
    got = paste_masks(probs[:4], outside, h, w, threshold=0.5)
    assert not got[3].any() and torch.equal(got[:3], ours[:3])


# --- predict's contract ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_tiny_model(tiny_cfg) -> MaskRCNN:
    """A randomly initialised tiny model whose masks are neither empty nor full."""
    torch.manual_seed(1)
    model = MaskRCNN(tiny_cfg).eval()
    with torch.no_grad():
        model.roi_heads.mask_head.logits.weight.mul_(4)
        model.roi_heads.mask_head.logits.bias.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def contract_images() -> list[Tensor]:
    return smooth_noise_images([(100, 150), (130, 90)], seed=2)


@pytest.fixture(scope="module")
def contract_outputs(random_tiny_model, contract_images):
    return random_tiny_model.predict(contract_images)


def check_contract(out, images, num_classes: int) -> None:
    assert len(out) == len(images)
    for det, image in zip(out, images):
        n = det["boxes"].shape[0]
        h, w = image.shape[-2:]
        assert set(det) == {"boxes", "scores", "labels", "masks"}
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape == (n, 4)
        assert det["scores"].dtype == torch.float32 and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == (n,)
        assert det["masks"].dtype == torch.bool and det["masks"].shape == (n, h, w)
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= num_classes - 1)).all()
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all()
        assert (b[:, 3] <= h).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_predict_output_contract(contract_outputs, contract_images, tiny_cfg):
    check_contract(contract_outputs, contract_images, tiny_cfg.num_classes)
    counts = [len(d["boxes"]) for d in contract_outputs]
    assert all(0 < c <= tiny_cfg.detections_per_img for c in counts), counts
    # Non-trivial masks: many are non-empty, and not all are their whole box.
    areas = torch.cat([d["masks"].sum((1, 2)).float() for d in contract_outputs])
    boxes = torch.cat([d["boxes"] for d in contract_outputs])
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (areas > 0).float().mean() > 0.3
    assert (areas < 0.8 * box_areas).any()


def assert_same_detections(a, b) -> None:
    assert len(a) == len(b) > 0, (len(a), len(b))  # zip would stop at the shorter
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_uint8_and_float_inputs_give_the_same_detections(
    random_tiny_model, contract_images, contract_outputs
):
    floats = [im.float() / 255 for im in contract_images]
    assert_same_detections(random_tiny_model.predict(floats), contract_outputs)


def test_unpasted_mask_probs_paste_to_the_same_masks(
    random_tiny_model, contract_images, contract_outputs
):
    raw = random_tiny_model.predict(contract_images, paste_masks=False)
    for r, full, image in zip(raw, contract_outputs, contract_images):
        assert "masks" not in r
        m = random_tiny_model.cfg.mask_resolution
        assert r["mask_probs"].dtype == torch.float32
        assert r["mask_probs"].shape == (len(r["boxes"]), m, m)
        assert torch.equal(r["boxes"], full["boxes"])
        pasted = mask_ops.paste_masks(r["mask_probs"], r["boxes"], *image.shape[-2:])
        assert torch.equal(pasted, full["masks"])


def test_original_sizes_path_equals_plain_predict(
    random_tiny_model, contract_images, contract_outputs
):
    cfg = random_tiny_model.cfg
    resized = [resize_to_model(im, cfg) for im in contract_images]
    assert resized[0].shape[-2:] != contract_images[0].shape[-2:]  # really resized
    sizes = [tuple(im.shape[-2:]) for im in contract_images]
    out = random_tiny_model.predict(resized, original_sizes=sizes)
    assert_same_detections(out, contract_outputs)


def test_score_threshold_and_max_detections(random_tiny_model, contract_images, contract_outputs):
    threshold = float(contract_outputs[0]["scores"][3])
    out = random_tiny_model.predict(contract_images, score_threshold=threshold, max_detections=2)
    for det, full in zip(out, contract_outputs):
        # Dropping low scores before NMS cannot change which higher-scoring boxes survive.
        keep = min(2, int((full["scores"] > threshold).sum()))
        assert len(det["scores"]) == keep
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(det[key], full[key][:keep]), key
    assert len(out[0]["scores"]) == 2


def test_fast_mode_keeps_the_contract(random_tiny_model, contract_images, tiny_cfg):
    model = random_tiny_model
    out = model.predict(contract_images, fast=True)
    check_contract(out, contract_images, tiny_cfg.num_classes)
    assert all(len(d["boxes"]) > 0 for d in out)


# Portrait, landscape and square, and two sizes (120x160 and 122x160) that resize to
# different shapes sharing one padded shape: four padded shapes among six images.
MIXED_SIZES = [(120, 160), (160, 120), (128, 128), (122, 160), (96, 200), (130, 90)]


@pytest.fixture(scope="module")
def mixed_images() -> list[Tensor]:
    return smooth_noise_images(MIXED_SIZES, seed=5)


@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "fast"])
def test_an_image_gets_the_detections_it_gets_alone_whatever_its_batch(
    random_tiny_model, mixed_images, tiny_cfg, fast
):
    model = random_tiny_model
    resized = [tuple(resize_to_model(im, tiny_cfg).shape[-2:]) for im in mixed_images]
    padded = {padded_size(h, w, tiny_cfg.size_divisible) for h, w in resized}
    assert len(set(resized)) == 6 and len(padded) == 4  # mixed, and shapes share a pad
    alone = [model.predict([im], fast=fast)[0] for im in mixed_images]
    assert all(len(d["boxes"]) > 0 for d in alone)
    # Bit-identical on CPU in both modes: in the given order, reversed, and as a pair of
    # two orientations. (Padding to the largest image fails it, and so does batching
    # images of one padded shape in fp32: oneDNN rounds a batch of two differently.)
    assert_same_detections(model.predict(mixed_images, fast=fast), alone)
    assert_same_detections(model.predict(mixed_images[::-1], fast=fast), alone[::-1])
    pair = [mixed_images[1], mixed_images[0]]
    assert_same_detections(model.predict(pair, fast=fast), [alone[1], alone[0]])


def test_layout_is_set_when_built_and_fast_mode_lays_out_only_its_inputs(
    random_tiny_model, contract_images, tiny_cfg
):
    weight = random_tiny_model.backbone.body.conv1.weight
    assert random_tiny_model.channels_last  # the default
    assert weight.is_contiguous(memory_format=torch.channels_last)
    model = MaskRCNN(tiny_cfg, channels_last=False).eval()
    model.load_state_dict(random_tiny_model.state_dict())
    assert not model.channels_last and model.backbone.body.conv1.weight.is_contiguous()
    # Fast mode runs channels-last whatever the model's layout, and leaves the weights be.
    out = model.predict(contract_images, fast=True)
    assert model.backbone.body.conv1.weight.is_contiguous() and not model.channels_last
    assert_same_detections(out, random_tiny_model.predict(contract_images, fast=True))
    assert model.to_layout(True) is model and model.channels_last
    for conv in (model.backbone.body.conv1, model.roi_heads.mask_head.deconv):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def _norm_with_stats(norm: nn.Module, channels: int) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=g))
        norm.running_mean.copy_(torch.randn(channels, generator=g))
        norm.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return norm


@pytest.mark.parametrize("kind", ["frozen", "bn_eval", "bn_train", "conv_bias"])
def test_conv_norm_fold_equals_conv_then_norm_in_value_and_gradient(kind):
    from torchvision.ops import FrozenBatchNorm2d

    from maskrcnn.backbone import conv_norm

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=kind == "conv_bias")
    norm = FrozenBatchNorm2d(8) if kind in ("frozen", "conv_bias") else nn.BatchNorm2d(8)
    norm = _norm_with_stats(norm, 8).train(kind == "bn_train")
    x = torch.randn(3, 6, 17, 13)
    reference_conv = copy.deepcopy(conv)
    want = copy.deepcopy(norm)(reference_conv(x))
    got = conv_norm(x, conv, norm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Training through the fold moves the conv weight exactly as through the norm.
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference_conv.weight.grad, rtol=1e-4, atol=1e-4)
    if kind == "bn_train":  # batch statistics, not the fold: running stats were updated
        assert not torch.equal(
            norm.running_mean, _norm_with_stats(nn.BatchNorm2d(8), 8).running_mean
        )


def test_folded_backbone_equals_the_unfolded_torchvision_body():
    """The ResNet body with folded norms gives torchvision's own forward's features."""
    cfg = MaskRCNNConfig.preset("tiny", num_classes=3)
    cfg.norm = "frozen_bn"
    model = MaskRCNN(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    for m in model.backbone.body.modules():
        if hasattr(m, "running_var"):  # statistics that keep activations O(1) through depth
            c = m.running_var.numel()
            m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    body = model.backbone.body
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        got = body(x)
        y = body.maxpool(body.relu(body.bn1(body.conv1(x))))
        want = []
        for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
            y = layer(y)  # torchvision's Bottleneck/BasicBlock.forward, norms unfolded
            want.append(y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _edge_case_rois(g: torch.Generator, n: int, width: float, height: float) -> Tensor:
    """Random RoIs on 2 images plus ones that leave the map, sit on its far edge or are tiny."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - 20
    wh = torch.rand(n, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:6] = torch.tensor(
        [
            [-40.0, -40.0, -30.0, -30.0],  # wholly outside: zeros
            [-10.0, -10.0, 6.0, 5.0],  # straddles the top-left corner
            [width - 3, height - 2, width + 30, height + 20],  # past the far edge
            [50.0, 40.0, 50.0, 40.0],  # a point
            [12.3, 7.7, 12.6, 8.1],  # under one feature pixel
            [0.0, 0.0, width, height],  # the whole image
        ]
    )
    index = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_gathered_roi_align_equals_torchvision(aligned, sampling_ratio):
    """Inference pools with one embedding_bag; torchvision's roi_align is the reference."""
    g = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    feat = torch.randn(2, 8, 30, 45, generator=g)
    rois = _edge_case_rois(g, 300, 180.0, 120.0)
    for size in (7, 14):
        want = roi_align(feat, rois, size, 0.25, sampling_ratio, aligned)
        got = roi_align_gathered(feat, rois, size, 0.25, sampling_ratio, aligned)
        assert got.shape == (300, size, size, 8)
        torch.testing.assert_close(got.permute(0, 3, 1, 2), want, rtol=1e-5, atol=2e-6)
    assert want[0].abs().max() == 0 and want[1:].abs().sum() > 0


def test_gathered_roi_align_reads_bf16_channels_last_features_exactly():
    # bf16 widens to fp32 exactly, so pooling bf16 maps must equal fp32 pooling of the
    # widened maps: the fast mode's RoIAlign is still fp32 arithmetic.
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 16, 30, 45, generator=g).bfloat16()
    rois = _edge_case_rois(g, 200, 180.0, 120.0)
    got = roi_align_gathered(
        feat.contiguous(memory_format=torch.channels_last), rois, 7, 0.25, 2, False
    )
    assert got.dtype == torch.float32
    want = roi_align(feat.float(), rois, 7, 0.25, 2, False)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), want, rtol=1e-5, atol=2e-6)


def test_gathered_roi_align_pools_nan_boxes_as_zeros():
    feat = torch.randn(1, 4, 20, 20)
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 40.0], [0.0, float("nan"), 8.0, 40.0, 40.0]])
    got = roi_align_gathered(feat, rois, 7, 0.25, 2, False)
    want = roi_align(feat, rois[:1], 7, 0.25, 2, False)
    torch.testing.assert_close(got[:1].permute(0, 3, 1, 2), want)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_multiscale_roi_align_inference_equals_training_path():
    """Without grad the FPN pooler gathers; with grad it runs torchvision's op: same values."""
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, 8, 64 // 2**i, 96 // 2**i, generator=g) for i in range(4)]
    xy = torch.rand(600, 2, generator=g) * torch.tensor([300.0, 200.0])
    wh = torch.rand(600, 2, generator=g) * 520 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    per_image, sizes = [boxes[:300], boxes[300:]], [(256, 384), (250, 380)]
    with torch.inference_mode():
        gathered = multiscale_roi_align(feats, per_image, sizes, 7, 2, False)
    trained = multiscale_roi_align(
        [f.requires_grad_() for f in feats], per_image, sizes, 7, 2, False
    )
    assert trained.requires_grad and not gathered.requires_grad
    levels = assign_levels(boxes, 224, 4, 2, 5)
    assert len(levels.unique()) == 4  # every level is read
    torch.testing.assert_close(gathered, trained.detach(), rtol=1e-5, atol=2e-6)


def test_off_cpu_batches_are_the_images_of_one_padded_shape(tiny_cfg):
    # The grouping accelerators get (a meta-device model stands in for one here): each
    # image is padded in its batch exactly as alone.
    model = MaskRCNN(tiny_cfg).to("meta")
    sizes = [(128, 170), (170, 128), (128, 128), (128, 167), (107, 224), (184, 128)]
    assert model._padding_groups(sizes) == [[0, 3], [1, 5], [2], [4]]
    assert MaskRCNN(tiny_cfg)._padding_groups(sizes) == [[i] for i in range(6)]  # CPU
