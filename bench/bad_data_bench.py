"""Bad data at scale: segment's images/s on a mixed set against a clean set of the same size.

    .venv/bin/python bench/bad_data_bench.py [--images 300] [--repeats 3] ...

The mixed set (tests/helpers/mixed_data.py) holds about 10% broken files of every kind the
segment tests use, one file of each odd mode, huge images (sides 10x to 54x the
tiny preset's max_size; one past the decompression-bomb limit), tiny ones (1x1,
2x3, 5x5) and ordinary shapes pictures; the clean set, as many ordinary pictures.
Both run through ``segment()`` (folder -> committed Parquet; Ray started once,
before) in one process, interleaved (clean, mixed, mixed, clean, ...), so that the
shared machine's load weighs on both. For each run: images/s over all inputs;
the CPU seconds per image used by this process and every process below it (Ray's
raylet and workers): the work done, less moved than wall time by other load; and
the peak memory (PSS and RSS) of that process tree (object store pages included),
sampled every 0.2 s.

Target (issue 7): mixed images/s at least 0.8 of clean. Writes
bench/results/bad_data.json and prints a table. Never run as a test.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.common import machine_info, write_result  # noqa: E402
from bench.pipeline_bench import (  # noqa: E402
    init_ray,
    model_or_tiny,
    parse_segment_args,
    segment_bench_parser,
    timed_segment,
)
from tests.helpers.mixed_data import HUGE_SIZES, write_clean_set, write_mixed_set  # noqa: E402

TARGET_RATIO = 0.8


def segment_run(input_dir: Path, output: Path, model_path: str, args) -> dict:
    """One segment() run, timed, with the peak memory of this process tree."""
    load_before = os.getloadavg()[0]
    summary, seconds, memory = timed_segment(str(input_dir), output, model_path, args)
    counts = summary["counts"]
    return {
        "images_per_s": counts["images"] / seconds,
        "seconds": seconds,
        "counts": counts,
        "cpu_seconds": memory.cpu_seconds,
        "cpu_seconds_per_image": memory.cpu_seconds / max(1, counts["images"]),
        "peak_pss_bytes": memory.peak_pss,
        "peak_rss_bytes": memory.peak_rss,
        "max_processes": memory.max_processes,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0],
    }


def main() -> int:
    p = segment_bench_parser(__doc__)
    p.add_argument("--images", type=int, default=300, help="images in each set")
    p.add_argument("--repeats", type=int, default=3, help="runs per set (median), interleaved")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixed set")
    args = parse_segment_args(p)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bad-data-bench-"))
    t0 = time.perf_counter()
    mixed = write_mixed_set(work / "mixed", args.images, seed=args.seed)
    write_clean_set(work / "clean", args.images)
    kinds = collections.Counter(e.kind for e in mixed.values())
    print(f"made {args.images} mixed {dict(kinds)} + {args.images} clean images in "
          f"{time.perf_counter() - t0:.0f}s under {work}")  # fmt: skip

    model_path = model_or_tiny(args.model, work)
    init_ray(args.cpus)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"clean": [], "mixed": []}
    for r in range(args.repeats):
        # Alternate the order so that drift in the machine's load hits both sides.
        for side in ("clean", "mixed") if r % 2 == 0 else ("mixed", "clean"):
            run = segment_run(work / side, work / f"out-{side}-{r}", model_path, args)
            runs[side].append(run)
            print(
                f"repeat {r} {side:5s} {run['images_per_s']:6.2f} images/s  "
                f"{run['counts']['ok']} ok {run['counts']['error']} errors  "
                f"{run['cpu_seconds_per_image']:.3f} CPU s/image  "
                f"peak PSS {run['peak_pss_bytes'] / 2**20:.0f} MiB  "
                f"load {run['load_avg_1min_before']:.1f}->{run['load_avg_1min_after']:.1f}",
                flush=True,
            )
    load_after = os.getloadavg()
    ray.shutdown()

    rate = {side: statistics.median(r["images_per_s"] for r in runs[side]) for side in runs}
    # Pairs measured back to back (r-th clean with r-th mixed).
    ratios = [m["images_per_s"] / c["images_per_s"] for m, c in zip(runs["mixed"], runs["clean"])]
    cpu = {side: statistics.median(r["cpu_seconds_per_image"] for r in runs[side]) for side in runs}
    peak = {side: max(r["peak_pss_bytes"] for r in runs[side]) for side in runs}
    peak_rss = {side: max(r["peak_rss_bytes"] for r in runs[side]) for side in runs}
    errors = collections.Counter(e.error.split(" (")[0] for e in mixed.values() if e.error)
    result = {
        "what": "segment images/s and peak memory: mixed set (bad, huge, tiny) vs clean set",
        "machine": machine_info(load_before, load_after),
        "params": vars(args),
        "sizes": {
            "images_per_set": args.images,
            "mixed_kinds": dict(kinds),
            "mixed_expected_errors": dict(errors),
            "huge_sizes": [f"{w}x{h} {fmt}" for w, h, fmt in HUGE_SIZES],
        },
        "clean_images_per_s_median": rate["clean"],
        "mixed_images_per_s_median": rate["mixed"],
        "ratio_mixed_to_clean_median": statistics.median(ratios),
        "ratios": ratios,
        "ratio_of_median_rates": rate["mixed"] / rate["clean"],
        "target_ratio": TARGET_RATIO,
        # CPU seconds of the whole process tree per input image: the work done, less
        # sensitive than wall time to what else runs on a shared machine.
        "cpu_seconds_per_image_median": cpu,
        "ratio_cpu_per_image_clean_to_mixed": cpu["clean"] / cpu["mixed"],
        "memory": {
            "clean_peak_pss_bytes": peak["clean"],
            "mixed_peak_pss_bytes": peak["mixed"],
            "ratio_mixed_to_clean_pss": peak["mixed"] / max(1, peak["clean"]),
            "clean_peak_rss_bytes": peak_rss["clean"],
            "mixed_peak_rss_bytes": peak_rss["mixed"],
        },
        "runs": runs,
    }
    path = write_result("bad_data", result)
    mib = 2**20
    print(f"{'':34s}{'clean':>10s}{'mixed':>10s}")
    print(f"{'images/s (median)':34s}{rate['clean']:10.2f}{rate['mixed']:10.2f}")
    print(f"{'CPU s per image (median)':34s}{cpu['clean']:10.3f}{cpu['mixed']:10.3f}")
    print(
        f"{'peak PSS, process tree (MiB)':34s}{peak['clean'] / mib:10.0f}{peak['mixed'] / mib:10.0f}"
    )
    print(f"{'peak RSS, process tree (MiB)':34s}{peak_rss['clean'] / mib:10.0f}"
          f"{peak_rss['mixed'] / mib:10.0f}")  # fmt: skip
    print(f"mixed / clean images/s (median): {result['ratio_mixed_to_clean_median']:.3f} "
          f"(target >= {TARGET_RATIO}); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
