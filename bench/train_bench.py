"""Training benchmarks: speed against torchvision, and quality reached in a wall-time budget.

speed: training images/s of our tiny model against torchvision's MaskRCNN
built with the same layers (ResNet-18 body with BatchNorm, 64-channel FPN,
the same anchors, sampling sizes, heads and input sizes), on the same
batches of 128 px shapes, SGD step included. fp32 ratio, and the speed-up
of our bf16 fast path (and of torchvision under bf16 autocast) on top.
Medians of interleaved repeats in one process.

quality: `maskrcnn train` with the tiny preset from scratch, 2 workers, on
2,000 128 px shapes images; segm/bbox AP on the 200 held-out images from the
run's final evaluation, with the wall time of the whole command (Ray
start-up included). The iteration count is fixed (--iters): the result says
whether the run fitted the budget on the machine as loaded at the time.

    .venv/bin/python bench/train_bench.py [--speed] [--quality] [--minutes 20] [--iters N]

Writes (merges into) bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, interleaved, median, write_result  # noqa: E402

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]


# --- models --------------------------------------------------------------------------


def our_tiny(**overrides) -> torch.nn.Module:
    from maskrcnn import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(0)
    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES, **overrides)
    return MaskRCNN(cfg).train()


def torchvision_tiny() -> torch.nn.Module:
    """torchvision's MaskRCNN with the tiny preset's architecture and settings."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from maskrcnn import MaskRCNNConfig

    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES)
    torch.manual_seed(0)
    c = cfg.fpn_channels
    backbone = BackboneWithFPN(
        resnet18(weights=None, norm_layer=torch.nn.BatchNorm2d),
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=c,
        extra_blocks=LastLevelMaxPool(),
    )
    names = ["0", "1", "2", "3"]
    pool = dict(sampling_ratio=cfg.roi_sampling_ratio, canonical_scale=cfg.canonical_scale)
    return MaskRCNN(
        backbone,
        num_classes=None,  # given by the box and mask predictors below
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=AnchorGenerator(
            tuple((s,) for s in cfg.anchor_sizes), (cfg.aspect_ratios,) * 5
        ),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.detections_per_img,
        box_roi_pool=MultiScaleRoIAlign(names, cfg.box_roi_size, **pool),
        box_head=TwoMLPHead(c * cfg.box_roi_size**2, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes),
        mask_roi_pool=MultiScaleRoIAlign(names, cfg.mask_roi_size, **pool),
        mask_head=MaskRCNNHeads(c, list(cfg.mask_head_channels), 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels[-1], c, cfg.num_classes),
    ).train()


# --- speed ---------------------------------------------------------------------------


def shapes_batches(count: int, batch: int, size: int = 128) -> list[tuple[list, list]]:
    """``count`` batches of shapes images with targets (uint8 images, torchvision targets)."""
    from pipeline.formats.shapes import iter_shapes

    samples = []
    for s in iter_shapes(count * batch, size, seed=11):
        masks = torch.from_numpy(s.masks.astype("uint8"))
        ys, xs = masks.any(2), masks.any(1)
        boxes = torch.stack(
            [
                xs.float().argmax(1),
                ys.float().argmax(1),
                size - xs.flip(1).float().argmax(1),
                size - ys.flip(1).float().argmax(1),
            ],
            1,
        ).float()
        target = {"boxes": boxes, "labels": torch.from_numpy(s.category_ids), "masks": masks}
        samples.append((torch.from_numpy(s.image).permute(2, 0, 1).contiguous(), target))
    return [
        ([im for im, _ in samples[i : i + batch]], [t for _, t in samples[i : i + batch]])
        for i in range(0, len(samples), batch)
    ]


