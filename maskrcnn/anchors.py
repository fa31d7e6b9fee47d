"""Anchors, box coding (t_x, t_y, t_w, t_h), matching and balanced sampling: what the RPN
and the RoI heads share, down to the selection both end with (clip, filter, NMS).

Boxes are float tensors [N, 4] in (x1, y1, x2, y2) pixel coordinates unless
a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from maskrcnn.ops import batched_nms, box_iou

# exp(dw) is clamped so that a box grows at most 1000/16 times its anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> Tensor:
    """Anchors centred on (0, 0) for one size, one per aspect ratio.

    Ratio r is height / width at constant area size**2; corners are rounded
    to whole pixels.

    Args:
        size (int): the anchors' side at ratio 1, in pixels.
        aspect_ratios (tuple[float, ...]): A height / width ratios.

    Returns:
        Tensor[A, 4]: float32 anchors in (x1, y1, x2, y2) format about the origin.
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
    """All anchors of one level: the cell anchors shifted to every cell of the map.

    Args:
        base (Tensor[A, 4]): cell anchors (see cell_anchors), (x1, y1, x2, y2).
        grid_size (tuple[int, int]): (H, W) of the feature map.
        stride (tuple[int, int]): (sy, sx) image pixels between neighbouring cells.
        device (torch.device): where the anchors are made.

    Returns:
        Tensor[H * W * A, 4]: float32 (x1, y1, x2, y2) anchors in image pixels,
        ordered (row, column, anchor).
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
    """Anchors for every FPN level of a padded batch: one size per level, all ratios.

    Args:
        sizes (tuple[int, ...]): the anchor side per level, P2 first (cfg.anchor_sizes).
        aspect_ratios (tuple[float, ...]): height / width ratios at every level.
    """

    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]):
        self.bases = [cell_anchors(s, aspect_ratios) for s in sizes]
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        """A: anchors per feature-map cell (one per aspect ratio)."""
        return self.bases[0].shape[0]

    def __call__(
        self, batch_size: tuple[int, int], feature_sizes: list[tuple[int, int]], device
    ) -> list[Tensor]:
        """The anchors of every level, cached per shape and device.

        Args:
            batch_size (tuple[int, int]): (H, W) of the padded batch.
            feature_sizes (list[tuple[int, int]]): (H_l, W_l) of each level's map.
            device (torch.device): where the anchors live.

        Returns:
            list[Tensor[H_l * W_l * A, 4]]: float32 (x1, y1, x2, y2) anchors per level,
            in image pixels, ordered as grid_anchors orders them.
        """
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
    """Regression targets (t_x, t_y, t_w, t_h) of boxes against their anchors.

    t_x = wx (x - x_a) / w_a, t_w = ww log(w / w_a), with (x, y) box centres.

    Args:
        targets (Tensor[N, 4]): float boxes, (x1, y1, x2, y2).
        anchors (Tensor[N, 4]): float anchors or proposals, (x1, y1, x2, y2), one per box.
        weights (tuple[float, ...]): (wx, wy, ww, wh).

    Returns:
        Tensor[N, 4]: the deltas (t_x, t_y, t_w, t_h), in the boxes' dtype.
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
    """Apply deltas to anchors: the inverse of encode_boxes.

    dw and dh are clamped at BBOX_XFORM_CLIP before the exponential.

    Args:
        deltas (Tensor[N, 4k]): (t_x, t_y, t_w, t_h) per box, any float dtype; k > 1
            holds one box per class (class-specific refinement).
        anchors (Tensor[N, 4]): anchors or proposals, (x1, y1, x2, y2).
        weights (tuple[float, ...]): (wx, wy, ww, wh), as given to encode_boxes.

    Returns:
        Tensor[N, k, 4]: fp32 boxes, (x1, y1, x2, y2).
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
    """Clip boxes to an image.

    Args:
        boxes (Tensor[..., 4]): float boxes, (x1, y1, x2, y2).
        size (tuple[int, int]): (height, width) of the image.

    Returns:
        Tensor[..., 4]: the boxes with x in [0, width] and y in [0, height].
    """
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nonempty(boxes: Tensor, min_size: float) -> Tensor:
    """Which boxes are at least min_size wide and high.

    Args:
        boxes (Tensor[N, 4]): float boxes, (x1, y1, x2, y2).
        min_size (float): the smallest side kept, in the boxes' pixels.

    Returns:
        Tensor[N]: bool, True where both sides are at least min_size.
    """
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def select_boxes(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    passed: Tensor,
    image_size: tuple[int, int],
    min_size: float,
    nms_thresh: float,
    top_n: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's boxes that pass, clipped to it and not empty, after NMS within each
    group, best top_n first: how the RPN ends (groups: levels) and the RoI heads (classes).

    Args:
        boxes (Tensor[N, 4]): float boxes, (x1, y1, x2, y2), not yet clipped.
        scores (Tensor[N]): their scores, higher is better.
        groups (Tensor[N]): int64 group of each box; NMS never compares two groups.
        passed (Tensor[N]): bool, the boxes whose score the caller's threshold keeps.
        image_size (tuple[int, int]): (height, width) of the image.
        min_size (float): the smallest side kept after clipping, in pixels.
        nms_thresh (float): IoU above which NMS drops the lower-scoring box.
        top_n (int): most boxes kept.

    Returns:
        tuple[Tensor[K, 4], Tensor[K], Tensor[K]]: the kept boxes (clipped), scores and
        groups, by descending score.
    """
    boxes = clip_boxes(boxes, image_size)
    keep = passed & nonempty(boxes, min_size)
    boxes, scores, groups = boxes[keep], scores[keep], groups[keep]
    keep = batched_nms(boxes, scores, groups, nms_thresh)[:top_n]
    return boxes[keep], scores[keep], groups[keep]


