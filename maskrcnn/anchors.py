"""Anchors, box coding (t_x, t_y, t_w, t_h), matching and balanced sampling.

Boxes are float tensors [N, 4] in (x1, y1, x2, y2) pixel coordinates unless
a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

# exp(dw) is clamped so that a box grows at most 1000/16 times its anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> Tensor:
    """Anchors centred on (0, 0) for one size: float32 [len(aspect_ratios), 4].

    Ratio r is height / width at constant area size**2; corners are rounded
    to whole pixels.
    """
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def grid_anchors(
    base: Tensor, grid_size: tuple[int, int], stride: tuple[int, int], device: torch.device
) -> Tensor:
    """All anchors of one level: float32 [H * W * A, 4], ordered (row, column, anchor).

    base: [A, 4] cell anchors; grid_size: (H, W) of the feature map; stride:
    (sy, sx) pixels between neighbouring cells.
    """
    gh, gw = grid_size
    sy, sx = stride
    shift_x = torch.arange(0, gw, dtype=torch.int32, device=device) * sx
    shift_y = torch.arange(0, gh, dtype=torch.int32, device=device) * sy
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=1)
    return (shifts.view(-1, 1, 4) + base.to(device).view(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator:
    """Anchors for every FPN level of a padded batch: one size per level, all ratios."""

    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]):
        self.bases = [cell_anchors(s, aspect_ratios) for s in sizes]
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return self.bases[0].shape[0]

    def __call__(
        self, batch_size: tuple[int, int], feature_sizes: list[tuple[int, int]], device
    ) -> list[Tensor]:
        """Per level [H_l * W_l * A, 4] anchors for a padded batch of size (H, W)."""
        key = (batch_size, tuple(feature_sizes), str(device))
        if key not in self._cache:
            if len(self._cache) > 16:
                self._cache.clear()
            levels = []
            for base, (gh, gw) in zip(self.bases, feature_sizes):
                stride = (batch_size[0] // gh, batch_size[1] // gw)
                levels.append(grid_anchors(base, (gh, gw), stride, device).float())
            self._cache[key] = levels
        return self._cache[key]


# --- box coding -------------------------------------------------------------


def encode_boxes(targets: Tensor, anchors: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Regression targets (t_x, t_y, t_w, t_h) of boxes against anchors: [N, 4] -> [N, 4].

    t_x = wx (x - x_a) / w_a, t_w = ww log(w / w_a), with (x, y) box centres.
    """
    wx, wy, ww, wh = weights
    aw = anchors[:, 2] - anchors[:, 0]
    ah = anchors[:, 3] - anchors[:, 1]
    ax = anchors[:, 0] + 0.5 * aw
    ay = anchors[:, 1] + 0.5 * ah
    tw = targets[:, 2] - targets[:, 0]
    th = targets[:, 3] - targets[:, 1]
    tx = targets[:, 0] + 0.5 * tw
    ty = targets[:, 1] + 0.5 * th
    return torch.stack(
        [
            wx * (tx - ax) / aw,
            wy * (ty - ay) / ah,
            ww * torch.log(tw / aw),
            wh * torch.log(th / ah),
        ],
        dim=1,
    )


def decode_boxes(deltas: Tensor, anchors: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Apply deltas to anchors: deltas [N, 4k], anchors [N, 4] -> boxes [N, k, 4].

    k > 1 holds one box per class (class-specific refinement). Always fp32.
    """
    deltas = deltas.float()
    anchors = anchors.to(deltas.dtype)
    wx, wy, ww, wh = weights
    aw = anchors[:, 2] - anchors[:, 0]
    ah = anchors[:, 3] - anchors[:, 1]
    ax = anchors[:, 0] + 0.5 * aw
    ay = anchors[:, 1] + 0.5 * ah
    d = deltas.reshape(deltas.shape[0], -1, 4)
    dx = d[..., 0] / wx
    dy = d[..., 1] / wy
    dw = torch.clamp(d[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(d[..., 3] / wh, max=BBOX_XFORM_CLIP)
    cx = dx * aw[:, None] + ax[:, None]
    cy = dy * ah[:, None] + ay[:, None]
    half_w = 0.5 * (torch.exp(dw) * aw[:, None])
    half_h = 0.5 * (torch.exp(dh) * ah[:, None])
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=2)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip [..., 4] boxes to an image of (height, width)."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nonempty(boxes: Tensor, min_size: float) -> Tensor:
    """Bool [N]: boxes whose width and height are both at least min_size."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


# --- matching and sampling ----------------------------------------------------

BACKGROUND = -1
IGNORE = -2


def match(
    gt_boxes: Tensor, candidates: Tensor, fg_thresh: float, bg_thresh: float, low_quality: bool
) -> Tensor:
    """Index of the matched ground-truth box per candidate: int64 [N].

    BACKGROUND (-1) when the best IoU is below bg_thresh, IGNORE (-2) when it
    is in [bg_thresh, fg_thresh). With ``low_quality``, every ground-truth
    box also claims the candidates that overlap it most, even below
    fg_thresh (the RPN rule, so that every object has an anchor).
    """
    if gt_boxes.numel() == 0:
        return torch.full(
            (candidates.shape[0],), BACKGROUND, dtype=torch.int64, device=candidates.device
        )
    iou = box_iou(gt_boxes, candidates)  # [G, N]
    best_iou, best_gt = iou.max(dim=0)
    matches = best_gt.clone()
    matches[best_iou < bg_thresh] = BACKGROUND
    matches[(best_iou >= bg_thresh) & (best_iou < fg_thresh)] = IGNORE
    if low_quality:
        best_per_gt = iou.max(dim=1).values
        _, cand = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
        matches[cand] = best_gt[cand]
    return matches


def sample_balanced(
    labels: Tensor, batch_size: int, positive_fraction: float, generator=None
) -> tuple[Tensor, Tensor]:
    """Sample up to batch_size indices, at most positive_fraction of them positive.

    labels: int64 [N], >= 1 positive, 0 negative, < 0 ignored.
    Returns (positive indices, negative indices), both int64.
    """
    pos = torch.nonzero(labels >= 1).squeeze(1)
    neg = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), pos.numel())
    num_neg = min(batch_size - num_pos, neg.numel())
    pos = pos[torch.randperm(pos.numel(), device=pos.device, generator=generator)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device, generator=generator)[:num_neg]]
    return pos, neg
