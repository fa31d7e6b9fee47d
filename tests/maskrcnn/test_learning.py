"""The tiny preset learns: it overfits two synthetic images in a few dozen CPU steps."""

from __future__ import annotations

import time

import numpy as np
import torch
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor
from torchvision.ops import box_iou, masks_to_boxes

from maskrcnn import MaskRCNN, MaskRCNNConfig

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]
SIZE = 128  # the tiny preset's min_size: images go in unscaled
STEPS = 50
LR = 2e-3
SEED = 0


def draw(shapes: list[tuple], background: tuple[int, int, int]) -> tuple[Tensor, dict]:
    """A SIZE x SIZE uint8 image [3, H, W] and its target from (label, cx, cy, half_size, rgb).

    1 square (side 2s), 2 circle (radius s), 3 upright triangle (height 2s); a
    pixel belongs to a shape when its centre is inside. Shapes do not overlap.
    """
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = background
    masks, labels = [], []
    for label, cx, cy, s, colour in shapes:
        if label == 1:
            m = (np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s)
        elif label == 2:
            m = (xs - cx) ** 2 + (ys - cy) ** 2 <= s * s
        else:
            half_base = 2 * s / np.sqrt(3)
            m = (ys <= cy + s) & (np.abs(xs - cx) * 2 * s <= (ys - (cy - s)) * half_base)
        assert not any((m & other).any() for other in masks)
        image[m] = colour
        masks.append(m)
        labels.append(label)
    masks_t = torch.from_numpy(np.stack(masks))
    # Pixel-edge boxes: a mask over columns x0..x1 spans x0 to x1 + 1.
    boxes = masks_to_boxes(masks_t) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    target = {"boxes": boxes, "labels": torch.tensor(labels), "masks": masks_t.to(torch.uint8)}
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target


def two_images() -> tuple[list[Tensor], list[dict]]:
    pairs = [
        draw([(1, 32, 34, 20, (220, 40, 40)), (2, 88, 84, 22, (40, 200, 60))], (30, 30, 90)),
        draw(
            [
                (3, 38, 82, 22, (240, 220, 40)),
                (2, 92, 34, 20, (200, 60, 200)),
                (1, 96, 96, 16, (40, 220, 220)),
            ],
            (90, 60, 30),
        ),
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def train(model: MaskRCNN, images: list[Tensor], targets: list[dict]) -> list[float]:
    """STEPS Adam steps on the whole batch, one-cycle learning rate; the total loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=STEPS, pct_start=0.15
    )
    floats = [im.float() / 255 for im in images]
    model.train()
    history = []
    for _ in range(STEPS):
        losses = model(floats, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        schedule.step()
        history.append(total.item())
    return history


def test_tiny_preset_overfits_two_images():
    torch.manual_seed(SEED)
    images, targets = two_images()
    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES)
    model = MaskRCNN(cfg)
    start = time.perf_counter()
    history = train(model, images, targets)
    seconds = time.perf_counter() - start
    assert all(np.isfinite(history))
    assert np.mean(history[-5:]) < 0.25 * history[0], history

    detections = model.predict(images)
    for image_index, (det, target) in enumerate(zip(detections, targets)):
        confident = det["scores"] >= 0.5
        iou = box_iou(target["boxes"], det["boxes"])
        iou = torch.where(target["labels"][:, None] == det["labels"][None, :], iou, 0.0)
        iou = iou * confident[None, :]
        found = []
        for k in range(len(target["boxes"])):
            best = int(iou[k].argmax())
            gt_mask = target["masks"][k].bool()
            mask = det["masks"][best]
            mask_iou = float((gt_mask & mask).sum()) / float((gt_mask | mask).sum())
            where = f"image {image_index} object {k} ({CLASS_NAMES[int(target['labels'][k])]})"
            assert iou[k, best] >= 0.8, f"{where}: box IoU {float(iou[k, best]):.3f}"
            assert mask_iou >= 0.7, f"{where}: mask IoU {mask_iou:.3f}"
            found.append(best)
        # The objects are the best-scoring detections: anything else scores lower.
        assert sorted(found) == list(range(len(target["boxes"]))), (found, det["scores"][:6])
    print(f"{STEPS} steps in {seconds:.1f} s; loss {history[0]:.2f} -> {history[-1]:.3f}")
