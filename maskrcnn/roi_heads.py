"""Second stage: box head (class + class-specific box) and, in parallel, the mask head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.anchors import (
    decode_boxes,
    match_labels,
    regression_targets,
    sample_balanced,
    select_boxes,
)
from maskrcnn.backbone import conv_block
from maskrcnn.config import FPN_LEVELS, MaskRCNNConfig
from maskrcnn.masks import mask_targets
from maskrcnn.poolers import inference_maps, multiscale_roi_align


class ConvHead(nn.Module):
    """The start both heads share: 3x3 conv blocks (conv, optional BatchNorm, ReLU) on
    the pooled RoI features [K, C, n, n], as ``convs``; each head adds its layers.

    Args:
        channels (int): C, channels of the pooled features.
        widths (tuple[int, ...]): output channels of each block; empty: no convs.
        norm (bool): a BatchNorm after each conv.
    """

    def __init__(self, channels: int, widths: tuple[int, ...], norm: bool):
        super().__init__()
        blocks, cin = [], channels
        for c in widths:
            blocks.append(conv_block(cin, c, 3, norm=norm, relu=True))
            cin = c
        self.convs = nn.Sequential(*blocks)
        self.out_channels = cin


class BoxHead(ConvHead):
    """RoI features [K, C, 7, 7] -> [K, box_head_dim]: cfg.box_head "2fc" (two fc layers)
    or "4conv1fc" (four convs with BatchNorm, one fc), fc width cfg.box_head_dim, for
    RoIs pooled to cfg.box_roi_size; C is ``channels``.
    """

    def __init__(self, cfg: MaskRCNNConfig, channels: int):
        two_fc = cfg.box_head == "2fc"
        super().__init__(channels, () if two_fc else (channels,) * 4, norm=True)
        r = cfg.box_roi_size
        self.fc6 = nn.Linear(channels * r * r, cfg.box_head_dim)
        self.fc7 = nn.Linear(cfg.box_head_dim, cfg.box_head_dim) if two_fc else None

    def forward(self, x: Tensor) -> Tensor:
        # fc6 (12544 -> 1024 per RoI) is most of the head's work: under autocast (fast
        # mode) it runs in bf16 like the convolutions. The small fc7 and the predictor,
        # which decide scores and boxes, stay fp32.
        x = F.relu(self.fc6(self.convs(x).flatten(1))).float()
        if self.fc7 is None:
            return x
        with torch.autocast(x.device.type, enabled=False):
            return F.relu(self.fc7(x))


class BoxPredictor(nn.Module):
    """[K, D] -> class logits [K, num_classes] and per-class deltas [K, num_classes * 4].

    Runs in fp32, outside autocast: it decides scores and boxes.

    Args:
        dim (int): D, the box head's width.
        num_classes (int): classes including the background.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.cls_score(x), self.bbox_pred(x)


