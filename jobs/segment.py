"""`maskrcnn segment INPUT OUTPUT --model URI`: every image under INPUT -> Parquet in OUTPUT."""

from __future__ import annotations

import argparse

from jobs.args import (
    actors,
    add_dashboard_argument,
    add_storage_arguments,
    non_negative,
    positive_int,
    score,
    storage_options_for,
    use_dashboard,
)

HELP = (
    "segment the images under INPUT that OUTPUT (a Delta table) has no row for yet, and "
    "append their rows in one commit (Ray Data, exactly once)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _source_arguments(p)
    _scale_arguments(p)
    _output_arguments(p)
    _cluster_arguments(p)


def _source_arguments(p: argparse.ArgumentParser) -> None:
    """INPUT, OUTPUT and the model."""
    p.add_argument(
        "input",
        metavar="INPUT",
        help="image prefix (any fsspec URI), a .txt/.parquet list of URIs, or an S3 Inventory manifest.json",
    )
    p.add_argument("output", metavar="OUTPUT", help="output folder (any fsspec URI)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="URI", help="maskrcnn safetensors checkpoint")
    src.add_argument(
        "--torchvision-weights",
        metavar="PATH",
        help="torchvision Mask R-CNN state dict (.pth or .safetensors)",
    )
    p.add_argument(
        "--variant",
        choices=["v1", "v2"],
        default="v1",
        help="torchvision weights variant (default v1)",
    )
    p.add_argument(
        "--num-classes", type=positive_int, help="class count the torchvision weights must have"
    )


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    """Batching and the model actors' resources."""
    p.add_argument(
        "--batch-size", type=positive_int, default=4, help="images per model call (default 4)"
    )
    p.add_argument(
        "--actors", type=actors, help="model actors: N or MIN,MAX (default: one per GPU, else 1)"
    )
    p.add_argument(
        "--gpus-per-actor", type=non_negative, help="default 1 when the cluster has GPUs, else 0"
    )
    p.add_argument(
        "--cpus-per-actor",
        type=non_negative,
        help="default 1 with GPUs, else half the largest node's CPUs",
    )


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """What the rows hold and how they are written."""
    p.add_argument(
        "--score-threshold",
        type=score,
        help="keep detections scoring at least this (model default)",
    )
    p.add_argument(
        "--max-detections", type=positive_int, help="at most this many detections per image"
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="bf16 autocast (fp16 on GPUs before Ampere) and channels-last; scores move by ~1e-3..1e-2",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="TF32 matmuls/convolutions for fp32 on Ampere+ GPUs (no effect on CPU); "
        "scores move by ~1e-4..1e-3",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace every row of OUTPUT's table in one commit (even of another model or "
        "options); the versions before stay readable until the table is vacuumed",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove the rows of images INPUT no longer lists, in the run's commit",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="segment again the images whose row is an error and replace those rows",
    )
    p.add_argument(
        "--rows-per-part",
        type=positive_int,
        default=500,
        help="images per Parquet file, also the most work a killed run loses (default 500)",
    )


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Storage, the Ray cluster and stalls."""
    add_storage_arguments(p)
    p.add_argument(
        "--address",
        help="Ray address (default: RAY_ADDRESS, else the live `ray start` cluster, else local)",
    )
    add_dashboard_argument(p)
    # Cluster shape and stalls (issue 17).
    p.add_argument(
        "--stall-timeout",
        type=non_negative,
        default=900.0,
        metavar="SECONDS",
        help="fail after this long without a part while a demand fits no alive node "
        "(default 900; 0: never)",
    )
    p.add_argument(
        "--autoscaling",
        action="store_true",
        help="the cluster adds nodes on demand: an actor no node can host warns, not fails",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.segment.driver import SegmentOptions, segment
    from pipeline.segment.model_source import ModelSource

    use_dashboard(args)
    source = ModelSource(
        checkpoint=args.model,
        torchvision=args.torchvision_weights,
        variant=args.variant,
        num_classes=args.num_classes,
    )
    opts = SegmentOptions(
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        fast=args.fast,
        tf32=args.tf32,
        overwrite=args.overwrite,
        prune=args.prune,
        retry_errors=args.retry_errors,
        rows_per_part=args.rows_per_part,
        ray_address=args.address,
        stall_timeout=args.stall_timeout,
        autoscaling=args.autoscaling,
        input_options=storage_options_for(args, args.input),
        output_options=storage_options_for(args, args.output),
        model_options=storage_options_for(args, source.uri),
    )
    segment(args.input, args.output, source, opts, log=lambda m: print(m, flush=True))
    return 0
