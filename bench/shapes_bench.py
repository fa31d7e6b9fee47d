"""Shapes dataset writer: images/s of ``make_shapes_dataset`` against writing its PNGs alone.

    .venv/bin/python bench/shapes_bench.py [--images 500] [--size 128] [--repeats 5]

generate: ``make_shapes_dataset`` into a fresh local folder (train split only):
drawing every image, its masks' RLEs, the PNG files and annotations.json.
png: the baseline, the least any writer of these images does: the same images
(drawn once, before timing) encoded by the same encoder (``png_bytes``) and
written to a fresh local folder, one file each. draw: drawing alone
(``iter_shapes``), to show where the rest of the time goes.

The three run interleaved (generate, png, draw, generate, ...) in one process, so
that the shared machine's load weighs on all alike; figures are medians of the
repeats, and the ratio is generate's images/s over png's (1.0: writing the dataset
costs no more than encoding its pictures). Each is timed twice: wall time, and the
CPU time of this process (all of its work runs here, on one thread), which other
load on a shared machine moves far less; the CPU ratio is the steadier figure. The seconds per 2,000 images that the
generator takes is kept too, against the old test's 30 s (it asserted that time;
a wall-time limit fails on a loaded machine, so it is a figure here instead).

Writes bench/results/shapes.json and prints a line per repeat. Never run as a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.common import interleaved, machine_info, median, write_result  # noqa: E402
from pipeline.formats.shapes import iter_shapes, make_shapes_dataset, png_bytes  # noqa: E402

OLD_TEST_LIMIT_S_PER_2000 = 30.0


def _summary(rate: dict, ratios: list[float], seconds: dict) -> dict:
    """Median images/s of each side, the generator-to-PNG ratios and the raw seconds."""
    return {
        **{
            f"{name}_images_per_s_median": median(rate[name])
            for name in ("generate", "png", "draw")
        },
        "ratio_generate_to_png_median": median(ratios),
        "ratios": ratios,
        "seconds": seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="images per run")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=9, help="runs of each (median), interleaved")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    pictures = [s.image for s in iter_shapes(args.images, args.size, args.seed)]
    runs = {"generate": 0, "png": 0}

    def generate() -> None:
        runs["generate"] += 1
        make_shapes_dataset(
            str(work / f"gen-{runs['generate']}"), args.images, args.size, args.seed
        )

    def png() -> None:
        runs["png"] += 1
        folder = work / f"png-{runs['png']}"
        folder.mkdir()
        for i, image in enumerate(pictures, 1):
            (folder / f"{i:06d}.png").write_bytes(png_bytes(image))

    def draw() -> None:
        for _ in iter_shapes(args.images, args.size, args.seed):
            pass

    # Same pictures, same encoder: the baseline writes the very bytes the generator does.
    generate()
    gen_pngs = sorted((work / "gen-1" / "train" / "images").glob("*.png"))
    png()
    png_files = sorted((work / "png-1").glob("*.png"))
    assert [f.read_bytes() for f in gen_pngs] == [f.read_bytes() for f in png_files]

    fns = {"generate": generate, "png": png, "draw": draw}
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def cpu_timed(name: str):
        def call() -> None:
            t = time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - t)

        return call

    load_before = os.getloadavg()
    times = interleaved({name: cpu_timed(name) for name in fns}, args.repeats)
    load_after = os.getloadavg()
    shutil.rmtree(work)

    rate = {name: [args.images / t for t in ts] for name, ts in times.items()}
    cpu_rate = {name: [args.images / t for t in ts] for name, ts in cpu.items()}
    ratios = [g / b for g, b in zip(rate["generate"], rate["png"])]
    cpu_ratios = [g / b for g, b in zip(cpu_rate["generate"], cpu_rate["png"])]
    for r in range(args.repeats):
        print(
            f"repeat {r}  images/s wall (CPU): "
            f"generate {rate['generate'][r]:6.1f} ({cpu_rate['generate'][r]:6.1f})  "
            f"png {rate['png'][r]:6.1f} ({cpu_rate['png'][r]:6.1f})  "
            f"draw {rate['draw'][r]:6.1f} ({cpu_rate['draw'][r]:6.1f})  "
            f"ratio {ratios[r]:.3f} ({cpu_ratios[r]:.3f})",
            flush=True,
        )
    per_2000 = median(times["generate"]) * 2000 / args.images
    result = {
        "what": "make_shapes_dataset images/s vs encoding and writing the same PNGs alone",
        "machine": machine_info(load_before, load_after),
        "params": vars(args),
        **_summary(rate, ratios, times),
        "cpu": _summary(cpu_rate, cpu_ratios, cpu),  # the same figures by this process's CPU time
        "generate_seconds_per_2000_images": per_2000,
        "generate_cpu_seconds_per_2000_images": median(cpu["generate"]) * 2000 / args.images,
        "old_test_limit_seconds_per_2000_images": OLD_TEST_LIMIT_S_PER_2000,
    }
    path = write_result("shapes", result)
    print(
        f"generate {result['generate_images_per_s_median']:.1f} images/s, "
        f"png alone {result['png_images_per_s_median']:.1f} images/s: "
        f"ratio {result['ratio_generate_to_png_median']:.3f} "
        f"(CPU time {result['cpu']['ratio_generate_to_png_median']:.3f}); "
        f"{per_2000:.1f} s per 2,000 images -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