def train_steps(model, batches, mode: str, ours: bool):
    """A function running one SGD step per batch (fp32, or bf16: ours fast=True / autocast)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def run():
        for images, targets in batches:
            if ours:
                losses = model(images, targets, fast=mode == "bf16")
            else:
                floats = [im.float() / 255 for im in images]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                    losses = model(floats, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def bench_speed(batch: int, steps: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    batches = shapes_batches(steps, batch)
    ours, tv = our_tiny(), torchvision_tiny()
    fns = {
        "ours_fp32": train_steps(ours, batches, "fp32", True),
        "torchvision_fp32": train_steps(tv, batches, "fp32", False),
        "ours_bf16": train_steps(ours, batches, "bf16", True),
        "torchvision_bf16": train_steps(tv, batches, "bf16", False),
    }
    for fn in fns.values():  # warm-up: allocator, oneDNN kernels
        fn()
    times = interleaved(fns, repeats)
    ips = {k: batch * steps / median(v) for k, v in times.items()}
    result = {
        "batch": batch,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "threads": threads,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "ratio_fp32_ours_over_torchvision": round(ips["ours_fp32"] / ips["torchvision_fp32"], 3),
        "speedup_bf16_over_fp32_ours": round(ips["ours_bf16"] / ips["ours_fp32"], 3),
        "ratio_bf16_ours_over_torchvision": round(ips["ours_bf16"] / ips["torchvision_bf16"], 3),
        "seconds_per_repeat": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }
    return result


# --- quality -------------------------------------------------------------------------


def ensure_shapes(root: Path, images: int, val_images: int) -> None:
    if (root / "train" / "annotations.json").exists() and (
        root / "val" / "annotations.json"
    ).exists():
        return
    subprocess.run(
        [str(REPO / ".venv/bin/maskrcnn"), "shapes", str(root), "--images", str(images),
         "--size", "128", "--val-images", str(val_images), "--seed", "0"],
        check=True,
    )  # fmt: skip


def bench_quality(args) -> dict:
    data = Path(args.data_dir)
    ensure_shapes(data, 2000, 200)
    run_root = Path(args.run_dir)
    name = f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [
        str(REPO / ".venv/bin/maskrcnn"), "train",
        "--data", str(data / "train"), "--val-data", str(data / "val"),
        "--preset", "tiny", "--workers", "2", "--batch-size", str(args.batch_size),
        "--iters", str(args.iters), "--lr", str(args.lr), "--warmup-iters", "100",
        "--amp", "--checkpoint-every", "1000", "--keep-checkpoints", "1",
        "--storage", str(run_root), "--name", name,
    ]  # fmt: skip
    print("quality:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    )
    wall = time.perf_counter() - start
    result = {
        "command": " ".join(cmd[1:]),
        "iterations": args.iters,
        "wall_s": round(wall, 1),
        "budget_s": args.minutes * 60,
        "exit_code": proc.returncode,
    }
    last = sorted((run_root / name).glob("checkpoint_0*"))
    if proc.returncode == 0 and last:
        state = json.loads((last[-1] / "state.json").read_text())
        m = state["metrics"]
        result.update(
            {
                "segm_AP": round(m["segm_AP"], 4),
                "segm_AP50": round(m["segm_AP50"], 4),
                "bbox_AP": round(m["bbox_AP"], 4),
                "bbox_AP50": round(m["bbox_AP50"], 4),
                "eval_images": m["eval_images"],
                "final_images_per_s": round(m["images_per_s"], 2),
                "targets": {"segm_AP": 0.65, "segm_AP50": 0.9, "wall_s": args.minutes * 60},
                "met": m["segm_AP"] >= 0.65 and m["segm_AP50"] >= 0.9 and wall <= args.minutes * 60,
            }
        )
    return result


# (flag, type, default, help) of the benchmark's options with a value.
OPTIONS = [
    ("--batch", int, 8, "speed: images per step"),
    ("--steps", int, 3, "speed: steps per timed repeat"),
    ("--repeats", int, 5, None),
    ("--threads", int, 1, "speed: torch threads (1: stable on a shared machine)"),
    ("--minutes", float, 20.0, "quality: wall-time budget"),
    ("--iters", int, 1400, "quality: iterations (default 1400: about 17 minutes at 11 images/s)"),
    ("--batch-size", int, 4, "quality: images per worker"),
    ("--lr", float, 0.02, None),
    ("--data-dir", str, str(REPO / "bench/data/shapes-2000-128"), None),
    ("--run-dir", str, str(REPO / "bench/data/runs"), None),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed", action="store_true", help="only the speed part (default: both)")
    p.add_argument("--quality", action="store_true", help="only the quality part")
    for flag, kind, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    args = p.parse_args()
    both = not (args.speed or args.quality)
    path = RESULTS / "train.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = {k: previous[k] for k in ("speed", "quality") if k in previous}
    if args.speed or both:
        results["speed"] = bench_speed(args.batch, args.steps, args.repeats, args.threads)
        print(json.dumps(results["speed"], indent=2), flush=True)
    if args.quality or both:
        results["quality"] = bench_quality(args)
        print(json.dumps(results["quality"], indent=2), flush=True)
    print(f"wrote {write_result('train', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
