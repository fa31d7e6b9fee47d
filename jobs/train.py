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

from jobs.args import add_storage_arguments, int_at_least, number_list, positive

HELP = (
    "train Mask R-CNN on COCO-format data with Ray Train (DDP); resumable, checkpoints to any URI"
)
AT_LEAST_0, AT_LEAST_1 = int_at_least(0), int_at_least(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    _model_arguments(p)
    _fine_tune_arguments(p)
    _scale_arguments(p)
    _schedule_arguments(p)
    _run_arguments(p)


def _data_arguments(p: argparse.ArgumentParser) -> None:
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


def _model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model (one of these, or --init)").add_mutually_exclusive_group()
    model.add_argument("--preset", help="r50-fpn, r50-fpn-v2, r101-fpn or tiny")
    model.add_argument(
        "--config", metavar="FILE", help='JSON/YAML of config fields, optionally with "preset"'
    )
    sizes = p.add_argument_group("input size (default: the config's)")
    sizes.add_argument("--min-size", type=AT_LEAST_1, help="shorter side after resizing")
    sizes.add_argument("--max-size", type=AT_LEAST_1, help="cap on the longer side")


def _fine_tune_arguments(p: argparse.ArgumentParser) -> None:
    tune = p.add_argument_group("fine-tuning")
    tune.add_argument(
        "--init",
        metavar="URI",
        help="start from these weights: our .safetensors, torchvision Mask R-CNN v1/v2 "
        "(.pth/.safetensors) or a torchvision ResNet classification state dict",
    )
    tune.add_argument(
        "--class-map",
        metavar="OLD=NEW,...",
        help="rename init classes before matching them to --data's by name (person=pedestrian)",
    )
    tune.add_argument(
        "--trainable-layers",
        choices=("heads", "5+", "4+", "3+", "2+", "all"),
        help="what trains: heads (RPN, FPN, RoI heads), N+ (and ResNet stages N..5) or all "
        "(default with --init: 3+; frozen layers get no gradient)",
    )
    tune.add_argument(
        "--train-norms",
        action="store_true",
        help="keep BatchNorm layers training (default: frozen when fine-tuning)",
    )


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    scale = p.add_argument_group("scale")
    scale.add_argument(
        "--workers", type=AT_LEAST_1, default=1, help="Ray Train workers (DDP ranks)"
    )
    scale.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: CPU with gloo")
    scale.add_argument("--cpus-per-worker", type=positive, default=1.0)
    scale.add_argument(
        "--batch-size", type=AT_LEAST_1, default=2, help="images per worker per iteration"
    )
    scale.add_argument("--loader-workers", type=AT_LEAST_0, help="DataLoader processes")
    scale.add_argument(
        "--address", help="Ray address (default: RAY_ADDRESS, else a local instance)"
    )


def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    sched = p.add_argument_group("schedule")
    length = sched.add_mutually_exclusive_group()
    length.add_argument("--iters", type=AT_LEAST_1, help="optimizer steps in all")
    length.add_argument("--epochs", type=positive, help="passes over the data (default 1)")
    sched.add_argument("--lr", type=positive, help="base lr (default 0.02 x global batch / 16)")
    sched.add_argument("--momentum", type=float, default=0.9)
    sched.add_argument("--weight-decay", type=float, default=1e-4)
    sched.add_argument(
        "--warmup-iters", type=AT_LEAST_0, help="linear warm-up (default min(500, iters/10))"
    )
    sched.add_argument(
        "--lr-steps",
        type=number_list,
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


def _run_arguments(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run")
    run.add_argument(
        "--storage", default="runs", metavar="URI", help="where runs live (default ./runs)"
    )
    run.add_argument(
        "--name", help="run name: STORAGE/NAME (default: from the preset and the data)"
    )
    run.add_argument("--checkpoint-every", type=AT_LEAST_1, default=500, metavar="N")
    run.add_argument("--keep-checkpoints", type=AT_LEAST_1, default=3, metavar="K")
    run.add_argument(
        "--eval-every",
        type=AT_LEAST_0,
        default=0,
        metavar="N",
        help="COCO evaluation of --val-data every N iterations (0: at the end only)",
    )
    run.add_argument(
        "--max-failures", type=int, default=3, help="worker-group restarts allowed (-1: no limit)"
    )
    run.add_argument("--log-every", type=AT_LEAST_1, help="iterations between log lines")
    add_storage_arguments(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.driver import train
    from pipeline.train.options import TrainOptions

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
        if summary.get("curves"):
            print(f"train: curves {summary['curves']}")
    return 0
