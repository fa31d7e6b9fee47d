"""`maskrcnn shapes OUTPUT`: write a synthetic shapes dataset in COCO format.

OUTPUT/train/annotations.json + OUTPUT/train/images/*.png (and OUTPUT/val/...
with --val-images M). OUTPUT is any fsspec URI. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse

from jobs.args import add_storage_arguments, storage_options_for

HELP = "write a synthetic shapes dataset (squares, circles, triangles, ...) in COCO format"
SHAPE_KINDS = ("square", "circle", "triangle", "star", "cross", "ellipse", "diamond", "hexagon")
# (pipeline.formats.shapes.SHAPE_KINDS; spelled out so that --help imports nothing heavy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="output directory URI (local or s3://)")
    parser.add_argument("--images", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument(
        "--size", type=int, default=128, help="image side in pixels (default 128, minimum 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--val-images", type=int, default=0, help="validation images under OUTPUT/val (default 0)"
    )
    parser.add_argument(
        "--classes",
        metavar="NAME,...",
        default="square,circle,triangle",
        help=f"shapes drawn, category ids 1.. in this order, from {','.join(SHAPE_KINDS)}",
    )
    add_storage_arguments(parser, anon=False)


def run(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.formats.shapes import make_shapes_dataset

    # Bad counts or size raise ValueError: the CLI prints one line and exits 2.
    options = storage_options_for(args, args.output)
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    summary = make_shapes_dataset(
        args.output, args.images, args.size, args.seed, args.val_images, options, classes
    )
    train = summary["train"]
    kinds = ", ".join(f"{train[c]} {c}{'es' if c.endswith(('s', 'x')) else 's'}" for c in classes)
    line = f"shapes: wrote {train['images']} train images ({train['objects']} objects: {kinds})"
    if "val" in summary:
        line += f" + {summary['val']['images']} val images ({summary['val']['objects']} objects)"
    line += f" of {args.size}px, seed {args.seed}, to {storage.redact(args.output)}"
    print(f"{line} in {summary['seconds']:.1f}s")
    return 0