# --- matching and sampling ----------------------------------------------------

BACKGROUND = -1
"""match value of a candidate whose best IoU is below bg_thresh."""
IGNORE = -2
"""match value of a candidate whose best IoU is between the thresholds."""
IGNORED_LABEL = -1
"""Sampling label of a candidate that is neither positive nor negative (sample_balanced
skips negative labels); the RPN and RoI heads give it to the IGNORE matches."""


def match(
    gt_boxes: Tensor, candidates: Tensor, fg_thresh: float, bg_thresh: float, low_quality: bool
) -> Tensor:
    """The ground-truth box each candidate matches, by IoU.

    BACKGROUND (-1) when the best IoU is below bg_thresh, IGNORE (-2) when it
    is in [bg_thresh, fg_thresh). With ``low_quality``, every ground-truth
    box also claims the candidates that overlap it most, even below
    fg_thresh (the RPN rule, so that every object has an anchor).

    Args:
        gt_boxes (Tensor[G, 4]): float ground-truth boxes, (x1, y1, x2, y2); G may be 0.
        candidates (Tensor[N, 4]): float anchors or proposals, (x1, y1, x2, y2).
        fg_thresh (float): IoU at or above which a candidate matches its best box.
        bg_thresh (float): IoU below which it is BACKGROUND.
        low_quality (bool): let each box also claim its best-overlapping candidates.

    Returns:
        Tensor[N]: int64, the index in gt_boxes, BACKGROUND or IGNORE (all BACKGROUND
        when G is 0).
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


def match_labels(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    candidates: Tensor,
    fg_thresh: float,
    bg_thresh: float,
    low_quality: bool,
) -> tuple[Tensor, Tensor]:
    """Each candidate's match (see match) and its sampling label for sample_balanced.

    Args:
        gt_boxes (Tensor[G, 4]): float ground-truth boxes, (x1, y1, x2, y2); G may be 0.
        gt_labels (Tensor[G]): int64 class of each box, >= 1 (all 1 for objectness).
        candidates (Tensor[N, 4]): float anchors or proposals, (x1, y1, x2, y2).
        fg_thresh (float): as for match.
        bg_thresh (float): as for match.
        low_quality (bool): as for match.

    Returns:
        tuple[Tensor[N], Tensor[N]]: int64 matches (index in gt_boxes, BACKGROUND or
        IGNORE) and labels (the matched box's class, 0 for BACKGROUND, IGNORED_LABEL
        for IGNORE).
    """
    matches = match(gt_boxes, candidates, fg_thresh, bg_thresh, low_quality)
    labels = gt_labels[matches.clamp(min=0)] if gt_boxes.numel() else matches.clamp(min=0)
    labels = torch.where(matches >= 0, labels, torch.zeros_like(labels))
    labels[matches == IGNORE] = IGNORED_LABEL
    return matches, labels


def regression_targets(
    gt_boxes: Tensor, matches: Tensor, candidates: Tensor, weights: tuple[float, ...]
) -> Tensor:
    """The deltas (t_x, t_y, t_w, t_h) from each candidate to its matched box.

    Args:
        gt_boxes (Tensor[G, 4]): float ground-truth boxes, (x1, y1, x2, y2); G may be 0.
        matches (Tensor[N]): int64 matches of the candidates (see match); only those
            >= 0 give targets that a loss reads.
        candidates (Tensor[N, 4]): float anchors or proposals, (x1, y1, x2, y2).
        weights (tuple[float, ...]): (wx, wy, ww, wh), as for encode_boxes.

    Returns:
        Tensor[N, 4]: the deltas (each candidate against itself when G is 0).
    """
    gt = gt_boxes[matches.clamp(min=0)] if gt_boxes.numel() else candidates
    return encode_boxes(gt, candidates, weights)


def sample_balanced(
    labels: Tensor, batch_size: int, positive_fraction: float, generator=None
) -> tuple[Tensor, Tensor]:
    """Sample up to batch_size indices, at most positive_fraction of them positive.

    Negatives fill what the positives leave; both are drawn at random.

    Args:
        labels (Tensor[N]): int64, >= 1 positive, 0 negative, < 0 (IGNORED_LABEL) ignored.
        batch_size (int): most indices drawn.
        positive_fraction (float): largest share of positives among them.
        generator (torch.Generator, optional): the random source (default torch's).

    Returns:
        tuple[Tensor, Tensor]: int64 indices into labels of the sampled positives
        and of the sampled negatives.
    """
    pos = torch.nonzero(labels >= 1).squeeze(1)
    neg = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), pos.numel())
    num_neg = min(batch_size - num_pos, neg.numel())
    pos = pos[torch.randperm(pos.numel(), device=pos.device, generator=generator)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device, generator=generator)[:num_neg]]
    return pos, neg
