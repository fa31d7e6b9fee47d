"""maskrcnn.anchors: anchors per FPN level against torchvision's generator, box coding
(hand case, round trip, the growth clamp), matching thresholds and balanced sampling."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.formulas import STRIDES
from helpers.torch_threads import one_thread  # noqa: F401
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

from maskrcnn import MaskRCNNConfig
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