class MaskHead(ConvHead):
    """FCN on [K, C, 14, 14]: 3x3 convs (cfg.mask_head_channels, BatchNorm if
    cfg.mask_head_norm), 2x2 deconv, 1x1 -> logits [K, cfg.num_classes, 28, 28]; C is
    ``channels``.
    """

    def __init__(self, cfg: MaskRCNNConfig, channels: int):
        super().__init__(channels, cfg.mask_head_channels, cfg.mask_head_norm)
        cin = self.out_channels
        self.deconv = nn.ConvTranspose2d(cin, cin, 2, stride=2)
        self.logits = nn.Conv2d(cin, cfg.num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(F.relu(self.deconv(self.convs(x))))


class RoIHeads(nn.Module):
    """The second stage: RoIAlign, the box head and predictor, and the mask head.

    Training: calling the module (forward is :meth:`losses`) samples RoIs
    among the proposals and returns the head losses. Inference: :meth:`detect` scores
    and refines the proposals, keeps the best per class after NMS, and
    predicts a mask for each detection. RoIs are pooled from the FPN levels
    ``cfg.roi_pool_levels``, each box from the level its size selects.

    Args:
        cfg (MaskRCNNConfig): the model's config.
        channels (int): channels of the FPN maps (cfg.fpn_channels).
    """

    def __init__(self, cfg: MaskRCNNConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.box_head = BoxHead(cfg, channels)
        self.box_predictor = BoxPredictor(cfg.box_head_dim, cfg.num_classes)
        self.mask_head = MaskHead(cfg, channels)

    def pool_maps(self, feats: list[Tensor]) -> list[Tensor]:
        """The levels of the pyramid (P2..P6, as Backbone returns it) RoIAlign reads:
        cfg.roi_pool_levels, in order."""
        return [feats[FPN_LEVELS.index(k)] for k in self.cfg.roi_pool_levels]

    def _pool(self, feats, boxes, image_sizes, size: int) -> Tensor:
        """RoIAlign of ``boxes`` from the pyramid ``feats`` (P2..P6) on the pooled levels."""
        return self._align(self.pool_maps(feats), boxes, image_sizes, size)

    def _align(self, maps, boxes, image_sizes, size: int) -> Tensor:
        """RoIAlign of ``boxes`` from ``maps``, the pooled levels (see pool_maps)."""
        cfg = self.cfg
        return multiscale_roi_align(
            maps,
            boxes,
            image_sizes,
            size,
            cfg.roi_sampling_ratio,
            cfg.roi_align_aligned,
            cfg.canonical_scale,
            cfg.canonical_level,
        )

    def _run(self, head: nn.Module, x: Tensor, dtype: torch.dtype, channels_last: bool):
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return head(x)

    # --- training ---------------------------------------------------------------
    def losses(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The box and mask head losses over RoIs sampled among proposals and ground truth.

        Ground-truth boxes join each image's proposals; a RoI with IoU at or
        above box_fg_iou_thresh takes its box's class, below
        box_bg_iou_thresh it is background, between it is ignored; then
        box_batch_size_per_image RoIs are sampled per image, at most
        box_positive_fraction of them foreground.

        Args:
            feats (list[Tensor[B, C, H_l, W_l]]): the FPN levels P2..P6 (fp32, or
                bf16 under autocast).
            proposals (list[Tensor[P_i, 4]]): fp32 proposals per image, (x1, y1, x2, y2)
                in resized-image pixels.
            image_sizes (list[tuple[int, int]]): (height, width) of each resized image.
            targets (list[dict]): per image, ``boxes`` fp32 [G_i, 4] (x1, y1, x2, y2,
                resized pixels), ``labels`` int64 [G_i] in 1..num_classes-1, ``masks``
                uint8/bool [G_i, H, W] at the original size, and ``mask_scale`` fp32 [4]
                (sx, sy, sx, sy) from original to resized pixels.

        Returns:
            dict[str, Tensor]: fp32 scalars ``loss_classifier`` (cross-entropy over the
            sampled RoIs), ``loss_box_reg`` (smooth-L1 of the class's deltas on the
            foreground RoIs, over the number sampled) and ``loss_mask`` (see mask_loss).
        """
        rois, labels, regression, matched_gt = [], [], [], []
        for props, t in zip(proposals, targets):
            r, lab, reg, m = self._sample_rois(props, t)
            rois.append(r)
            labels.append(lab)
            regression.append(reg)
            matched_gt.append(m)
        losses = self._box_losses(
            feats, rois, torch.cat(labels), torch.cat(regression), image_sizes
        )
        losses["loss_mask"] = self.mask_loss(feats, rois, labels, matched_gt, image_sizes, targets)
        return losses

    # Calling the module trains: forward is losses. Inference is detect.
    forward = losses

    def _sample_rois(
        self, proposals: Tensor, target: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image's RoIs for the losses, sampled among its proposals [P, 4] and its
        ground-truth boxes: the RoIs [K, 4], their int64 labels [K] (0 background), box
        regression targets [K, 4] and matched ground-truth indices [K]."""
        cfg = self.cfg
        gt = target["boxes"]
        props = torch.cat([proposals, gt])  # ground truth joins the proposals
        m, lab = match_labels(
            gt, target["labels"], props, cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, False
        )
        pos, neg = sample_balanced(lab, cfg.box_batch_size_per_image, cfg.box_positive_fraction)
        keep = torch.cat([pos, neg])
        rois, matched = props[keep], m[keep]
        regression = regression_targets(gt, matched, rois, cfg.bbox_reg_weights)
        return rois, lab[keep], regression, matched

    def _box_losses(self, feats, rois, labels: Tensor, regression: Tensor, image_sizes):
        """``loss_classifier`` and ``loss_box_reg`` (see :meth:`losses`) of the sampled
        ``rois`` (per image), given their labels [K] and regression targets [K, 4]."""
        pooled = self._pool(feats, rois, image_sizes, self.cfg.box_roi_size)
        logits, deltas = self.box_predictor(self.box_head(pooled.to(feats[0].dtype)))
        logits, deltas = logits.float(), deltas.float()
        loss_cls = F.cross_entropy(logits, labels)
        pos = torch.nonzero(labels > 0).squeeze(1)
        deltas = deltas.reshape(deltas.shape[0], -1, 4)
        loss_box = F.smooth_l1_loss(
            deltas[pos, labels[pos]], regression[pos], beta=1.0 / 9, reduction="sum"
        ) / max(labels.numel(), 1)
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def mask_loss(self, feats, rois, labels, matched_gt, image_sizes, targets) -> Tensor:
        """Per-pixel BCE on the ground-truth class's channel of the positive RoIs.

        Args:
            feats (list[Tensor[B, C, H_l, W_l]]): the FPN levels P2..P6.
            rois (list[Tensor[K_i, 4]]): the sampled RoIs per image, (x1, y1, x2, y2)
                in resized-image pixels.
            labels (list[Tensor[K_i]]): int64 class per RoI, 0 for background.
            matched_gt (list[Tensor[K_i]]): int64 index of each RoI's ground-truth box.
            image_sizes (list[tuple[int, int]]): (height, width) of each resized image.
            targets (list[dict]): as for :meth:`losses` (``masks``, ``mask_scale``).

        Returns:
            Tensor: fp32 scalar, the mean BCE over the mask_resolution**2 pixels of
            every positive RoI; a zero connected to the mask head's weights when
            there are none.
        """
        size = self.cfg.mask_resolution
        pos_rois, pos_labels, goals = [], [], []
        for r, lab, m, t in zip(rois, labels, matched_gt, targets):
            p = torch.nonzero(lab > 0).squeeze(1)
            pos_rois.append(r[p])
            pos_labels.append(lab[p])
            # RoIs are in resized pixels; the masks stay at the original size.
            goals.append(mask_targets(t["masks"], r[p] / t["mask_scale"], m[p], size))
        pos_labels_t = torch.cat(pos_labels)
        if pos_labels_t.numel() == 0:
            # Keep the graph connected (DDP) with a zero that has a gradient.
            return sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        pooled = self._pool(feats, pos_rois, image_sizes, self.cfg.mask_roi_size)
        logits = self.mask_head(pooled.to(feats[0].dtype)).float()
        picked = logits[torch.arange(logits.shape[0], device=logits.device), pos_labels_t]
        return F.binary_cross_entropy_with_logits(picked, torch.cat(goals))

    # --- inference --------------------------------------------------------------
    @torch.no_grad()
    def detect(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        score_thresh: float | None = None,
        max_detections: int | None = None,
        channels_last: bool = False,
    ) -> list[dict[str, Tensor]]:
        """Detections per image: class-specific boxes after per-class NMS, with masks.

        Args:
            feats (list[Tensor[B, C, H_l, W_l]]): the FPN levels P2..P6 (fp32, or bf16
                under autocast: the heads then run in that dtype).
            proposals (list[Tensor[P_i, 4]]): fp32 proposals per image, (x1, y1, x2, y2)
                in resized-image pixels.
            image_sizes (list[tuple[int, int]]): (height, width) of each resized image;
                boxes are clipped to it.
            score_thresh (float, optional): class probability a detection must pass
                (default cfg.box_score_thresh).
            max_detections (int, optional): most detections per image (default
                cfg.detections_per_img).
            channels_last (bool): lay the mask head's input out channels-last (as
                MaskRCNN does when it, or fast mode, runs channels-last).

        Returns:
            list[dict[str, Tensor]]: per image ``boxes`` fp32 [N, 4] (x1, y1, x2, y2,
            resized-image pixels), ``scores`` fp32 [N] descending, ``labels`` int64 [N]
            in 1..num_classes-1 and ``mask_probs`` fp32 [N, M, M] in 0..1
            (M = cfg.mask_resolution), each mask the probability map of its box.
        """
        cfg = self.cfg
        score_thresh = cfg.box_score_thresh if score_thresh is None else score_thresh
        max_det = cfg.detections_per_img if max_detections is None else max_detections
        maps = inference_maps(self.pool_maps(feats))  # laid out once for both poolings
        pooled = self._align(maps, proposals, image_sizes, cfg.box_roi_size)
        logits, deltas = self.box_predictor(self.box_head(pooled.to(feats[0].dtype)))
        probs = F.softmax(logits.float(), -1)
        boxes = decode_boxes(deltas.float(), torch.cat(proposals), cfg.bbox_reg_weights)
        counts = [len(x) for x in proposals]
        results = [
            self._select(b, p, size, score_thresh, max_det)
            for b, p, size in zip(boxes.split(counts), probs.split(counts), image_sizes)
        ]
        self._add_masks(results, maps, image_sizes, feats[0].dtype, channels_last)
        return results

    def _select(self, boxes: Tensor, probs: Tensor, size, score_thresh: float, max_det: int):
        """One image's detections from its decoded boxes [P, num_classes, 4] and class
        probabilities [P, num_classes]: every (box, class) pair but the background's
        above score_thresh and not empty, after per-class NMS, best max_det first."""
        b = boxes[:, 1:].reshape(-1, 4)
        s = probs[:, 1:].reshape(-1)
        lab = torch.arange(1, self.cfg.num_classes, device=b.device).repeat(probs.shape[0])
        nms = self.cfg.box_nms_thresh
        b, s, lab = select_boxes(b, s, lab, s > score_thresh, size, 1e-2, nms, max_det)
        return {"boxes": b, "scores": s, "labels": lab}

    def _add_masks(self, results, maps, image_sizes, dtype: torch.dtype, channels_last: bool):
        """Set each result's ``mask_probs``: the mask head, for all detections of the
        batch in one pass, on its label's channel."""
        det_boxes = [r["boxes"] for r in results]
        if sum(len(b) for b in det_boxes) == 0:
            m = self.cfg.mask_resolution
            for r in results:
                r["mask_probs"] = torch.zeros((0, m, m), device=r["boxes"].device)
            return
        pooled = self._align(maps, det_boxes, image_sizes, self.cfg.mask_roi_size)
        maps.clear()  # the maps' memory goes before the mask head's
        logits = self._run(self.mask_head, pooled, dtype, channels_last).float()
        labels = torch.cat([r["labels"] for r in results])
        mask_probs = torch.sigmoid(logits[torch.arange(len(labels), device=labels.device), labels])
        for r, mp in zip(results, mask_probs.split([len(b) for b in det_boxes])):
            r["mask_probs"] = mp
