"""maskrcnn.masks: mask targets resampled into the RoI, and mask pasting against
torchvision's."""

from __future__ import annotations

import torch
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn import masks as mask_ops
from maskrcnn.masks import mask_targets, paste_masks


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
