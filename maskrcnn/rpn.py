"""Region Proposal Network over the FPN levels: objectness + anchor deltas -> proposals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.anchors import (
    AnchorGenerator,
    decode_boxes,
    match_labels,
    regression_targets,
    sample_balanced,
    select_boxes,
)
from maskrcnn.config import MaskRCNNConfig

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class RPNHead(nn.Module):
    """Shared across levels: 3x3 conv(s) + ReLU, then 1x1 objectness (A) and deltas (4A).

    Args:
        channels (int): channels of the FPN maps.
        num_anchors (int): A, anchors per location.
        conv_depth (int): 3x3 convs before the two outputs (torchvision v2: 2).
    """

    def __init__(self, channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            ]
        )
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Objectness logits and box deltas at every location of every level.

        Args:
            feats (list[Tensor[B, C, H_l, W_l]]): the FPN levels.

        Returns:
            tuple[list[Tensor[B, A, H_l, W_l]], list[Tensor[B, 4A, H_l, W_l]]]: per level
            the objectness logits and the (t_x, t_y, t_w, t_h) deltas, in the maps' dtype.
        """
        logits, deltas = [], []
        for f in feats:
            t = self.conv(f)
            logits.append(self.objectness(t))
            deltas.append(self.deltas(t))
        return logits, deltas


def flatten_level(x: Tensor, c: int) -> Tensor:
    """One level's head output as rows in grid_anchors' (row, column, anchor) order.

    Args:
        x (Tensor[B, A * c, H, W]): objectness (c = 1) or deltas (c = 4) of one level.
        c (int): values per anchor.

    Returns:
        Tensor[B, H * W * A, c]: the same values, one row per anchor.
    """
    b, _, h, w = x.shape
    return x.view(b, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, c)


