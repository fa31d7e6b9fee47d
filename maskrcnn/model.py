"""Mask R-CNN: backbone + FPN -> RPN -> RoI heads (box, mask) -> post-processing."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from maskrcnn import masks as mask_ops
from maskrcnn.backbone import Backbone
from maskrcnn.config import MaskRCNNConfig
from maskrcnn.roi_heads import RoIHeads
from maskrcnn.rpn import RPN
from maskrcnn.transforms import batch_images, padded_size, resize_to_model, to_float_image


class MaskRCNN(nn.Module):
    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.rpn = RPN(cfg, cfg.fpn_channels)
        self.roi_heads = RoIHeads(cfg, cfg.fpn_channels)
        # Tracks the module's device for inputs (not saved in checkpoints).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._channels_last = False

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # --- shared steps -------------------------------------------------------------
    def _as_list(self, images) -> list[Tensor]:
        if isinstance(images, Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        if len(images) == 0:
            raise ValueError("no images given")
        return list(images)

    def _features(self, batch: Tensor, fast: bool):
        if self.cfg.channels_last or fast:
            if not self._channels_last:
                self.backbone.to(memory_format=torch.channels_last)
                self.roi_heads.mask_head.to(memory_format=torch.channels_last)
                self._channels_last = True
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.backbone(batch)

    def _padding_groups(self, sizes: list[tuple[int, int]], fast: bool) -> list[list[int]]:
        """Indices of the images batched together.

        fp32 pads the whole batch to its largest image, as torchvision does, so
        results match it. Fast mode on CPU batches only images of the same padded
        shape: a CPU pays for padding in full (12% more pixels when 4:3 and 3:2
        images share a batch), and batching gains it nothing.
        """
        if not fast or self.device.type != "cpu":
            return [list(range(len(sizes)))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            groups.setdefault(padded_size(h, w, self.cfg.size_divisible), []).append(i)
        return list(groups.values())

    def _autocast(self, fast: bool):
        if not fast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # --- training -------------------------------------------------------------------
    def forward(self, images, targets: list[dict[str, Tensor]] | None = None, fast: bool = False):
        """Training: the loss dict. Without targets (eval): the same as predict(images)."""
        if targets is None:
            if self.training:
                raise ValueError("training mode needs targets; call model.eval() or predict()")
            return self.predict(images)
        images = self._as_list(images)
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        resized, scaled_targets = [], []
        for i, (im, t) in enumerate(zip(images, targets)):
            im = to_float_image(im.to(self.device), i)
            check_target(t, i, im.shape[-2:], self.cfg.num_classes)
            r = resize_to_model(im, self.cfg)
            sy, sx = r.shape[-2] / im.shape[-2], r.shape[-1] / im.shape[-1]
            scale = torch.tensor([sx, sy, sx, sy], device=self.device)
            scaled_targets.append(
                {
                    "boxes": t["boxes"].to(self.device).float() * scale,
                    "labels": t["labels"].to(self.device).long(),
                    "masks": t["masks"].to(self.device),
                    "mask_scale": scale,
                }
            )
            resized.append(r)
        batch, sizes = batch_images(resized, self.cfg.size_divisible)
        with self._autocast(fast):
            feats = self._features(batch, fast)
            proposals, rpn_losses = self.rpn(feats, batch.shape[-2:], sizes, scaled_targets)
            head_losses = self.roi_heads(feats, proposals, sizes, scaled_targets)
        return {**{k: v.float() for k, v in rpn_losses.items()}, **head_losses}

    # --- inference ------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        images,
        *,
        fast: bool | None = None,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        paste_masks: bool = True,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image, in the input image's pixels.

        images: uint8 [3, H, W] (or float 0..1) tensors of any sizes; with
        ``original_sizes`` they are already resize_to_model() outputs and
        results are mapped back to those (height, width).
        Returns dicts: boxes fp32 [N, 4] (x1, y1, x2, y2), scores fp32 [N]
        descending, labels int64 [N], and masks bool [N, H, W] (or, with
        paste_masks=False, mask_probs fp32 [N, M, M] for masks.paste_masks).
        """
        images = self._as_list(images)
        fast = self.cfg.fast if fast is None else fast
        was_training = self.training
        self.eval()
        try:
            if original_sizes is None:
                floats = [to_float_image(im.to(self.device), i) for i, im in enumerate(images)]
                original_sizes = [(im.shape[-2], im.shape[-1]) for im in floats]
                resized = [resize_to_model(im, self.cfg) for im in floats]
            else:
                if len(original_sizes) != len(images):
                    raise ValueError(f"{len(images)} images but {len(original_sizes)} sizes")
                resized = [im.to(self.device, torch.float32) for im in images]
            sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]
            dets: list[dict[str, Tensor]] = [{} for _ in resized]
            for group in self._padding_groups(sizes, fast):
                batch, group_sizes = batch_images(
                    [resized[i] for i in group], self.cfg.size_divisible
                )
                with self._autocast(fast):
                    feats = self._features(batch, fast)
                    proposals, _ = self.rpn(feats, batch.shape[-2:], group_sizes)
                    found = self.roi_heads.detect(
                        feats,
                        proposals,
                        group_sizes,
                        score_threshold,
                        max_detections,
                        channels_last=self.cfg.channels_last or fast,
                    )
                del feats
                for i, det in zip(group, found):
                    dets[i] = det
        finally:
            self.train(was_training)
        out = []
        for det, size, orig in zip(dets, sizes, original_sizes):
            ry = torch.tensor(orig[0], dtype=torch.float32) / torch.tensor(
                size[0], dtype=torch.float32
            )
            rx = torch.tensor(orig[1], dtype=torch.float32) / torch.tensor(
                size[1], dtype=torch.float32
            )
            boxes = det["boxes"] * torch.stack([rx, ry, rx, ry]).to(det["boxes"].device)
            item = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
            if paste_masks:
                item["masks"] = mask_ops.paste_masks(
                    det["mask_probs"], boxes, int(orig[0]), int(orig[1]), self.cfg.mask_threshold
                )
            else:
                item["mask_probs"] = det["mask_probs"]
            out.append(item)
        return out


def check_target(t: dict[str, Tensor], index: int, size, num_classes: int) -> None:
    """Raise ValueError naming the image when a target is malformed or a box is degenerate."""
    for key in ("boxes", "labels", "masks"):
        if key not in t:
            raise ValueError(f"image {index}: target has no {key!r}")
    boxes = t["boxes"]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"image {index}: boxes must be [K, 4], got {list(boxes.shape)}")
    if len(t["labels"]) != len(boxes) or len(t["masks"]) != len(boxes):
        raise ValueError(
            f"image {index}: {len(boxes)} boxes, {len(t['labels'])} labels, {len(t['masks'])} masks"
        )
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        j = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"image {index}: degenerate box {j} {[round(float(v), 2) for v in boxes[j]]} "
            "(x2 <= x1 or y2 <= y1)"
        )
    if len(boxes) and (t["labels"].min() < 1 or t["labels"].max() >= num_classes):
        raise ValueError(f"image {index}: labels must be in 1..{num_classes - 1}")
    if len(boxes) and tuple(t["masks"].shape[-2:]) != tuple(size):
        raise ValueError(
            f"image {index}: masks are {list(t['masks'].shape[-2:])} but the image is {list(size)}"
        )
