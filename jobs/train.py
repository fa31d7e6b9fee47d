"""`maskrcnn train`: distributed Mask R-CNN training on Ray Train (DDP), resumable.

    maskrcnn train --data s3://bucket/coco/train --val-data s3://bucket/coco/val \\
        --preset r50-fpn --workers 8 --gpus-per-worker 1 --batch-size 2 --iters 90000 \\
        --amp --storage s3://bucket/runs --name coco-r50

Checkpoints go to STORAGE/NAME/checkpoint_<iteration>/ (the last --keep-checkpoints
kept), the final model to STORAGE/NAME/model.safetensors. Running the same
command again continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json

HELP = (
    "train Mask R-CNN on COCO-format data with Ray Train (DDP); resumable, checkpoints to any URI"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        metavar="URI",
        help="COCO annotations JSON (or its folder), any URI",
    )
    data.add_argument(
        "--val-data", metavar="URI", help="COCO data evaluated on rank 0 (AP metrics)"
    )

    model = p.add_argument_group("model").add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="r50-fpn, r50-fpn-v2, r101-fpn or tiny")
    model.add_argument(
        "--config", metavar="FILE", help='JSON/YAML of config fields, optionally with "preset"'
    )
    sizes = p.add_argument_group("input size (default: the config's)")
    sizes.add_argument("--min-size", type=_positive_int, help="shorter side after resizing")
    sizes.add_argument("--max-size", type=_positive_int, help="cap on the longer side")

    scale = p.add_argument_group("scale")
    scale.add_argument(
        "--workers", type=_positive_int, default=1, help="Ray Train workers (DDP ranks)"
    )
    scale.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: CPU with gloo")
    scale.add_argument("--cpus-per-worker", type=_positive_float, default=1.0)
    scale.add_argument(
        "--batch-size", type=_positive_int, default=2, help="images per worker per iteration"
    )
    scale.add_argument("--loader-workers", type=_non_negative_int, help="DataLoader processes")
    scale.add_argument(
        "--address", help="Ray address (default: RAY_ADDRESS, else a local instance)"
    )

    sched = p.add_argument_group("schedule")
    length = sched.add_mutually_exclusive_group()
    length.add_argument("--iters", type=_positive_int, help="optimizer steps in all")
    length.add_argument("--epochs", type=_positive_float, help="passes over the data (default 1)")
    sched.add_argument(
        "--lr", type=_positive_float, help="base lr (default 0.02 x global batch / 16)"
    )
    sched.add_argument("--momentum", type=float, default=0.9)
    sched.add_argument("--weight-decay", type=float, default=1e-4)
    sched.add_argument(
        "--warmup-iters", type=_non_negative_int, help="linear warm-up (default min(500, iters/10))"
    )
    sched.add_argument(
        "--lr-steps",
        type=_fractions,
        default=(0.75, 0.92),
        help="lr x --lr-gamma at these points: fractions of the run or iterations (default 0.75,0.92)",
    )
    sched.add_argument("--lr-gamma", type=float, default=0.1)
    sched.add_argument("--clip-grad", type=float, default=10.0, help="max grad norm (0: off)")
    sched.add_argument(
        "--amp", action="store_true", help="mixed precision (bf16; fp16 + scaler on old GPUs)"
    )
    sched.add_argument(
        "--scale-jitter", type=float, default=0.25, help="random input scale within +-this (0: off)"
    )
    sched.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips")
    sched.add_argument("--seed", type=int, default=0)

    run = p.add_argument_group("run")
    run.add_argument(
        "--storage", default="runs", metavar="URI", help="where runs live (default ./runs)"
    )
    run.add_argument(
        "--name", help="run name: STORAGE/NAME (default: from the preset and the data)"
    )
    run.add_argument("--checkpoint-every", type=_positive_int, default=500, metavar="N")
    run.add_argument("--keep-checkpoints", type=_positive_int, default=3, metavar="K")
    run.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="COCO evaluation of --val-data every N iterations (0: at the end only)",
    )
    run.add_argument(
        "--max-failures", type=int, default=3, help="worker-group restarts allowed (-1: no limit)"
    )
    run.add_argument("--log-every", type=_positive_int, help="iterations between log lines")
    run.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    run.add_argument("--anon", action="store_true", default=None, help="anonymous S3 access")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.driver import TrainOptions, train

    fields = TrainOptions.__dataclass_fields__
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})
    summary = train(opts)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        metrics = summary["metrics"]
        line = f"train: {summary['model']} (model id {summary['model_id']}, iteration {summary['iteration']})"
        if "segm_AP" in metrics:
            line += (
                f": bbox AP {metrics['bbox_AP']:.3f}, segm AP {metrics['segm_AP']:.3f}, "
                f"segm AP50 {metrics['segm_AP50']:.3f}"
            )
        print(line)
    return 0