class RPN(nn.Module):
    """Region Proposal Network: objectness and box deltas for the anchors of every FPN
    level, decoded into proposals by top-n per level and NMS.

    Args:
        cfg (MaskRCNNConfig): the model's config (anchor_sizes, aspect_ratios, rpn_*).
        in_channels (int): channels of the FPN maps.
    """

    def __init__(self, cfg: MaskRCNNConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.anchors = AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios)
        self.head = RPNHead(in_channels, self.anchors.num_anchors_per_location, cfg.rpn_conv_depth)

    def forward(
        self,
        feats: list[Tensor],
        batch_shape: tuple[int, int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image and, given targets, the RPN losses.

        Args:
            feats (list[Tensor[B, C, H_l, W_l]]): the FPN levels P2..P6.
            batch_shape (tuple[int, int]): (H, W) of the padded batch.
            image_sizes (list[tuple[int, int]]): (height, width) of each image in it;
                proposals are clipped to it.
            targets (list[dict], optional): per image ``boxes`` fp32 [G_i, 4]
                (x1, y1, x2, y2, resized pixels); training only.

        Returns:
            tuple[list[Tensor[P_i, 4]], dict[str, Tensor]]: fp32 proposals per image,
            (x1, y1, x2, y2) in resized-image pixels, best first (no gradient); and
            ``loss_objectness`` and ``loss_rpn_box_reg`` (fp32 scalars), empty without
            targets.
        """
        logits, deltas = self.head(feats)
        anchors = self.anchors(batch_shape, [f.shape[-2:] for f in feats], feats[0].device)
        per_level = [a.shape[0] for a in anchors]
        logits_flat = torch.cat([flatten_level(x, 1) for x in logits], 1).squeeze(2).float()
        deltas_flat = torch.cat([flatten_level(x, 4) for x in deltas], 1).float()
        all_anchors = torch.cat(anchors)
        b = logits_flat.shape[0]
        boxes = decode_boxes(
            deltas_flat.detach().reshape(-1, 4), all_anchors.repeat(b, 1), RPN_WEIGHTS
        ).view(b, -1, 4)
        proposals = self.select_proposals(boxes, logits_flat.detach(), per_level, image_sizes)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self.losses(logits_flat, deltas_flat, all_anchors, targets)
        return proposals, losses

    def select_proposals(
        self, boxes: Tensor, logits: Tensor, per_level: list[int], image_sizes
    ) -> list[Tensor]:
        """Top-n per level, clip, drop tiny boxes, NMS per level, keep post-NMS top-n.

        Args:
            boxes (Tensor[B, N, 4]): fp32 decoded anchors of all levels, (x1, y1, x2, y2).
            logits (Tensor[B, N]): fp32 objectness logits of the same anchors.
            per_level (list[int]): anchors per level, in the order of N.
            image_sizes (list[tuple[int, int]]): (height, width) of each image.

        Returns:
            list[Tensor[P_i, 4]]: fp32 proposals per image, by descending objectness.
        """
        train = self.training
        pre_n = self.cfg.rpn_pre_nms_top_n_train if train else self.cfg.rpn_pre_nms_top_n_test
        post_n = self.cfg.rpn_post_nms_top_n_train if train else self.cfg.rpn_post_nms_top_n_test
        # Top-n anchors of each level, for the whole batch at once.
        idx, levels, start = [], [], 0
        for lvl, n in enumerate(per_level):
            k = min(pre_n, n)
            top = logits[:, start : start + n].topk(k, dim=1).indices + start
            idx.append(top)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=logits.device))
            start += n
        idx = torch.cat(idx, 1)
        level = torch.cat(levels)
        rows = torch.arange(boxes.shape[0], device=boxes.device)[:, None]
        top_boxes, top_scores = boxes[rows, idx], torch.sigmoid(logits[rows, idx])
        out = []
        for bx, sc, size in zip(top_boxes, top_scores, image_sizes):
            passed = sc >= self.cfg.rpn_score_thresh
            bx, _, _ = select_boxes(
                bx, sc, level, passed, size, 1e-3, self.cfg.rpn_nms_thresh, post_n
            )
            out.append(bx)
        return out

    def losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors; smooth-L1 box loss on the positives.

        Anchors with IoU >= rpn_fg_iou_thresh (or the best for some box) are
        positive, below rpn_bg_iou_thresh negative, between ignored;
        rpn_batch_size_per_image are sampled per image.

        Args:
            logits (Tensor[B, N]): fp32 objectness logits over all levels' anchors.
            deltas (Tensor[B, N, 4]): fp32 predicted (t_x, t_y, t_w, t_h).
            anchors (Tensor[N, 4]): fp32 anchors, (x1, y1, x2, y2).
            targets (list[dict]): per image ``boxes`` fp32 [G_i, 4] (x1, y1, x2, y2).

        Returns:
            dict[str, Tensor]: fp32 scalars ``loss_objectness`` (mean BCE over the
            sampled anchors) and ``loss_rpn_box_reg`` (smooth-L1 summed over the
            positives, over the number sampled).
        """
        cfg = self.cfg
        labels, regression = [], []
        for t in targets:
            objects = t["boxes"].new_ones(len(t["boxes"]), dtype=torch.int64)  # one class
            m, lab = match_labels(
                t["boxes"], objects, anchors, cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, True
            )
            labels.append(lab)
            regression.append(regression_targets(t["boxes"], m, anchors, RPN_WEIGHTS))
        labels_t = torch.stack(labels)
        pos_idx, neg_idx = [], []
        for i, lab in enumerate(labels):
            pos, neg = sample_balanced(lab, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
            pos_idx.append(pos + i * anchors.shape[0])
            neg_idx.append(neg + i * anchors.shape[0])
        pos = torch.cat(pos_idx)
        sampled = torch.cat([pos, torch.cat(neg_idx)])
        flat_logits = logits.reshape(-1)
        flat_labels = labels_t.reshape(-1).float()
        objectness = F.binary_cross_entropy_with_logits(flat_logits[sampled], flat_labels[sampled])
        box = F.smooth_l1_loss(
            deltas.reshape(-1, 4)[pos],
            torch.cat(regression)[pos],
            beta=1.0 / 9,
            reduction="sum",
        ) / max(sampled.numel(), 1)
        return {"loss_objectness": objectness, "loss_rpn_box_reg": box}
