"""Segment pipeline benchmark: end to end against the model alone, memory at 1x vs 10x.

    .venv/bin/python bench/pipeline_bench.py [--images 1000] [--repeats 3] ...

Measured in one run, so that the machine's load (it is shared) weighs on both
sides of every ratio:

* pipeline images/s: ``segment()`` from a folder of PNG files to a committed
  Parquet dataset (listing, reading, decoding, model actors, RLE, Parquet,
  manifest; Ray already started), against the model alone: ``predict`` on the
  same images already decoded, same batch size and mode, in this process;
* peak memory (PSS of this process and every process below it: Ray's
  raylet, workers and object store pages) of a run over --mem-images images
  against a run over 10x as many;
* output bytes per instance: committed Parquet bytes / instances.

Writes bench/results/pipeline.json and prints a table. Never run as a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.common import machine_info  # noqa: E402
from tests.helpers.proctree import TreeMonitor  # noqa: E402


def make_images(root: Path, count: int, size: int) -> list[Path]:
    from pipeline.formats.shapes import iter_shapes, png_bytes

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(iter_shapes(count, size, seed=7)):
        path = root / f"{i // 100:03d}" / f"shape{i:06d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(sample.image))
        paths.append(path)
    return paths


def model_alone(model, paths: list[Path], batch_size: int, fast: bool) -> dict:
    """predict() over pre-decoded images; decoding is not timed."""
    import torch

    from pipeline.formats.decode import decode_image

    images = [torch.from_numpy(decode_image(p.read_bytes())).permute(2, 0, 1) for p in paths]
    model.predict(images[:batch_size], fast=fast)  # warm-up, as the actors' first batch
    start = time.perf_counter()
    instances = 0
    for i in range(0, len(images), batch_size):
        out = model.predict(images[i : i + batch_size], fast=fast)
        instances += sum(int(o["scores"].shape[0]) for o in out)
    seconds = time.perf_counter() - start
    return {"images_per_s": len(images) / seconds, "seconds": seconds, "instances": instances}


def segment_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a segment benchmark (``doc`` its help text), holding the options
    timed_segment(), model_or_tiny() and init_ray() read."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=None, help="default: half the CPUs")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs Ray may use")
    p.add_argument("--rows-per-part", type=int, default=100)
    p.add_argument("--model", help="maskrcnn checkpoint (default: the tiny preset, seed 0)")
    return p


def parse_segment_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """``p.parse_args()`` with --cpus-per-actor's default (half of --cpus) filled in."""
    args = p.parse_args()
    if args.cpus_per_actor is None:
        args.cpus_per_actor = float(max(1, args.cpus // 2))
    return args


def model_or_tiny(model: str | None, work: Path) -> str:
    """``model`` when given, else a fresh tiny-preset checkpoint (seed 0) saved under ``work``."""
    if model:
        return model
    import torch

    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from maskrcnn.checkpoint import save

    torch.manual_seed(0)
    path = str(work / "tiny.safetensors")
    save(MaskRCNN(MaskRCNNConfig.preset("tiny", num_classes=4)), path)
    return path


def init_ray(cpus: int) -> None:
    """A local Ray instance for the benchmark: no dashboard, worker logs or progress bars."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False


def timed_segment(
    input_uri: str, output: Path, model_path: str, args, fast: bool = False, memory: bool = True
) -> tuple[dict, float, TreeMonitor | None]:
    """One ``segment()`` run with the benchmark's options: (summary, seconds, its
    process tree's TreeMonitor, or None without ``memory``). Ray must be started already.

    A sample of the tree's memory reads every process's smaps (about 60 ms of CPU for a
    dozen Ray processes with torch loaded, measured): 0.3 of a core at 5 samples a
    second, which a timed run must not pay when its baseline does not."""
    from pipeline.segment.driver import SegmentOptions, segment
    from pipeline.segment.model_source import ModelSource

    opts = SegmentOptions(
        batch_size=args.batch_size,
        actors=(args.actors, args.actors),
        cpus_per_actor=args.cpus_per_actor,
        fast=fast,
        rows_per_part=args.rows_per_part,
    )
    monitor = TreeMonitor() if memory else contextlib.nullcontext()
    with monitor:
        start = time.perf_counter()
        summary = segment(
            input_uri, str(output), ModelSource(checkpoint=model_path), opts, log=lambda m: None
        )
        seconds = time.perf_counter() - start
    return summary, seconds, monitor if memory else None


def pipeline_run(input_uri: str, output: Path, model_path: str, args, memory: bool) -> dict:
    summary, seconds, monitor = timed_segment(
        input_uri, output, model_path, args, args.fast, memory
    )
    parquet_bytes = sum((output / name).stat().st_size for name in summary["files"])
    counts = summary["counts"]
    this_run = summary["this_run"]
    after_first = this_run["seconds"] - this_run.get("first_part_s", 0.0)
    return {
        "images_per_s": counts["images"] / seconds,
        # The Ray Data run once its first part is out: the rate without the startup.
        "after_first_part_images_per_s": (
            (counts["images"] - this_run.get("first_part_rows", 0)) / after_first
            if after_first > 0
            else None
        ),
        "first_part_s": this_run.get("first_part_s"),
        "seconds": seconds,
        "counts": counts,
        "peak_pss_bytes": monitor.peak_pss if monitor is not None else None,
        "parquet_bytes": parquet_bytes,
        "bytes_per_instance": parquet_bytes / max(1, counts["instances"]),
    }


def main() -> int:
    p = segment_bench_parser(__doc__)
    p.add_argument("--images", type=int, default=1000, help="images in the throughput runs")
    p.add_argument("--mem-images", type=int, default=100, help="1x for the memory ratio (10x too)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per side (median)")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline.json"))
    args = parse_segment_args(p)

    import ray
    import torch

    from maskrcnn.checkpoint import load

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    total = max(args.images, 10 * args.mem_images)
    t0 = time.perf_counter()
    paths = make_images(work / "in", total, args.size)
    print(f"made {total} {args.size}px PNG images in {time.perf_counter() - t0:.0f}s under {work}")
    lists = {}
    for name, count in (
        ("throughput", args.images),
        ("mem1x", args.mem_images),
        ("mem10x", 10 * args.mem_images),
    ):
        lists[name] = work / f"{name}.txt"
        lists[name].write_text("".join(f"{q}\n" for q in paths[:count]))

    model_path = model_or_tiny(args.model, work)
    model = load(model_path).eval()
    torch.set_num_threads(int(args.cpus_per_actor))  # the model alone gets the actor's threads

    init_ray(args.cpus)
    load_before = os.getloadavg()
    alone, pipe = [], []
    for r in range(args.repeats):
        # Alternate the order so that drift in the machine's load hits both sides.
        order = ("alone", "pipeline") if r % 2 == 0 else ("pipeline", "alone")
        for side in order:
            if side == "alone":
                alone.append(model_alone(model, paths[: args.images], args.batch_size, args.fast))
            else:
                pipe.append(
                    pipeline_run(
                        str(lists["throughput"]), work / f"out-{r}", model_path, args, False
                    )
                )
            last = alone[-1] if side == "alone" else pipe[-1]
            print(f"repeat {r} {side:8s} {last['images_per_s']:.2f} images/s")
    mem1 = pipeline_run(str(lists["mem1x"]), work / "out-mem1x", model_path, args, True)
    mem10 = pipeline_run(str(lists["mem10x"]), work / "out-mem10x", model_path, args, True)
    load_after = os.getloadavg()
    ray.shutdown()

    alone_rate = statistics.median(a["images_per_s"] for a in alone)
    pipe_rate = statistics.median(q["images_per_s"] for q in pipe)
    ratios = [q["images_per_s"] / a["images_per_s"] for q, a in zip(pipe, alone)]
    result = {
        "what": "segment end to end (folder of PNGs -> committed Parquet) vs predict() alone",
        "machine": machine_info(load_before, load_after),
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "pipeline_images_per_s_median": pipe_rate,
        "model_alone_images_per_s_median": alone_rate,
        "ratio_pipeline_to_model_median": statistics.median(ratios),
        "ratios": ratios,
        "target_ratio": 0.9,
        "memory": {
            "images_1x": args.mem_images,
            "peak_pss_bytes_1x": mem1["peak_pss_bytes"],
            "peak_pss_bytes_10x": mem10["peak_pss_bytes"],
            "ratio_10x_to_1x": mem10["peak_pss_bytes"] / max(1, mem1["peak_pss_bytes"]),
            "target_ratio": 1.2,
        },
        "output_bytes_per_instance": statistics.median(q["bytes_per_instance"] for q in pipe),
        "instances_per_image": pipe[0]["counts"]["instances"] / max(1, pipe[0]["counts"]["images"]),
        "runs": {"pipeline": pipe, "model_alone": alone, "mem1x": mem1, "mem10x": mem10},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    mib = 1024**2
    print(f"{'':34s}{'value':>12s}  target")
    print(f"{'pipeline images/s (median)':34s}{pipe_rate:12.2f}")
    print(f"{'model alone images/s (median)':34s}{alone_rate:12.2f}")
    steady = statistics.median(q["after_first_part_images_per_s"] or 0.0 for q in pipe)
    first = statistics.median(q["first_part_s"] or 0.0 for q in pipe)
    print(f"{'  after its first part (median)':34s}{steady:12.2f}")
    print(f"{'  seconds to its first part':34s}{first:12.1f}")
    print(
        f"{'pipeline / model (median)':34s}{result['ratio_pipeline_to_model_median']:12.3f}  >= 0.9"
    )
    print(f"{'peak PSS 1x (MiB)':34s}{mem1['peak_pss_bytes'] / mib:12.0f}")
    print(f"{'peak PSS 10x (MiB)':34s}{mem10['peak_pss_bytes'] / mib:12.0f}")
    print(f"{'memory 10x / 1x':34s}{result['memory']['ratio_10x_to_1x']:12.3f}  <= 1.2")
    print(f"{'output bytes per instance':34s}{result['output_bytes_per_instance']:12.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
