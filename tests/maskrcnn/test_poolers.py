"""maskrcnn.poolers: RoIAlign on the seed's worked example (alone and through the FPN
pooler), FPN level assignment, and the gathered inference RoIAlign against torchvision's."""

from __future__ import annotations

import pytest
import torch
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor
from torchvision.ops import roi_align

from maskrcnn.poolers import assign_levels, multiscale_roi_align, roi_align_gathered


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
