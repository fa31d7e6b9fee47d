"""What tests/gpu and bench/gpu_check.py share: the device under test, calibrated reference
weights, the CPU-parity and fast-mode criteria, and a fixed training batch.

Imports only what the GPU machine has (torch, torchvision, numpy, safetensors); no Ray.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torchvision.ops import box_iou

from maskrcnn import MaskRCNN
from maskrcnn.checkpoint import from_torchvision

from .reference import build_torchvision, calibrate, smooth_images

# `make test-gpu` runs on "cuda"; GPU_TEST_DEVICE=cpu runs the same suite on CPU, which
# proves everything but the CUDA kernels (imports, shapes, criteria) on a machine without one.
DEVICE_ENV = "GPU_TEST_DEVICE"

# fp32 on the GPU against fp32 on the CPU: the parity criteria of tests/maskrcnn/test_parity.py.
FP32 = {"box_iou_min": 0.99, "score_tol": 1e-3, "mask_iou_min": 0.97, "fraction": 0.99}
# Fast mode (bf16 or fp16 autocast) against fp32. Fast mode's cost is judged in COCO AP on
# a trained model (bench/fast_ap_bench.py); on these calibrated random weights, whose 40
# detections per image score within a few hundredths of each other, bf16 reorders and
# replaces some of them: 70% of 80 matched on CPU bf16 (torch 2.14). The tolerance
# catches a broken fast path (wrong casts, garbage), which matches next to none.
FAST = {"box_iou_min": 0.8, "score_tol": 5e-2, "mask_iou_min": 0.8, "fraction": 0.6}


def device_under_test() -> torch.device:
    """The device named by GPU_TEST_DEVICE (default cuda); ValueError when it is absent."""
    name = os.environ.get(DEVICE_ENV, "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"{DEVICE_ENV}={name}: no CUDA device visible to torch {torch.__version__} "
            "(make test-gpu needs an NVIDIA GPU; GPU_TEST_DEVICE=cpu runs it on CPU)"
        )
    return torch.device(name)


def set_strict_fp32() -> None:
    """No TF32 anywhere: fp32 on the GPU is then comparable with fp32 on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@functools.cache
def reference_state(sizes: tuple[tuple[int, int], ...], seed: int = 0) -> dict[str, Tensor]:
    """A calibrated torchvision v1 (91 classes) state dict, calibrated on smooth_images(sizes)."""
    images = smooth_images(list(sizes), seed=seed)
    tv = calibrate(build_torchvision("v1", 91, seed=seed), [im.float() / 255 for im in images])
    return tv.state_dict()


def reference_models(sizes, min_size: int, max_size: int, seed: int = 0):
    """(torchvision model, our model) on CPU with identical calibrated weights, both resizing
    images to min_size / max_size, 40 detections at most."""
    state = reference_state(tuple(sizes), seed)
    tv = build_torchvision("v1", 91, seed=seed)
    tv.load_state_dict(state)
    tv.transform.min_size, tv.transform.max_size = (min_size,), max_size
    tv.roi_heads.detections_per_img = 40
    ours: MaskRCNN = from_torchvision(state, variant="v1")
    ours.cfg.min_size, ours.cfg.max_size = min_size, max_size
    ours.cfg.detections_per_img = 40
    return tv.eval(), ours.eval()


def matched_fraction(
    refs: list[dict[str, Tensor]], outs: list[dict[str, Tensor]], criteria: dict
) -> tuple[float, int]:
    """(fraction matched, detections): ref detections with a same-label detection in out
    within the criteria's box IoU, score difference and mask IoU (bool masks)."""
    matched = total = 0
    for ref, out in zip(refs, outs):
        ref = {k: v.cpu() for k, v in ref.items()}
        out = {k: v.cpu() for k, v in out.items()}
        n = len(ref["boxes"])
        total += n
        if n == 0 or len(out["boxes"]) == 0:
            continue
        iou = box_iou(ref["boxes"].float(), out["boxes"].float())
        iou = torch.where(ref["labels"][:, None] == out["labels"][None, :], iou, -1.0)
        best, j = iou.max(1)
        score = (ref["scores"].float() - out["scores"][j].float()).abs()
        a, b = ref["masks"].flatten(1), out["masks"][j].flatten(1)
        union = (a | b).sum(1).float()
        mask_iou = torch.where(union > 0, (a & b).sum(1).float() / union.clamp(min=1), 1.0)
        ok = (
            (best >= criteria["box_iou_min"])
            & (score <= criteria["score_tol"])
            & (mask_iou >= criteria["mask_iou_min"])
        )
        matched += int(ok.sum())
    return (matched / total if total else 0.0), total


def shapes_batch(n: int, size: int, seed: int = 0) -> tuple[list[Tensor], list[dict]]:
    """A fixed training batch of n shapes images (uint8 [3, size, size]) and their targets."""
    from pipeline.formats.shapes import iter_shapes

    images, targets = [], []
    for sample in iter_shapes(n, size, seed):
        keep = sample.masks.reshape(len(sample.masks), -1).any(1)
        masks = torch.from_numpy(sample.masks[keep])
        boxes = torch.stack([_mask_box(m) for m in masks]) if len(masks) else torch.zeros(0, 4)
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1).contiguous())
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.from_numpy(sample.category_ids[keep]).long(),
                "masks": masks.to(torch.uint8),
            }
        )
    return images, targets


def _mask_box(mask: Tensor) -> Tensor:
    """(x1, y1, x2, y2) of a bool [H, W] mask, x2/y2 one past the last pixel."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
