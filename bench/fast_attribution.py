"""Which part of the network, run in bf16, moves fast mode's detections away from fp32.

Runs our model on 2 images of about 800x1067 (the weights of model_bench.py)
once in fp32, then with bf16 autocast in one part at a time (ResNet body,
FPN, RPN, RoI heads) and in all of them. Against the fp32 run it reports the
share of detections with a same-label match at box IoU >= 0.99 whose score
is within 1e-3 (the parity criteria without the mask), and the median score
difference. Writes bench/results/fast_attribution.json.

    .venv/bin/python bench/fast_attribution.py
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.ops import box_iou  # noqa: E402

from bench.common import write_result  # noqa: E402
from maskrcnn.checkpoint import from_torchvision  # noqa: E402
from maskrcnn.transforms import batch_images, resize_to_model  # noqa: E402
from tests.helpers.reference import build_torchvision, calibrate, smooth_images  # noqa: E402

PARTS = ("body", "fpn", "rpn", "heads")


def _bf16(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@torch.inference_mode()
def detect(model, images: list[torch.Tensor], bf16: set[str]) -> list[dict[str, torch.Tensor]]:
    """Detections in resized-image pixels, with autocast on in the parts named in ``bf16``."""
    resized = [resize_to_model(im, model.cfg) for im in images]
    batch, sizes = batch_images(resized, model.cfg.size_divisible)
    batch = batch.contiguous(memory_format=torch.channels_last)
    with _bf16("body" in bf16):
        feats = model.backbone.body(batch)
    with _bf16("fpn" in bf16):
        feats = model.backbone.fpn([f.float() for f in feats])
    with _bf16("rpn" in bf16):
        proposals, _ = model.rpn([f.float() for f in feats], batch.shape[-2:], sizes)
    if "heads" not in bf16:  # fp32 heads take fp32 maps, as in predict(fast=False)
        feats = [f.float() for f in feats]
    with _bf16("heads" in bf16):
        return model.roi_heads.detect(feats, proposals, sizes, channels_last=True)


def agreement(ref: list[dict], out: list[dict]) -> dict[str, float]:
    matched, total, diffs = 0, 0, []
    for r, o in zip(ref, out):
        iou = box_iou(r["boxes"], o["boxes"]) * (r["labels"][:, None] == o["labels"][None])
        best, j = iou.max(1)
        score_diff = (r["scores"] - o["scores"][j]).abs()
        matched += int(((best >= 0.99) & (score_diff <= 1e-3)).sum())
        total += len(best)
        diffs.append(score_diff[best >= 0.9])
    return {
        "share_matching": matched / max(total, 1),
        "score_diff_median": float(torch.cat(diffs).median()),
    }


def main() -> None:
    images = smooth_images([(800, 1067), (768, 1024)])
    floats = [im.float() / 255 for im in images]
    model = from_torchvision(calibrate(build_torchvision("v1", 91), floats).state_dict(), "v1")
    model.eval()
    reference = detect(model, floats, set())
    rows = {part: agreement(reference, detect(model, floats, {part})) for part in PARTS}
    rows["all"] = agreement(reference, detect(model, floats, set(PARTS)))
    path = write_result(
        "fast_attribution",
        {"images": 2, "criteria": "box IoU >= 0.99, score within 1e-3", "bf16_in": rows},
    )
    for part, row in rows.items():
        print(
            f"bf16 in {part:<6} {row['share_matching']:.3f} matching, median score diff {row['score_diff_median']:.1e}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
