"""Mask R-CNN: backbone + FPN -> RPN -> RoI heads (box, mask) -> post-processing."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

import maskrcnn.masks as mask_ops
from maskrcnn.backbone import Backbone
from maskrcnn.config import MaskRCNNConfig
from maskrcnn.roi_heads import RoIHeads
from maskrcnn.rpn import RPN
from maskrcnn.transforms import batch_images, padded_size, resize_to_model, to_float_image


class MaskRCNN(nn.Module):
    """Mask R-CNN: ResNet + FPN backbone, RPN, box and mask heads, post-processing.

    A model is built in channels-last layout unless told otherwise (see
    :meth:`to_layout`), and maskrcnn.checkpoint's load and from_torchvision
    return models so built.

    Args:
        cfg (MaskRCNNConfig): the architecture.
        channels_last (bool): the layout it is built in (default True).

    Example::

        model = MaskRCNN(MaskRCNNConfig.preset("r50-fpn")).eval()
        detections = model.predict([image])  # image: uint8 [3, H, W]
    """

    def __init__(self, cfg: MaskRCNNConfig, channels_last: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.rpn = RPN(cfg, cfg.fpn_channels)
        self.roi_heads = RoIHeads(cfg, cfg.fpn_channels)
        # Tracks the module's device for inputs (not saved in checkpoints).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._channels_last = False
        self.to_layout(channels_last)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: inputs are moved there."""
        return self._anchor.device

    @property
    def channels_last(self) -> bool:
        """Whether the model runs channels-last (set by :meth:`to_layout`)."""
        return self._channels_last

    def to_layout(self, channels_last: bool) -> MaskRCNN:
        """Lay the model out channels-last (NHWC) or contiguous (NCHW); returns self.

        Every convolution weight takes the layout (backbone, FPN, RPN head, box
        and mask heads), and forward and predict lay out their inputs to match.
        Training sets it before DDP wraps the model, so that gradients and their
        buckets share the weights' layout. Channels-last is what oneDNN and
        tensor cores run fastest. Results agree across layouts
        to float rounding; :func:`maskrcnn.checkpoint.model_id` does not depend
        on it, and load_state_dict and ``.to(device)`` keep it.

        Args:
            channels_last (bool): True for channels-last, False for contiguous.

        Returns:
            MaskRCNN: self.
        """
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=layout)
        self._channels_last = channels_last
        return self

    # --- shared steps -------------------------------------------------------------
    def _as_list(self, images) -> list[Tensor]:
        if isinstance(images, Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        if len(images) == 0:
            raise ValueError("no images given")
        return list(images)

    def _inputs_channels_last(self, fast: bool) -> bool:
        """Inputs are laid out channels-last when the model is, and always in fast mode
        (a contiguous model then keeps its weights as they are)."""
        return self._channels_last or fast

    def _features(self, batch: Tensor, fast: bool) -> list[Tensor]:
        if self._inputs_channels_last(fast):
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.backbone(batch)

    def _padding_groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices of the images run through the model together.

        An image padded to a batch-mate's larger shape gets other features near
        its border and more anchors, so other detections: images are batched
        only with images of their own padded shape, padded exactly as alone. On
        CPU each image runs alone: oneDNN picks its convolution kernels by batch
        size, and a batch of two rounds the last bits of small feature maps
        differently from one image; a CPU gains little from batching anyway
        (bench/model_bench.py measures the three ways).

        Args:
            sizes (list[tuple[int, int]]): (h, w) of each resized image.

        Returns:
            list[list[int]]: groups of indices into ``sizes``, in first-seen order.
        """
        if self.device.type == "cpu":
            return [[i] for i in range(len(sizes))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            groups.setdefault(padded_size(h, w, self.cfg.size_divisible), []).append(i)
        return list(groups.values())

    def _autocast(self, fast: bool):
        """Fast mode's autocast: bf16, or fp16 on a CUDA GPU without bf16 (before Ampere)."""
        if not fast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=fast_dtype(self.device))

    # --- training -------------------------------------------------------------------
    def forward(
        self, images, targets: list[dict[str, Tensor]] | None = None, fast: bool = False
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the loss dict. Without targets (eval mode): the same as predict(images).

        Args:
            images (list[Tensor[3, H_i, W_i]] or Tensor[B, 3, H, W]): uint8 (0..255) or
                float (0..1) RGB images of any sizes; resized and normalised here.
            targets (list[dict], optional): per image ``boxes`` float [G_i, 4]
                (x1, y1, x2, y2) in the image's pixels, ``labels`` int64 [G_i] in
                1..num_classes-1 and ``masks`` uint8/bool [G_i, H_i, W_i]; G_i may be 0.
            fast (bool): bf16 autocast and channels-last inputs (see predict).

        Returns:
            dict[str, Tensor]: fp32 scalars ``loss_objectness``, ``loss_rpn_box_reg``,
            ``loss_classifier``, ``loss_box_reg`` and ``loss_mask``; without targets,
            what predict returns.
        """
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
        fast: bool = False,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        paste_masks: bool = True,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image, in the input image's pixels (eval mode, no gradient).

        Args:
            images (list[Tensor[3, H_i, W_i]] or Tensor[B, 3, H, W]): uint8 (0..255) or
                float (0..1) RGB images of any sizes; with ``original_sizes``, float32
                resize_to_model() outputs instead.
            fast (bool): bf16 autocast for the convolutions and fc6 (RoIAlign, NMS, box
                decoding and the box predictor stay fp32) and channels-last inputs. Scores
                move by ~1e-3..1e-2 (COCO AP: bench/fast_ap_bench.py). Fastest on a
                channels-last model (the default).
            score_threshold (float, optional): class probability a detection must pass
                (default cfg.box_score_thresh).
            max_detections (int, optional): most detections per image (default
                cfg.detections_per_img).
            paste_masks (bool): paste the masks into the image (else return mask_probs).
            original_sizes (list[tuple[int, int]], optional): the (height, width) each
                resized input came from; results are mapped back to those.

        Returns:
            list[dict[str, Tensor]]: per image ``boxes`` fp32 [N, 4] (x1, y1, x2, y2),
            ``scores`` fp32 [N] descending, ``labels`` int64 [N] and ``masks`` bool
            [N, H_i, W_i] (or, with paste_masks=False, ``mask_probs`` fp32 [N, M, M]
            in 0..1 for masks.paste_masks, M = cfg.mask_resolution).
        """
        images = self._as_list(images)
        was_training = self.training
        self.eval()
        try:
            resized, original_sizes = self._prepare(images, original_sizes)
            sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]
            dets = self._detect_batch(resized, sizes, fast, score_threshold, max_detections)
        finally:
            self.train(was_training)
        return [
            self._to_original(det, size, orig, paste_masks)
            for det, size, orig in zip(dets, sizes, original_sizes)
        ]

    def _prepare(self, images: list[Tensor], original_sizes: list[tuple[int, int]] | None):
        """The model inputs (float32 [3, h, w] on the device, resized and normalised) and
        the (height, width) each came from."""
        if original_sizes is None:
            floats = [to_float_image(im.to(self.device), i) for i, im in enumerate(images)]
            original_sizes = [(im.shape[-2], im.shape[-1]) for im in floats]
            return [resize_to_model(im, self.cfg) for im in floats], original_sizes
        if len(original_sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(original_sizes)} sizes")
        return [im.to(self.device, torch.float32) for im in images], original_sizes

    def _detect_batch(
        self,
        resized: list[Tensor],
        sizes: list[tuple[int, int]],
        fast: bool,
        score_threshold: float | None,
        max_detections: int | None,
    ) -> list[dict[str, Tensor]]:
        """RoIHeads.detect's detections (resized-image pixels) for every input, batched
        by _padding_groups."""
        dets: list[dict[str, Tensor]] = [{} for _ in resized]
        for group in self._padding_groups(sizes):
            batch, group_sizes = batch_images([resized[i] for i in group], self.cfg.size_divisible)
            with self._autocast(fast):
                feats = self._features(batch, fast)
                proposals, _ = self.rpn(feats, batch.shape[-2:], group_sizes)
                found = self.roi_heads.detect(
                    feats,
                    proposals,
                    group_sizes,
                    score_threshold,
                    max_detections,
                    channels_last=self._inputs_channels_last(fast),
                )
            del feats
            for i, det in zip(group, found):
                dets[i] = det
        return dets

    def _to_original(
        self, det: dict[str, Tensor], size: tuple[int, int], orig, paste_masks: bool
    ) -> dict[str, Tensor]:
        """One image's detections scaled from its resized ``size`` to ``orig`` (height,
        width), with its masks pasted there or left as mask_probs."""
        ry = torch.tensor(orig[0], dtype=torch.float32) / torch.tensor(size[0], dtype=torch.float32)
        rx = torch.tensor(orig[1], dtype=torch.float32) / torch.tensor(size[1], dtype=torch.float32)
        boxes = det["boxes"] * torch.stack([rx, ry, rx, ry]).to(det["boxes"].device)
        item = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
        if paste_masks:
            item["masks"] = mask_ops.paste_masks(
                det["mask_probs"], boxes, int(orig[0]), int(orig[1]), self.cfg.mask_threshold
            )
        else:
            item["mask_probs"] = det["mask_probs"]
        return item


def fast_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of fast mode on ``device``: bf16, except fp16 on CUDA GPUs that
    lack bf16 (compute capability below 8.0), where bf16 is emulated and slow."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def check_target(t: dict[str, Tensor], index: int, size, num_classes: int) -> None:
    """Raise ValueError naming the image when a target is malformed or a box is degenerate.

    Args:
        t (dict[str, Tensor]): ``boxes`` [K, 4] (x1, y1, x2, y2), ``labels`` [K], ``masks``
            [K, H, W].
        index (int): the image's position in the batch, for the message.
        size (tuple[int, int]): (H, W) of the image.
        num_classes (int): classes including the background; labels must be in 1..that - 1.
    """
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
