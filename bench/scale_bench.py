"""The segment driver's own cost per image, and listing at scale (issue 15's yardstick).

    PYTHONPATH=. .venv/bin/python bench/scale_bench.py [--rows 100000,1000000]
        [--real-images 1000,3000] [--list-files 1000000] [--s3-objects 100000]

1. Driver cost. INPUT is a .txt list of N URIs of files that do not exist, so every row
   is an error row and the model does no work: what is left is the pipeline's own cost.
   `maskrcnn segment` runs in a subprocess; its driver process is sampled every 0.1 s
   (/proc: CPU seconds, VmHWM peak RSS). For each N: wall seconds, rows/s inside the run
   (the run's own summary line), driver CPU seconds and peak RSS, and the CPU seconds of
   the actor that runs Ray Data's executor beside the driver; between the two sizes, the
   driver's marginal CPU per row (target <= 10 us), the RSS ratio (target <= 1.2), and
   the same per-row and per-second figures for the executor actor.
2. The same for real rows: --real-images small PNGs (64 px, a few shapes each) through
   the tiny model, to show the driver's cost per real row.
3. Listing straight into plan shards (pipeline.segment.plan.write_plan over
   inputs.listing.InputListing, what a first start does): a local tree of --list-files empty
   .png files (100 per folder), and an S3 prefix of --s3-objects objects on a moto
   server on loopback, fanned out over Ray tasks of a local Ray instance, its shards
   written to the same bucket: seconds and URIs/s.

Writes bench/results/scale.json. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, machine_info, write_result  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
SUMMARY = re.compile(r"this run (\d+) images in ([\d.]+)s \(([\d.]+) images/s\)")


def _sample(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, peak RSS bytes) of process ``pid`` alone, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    return cpu, int(hwm.group(1)) * 1024 if hwm else 0


def missing_list(rows: int, work: Path) -> Path:
    """A .txt list of ``rows`` URIs of files that do not exist."""
    listing = work / f"missing-{rows}.txt"
    with open(listing, "w") as f:
        for i in range(rows):
            f.write(f"{work}/missing/{i // 1000:05d}/img{i:09d}.png\n")
    return listing


def real_list(rows: int, work: Path) -> Path:
    """A .txt list of ``rows`` small PNGs (64 px, a few shapes each), written once."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = work / "real"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    listing = work / f"real-{rows}.txt"
    with open(listing, "w") as f:
        for i in range(rows):
            path = folder / f"{i:07d}.png"
            if not path.exists():
                image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 255, 3)))
                draw = ImageDraw.Draw(image)
                for _ in range(3):
                    x, y = (int(v) for v in rng.integers(0, 48, 2))
                    draw.rectangle([x, y, x + 14, y + 14], fill=(255, 255, 255))
                image.save(path)
            f.write(f"{path}\n")
    return listing


def driver_run(
    rows: int, work: Path, model: Path, rows_per_part: int, real: bool = False
) -> dict[str, Any]:
    """One segment run over ``rows`` missing files (or real images); the driver's figures."""
    listing = real_list(rows, work) if real else missing_list(rows, work)
    out = work / f"out-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "jobs.cli", "segment", str(listing), str(out),
            "--model", str(model), "--rows-per-part", str(rows_per_part)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    start = time.monotonic()
    log = work / f"run-{rows}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, env=env, cwd=work, stdout=sink, stderr=subprocess.STDOUT)
        last, executor, executor_cpu, looked = (0.0, 0), None, 0.0, 0.0
        while proc.poll() is None:
            sample = _sample(proc.pid)
            if sample is not None:  # a zombie's status has no VmHWM: keep the last real one
                last = (max(last[0], sample[0]), max(last[1], sample[1]))
            if executor is None and time.monotonic() - looked > 1.0:
                executor, looked = _executor_pid(), time.monotonic()
            if executor is not None and (sample := _sample(executor)) is not None:
                executor_cpu = max(executor_cpu, sample[0])
            time.sleep(0.1)  # sampling interval
    wall = time.monotonic() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"segment over {rows} rows exited {proc.returncode}:\n{text[-3000:]}")
    found = SUMMARY.search(text)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows": rows,
        "wall_s": round(wall, 1),
        "in_run_s": float(found.group(2)) if found else None,
        "rows_per_s_in_run": float(found.group(3)) if found else None,
        "driver_cpu_s": round(last[0], 2),
        "driver_peak_rss_mib": round(last[1] / 2**20, 1),
        # Ray Data's executor, in its actor beside the driver (pipeline/segment/monitor.py)
        "executor_cpu_s": round(executor_cpu, 2) if executor is not None else None,
    }


def _executor_pid() -> int | None:
    """The pid of the pipeline's executor actor (its process title names the class)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ray::PipelineExecutor" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def plan_into(output: str, input_uri: str, options: dict | None = None) -> tuple[int, float]:
    """(images, seconds) of listing ``input_uri`` into plan shards under ``output``."""
    from pipeline.segment.inputs.kinds import Input
    from pipeline.segment.inputs.listing import InputListing
    from pipeline.segment.output import OutputDir
    from pipeline.segment.plan import write_plan

    start = time.monotonic()
    plan = write_plan(
        OutputDir(output, options), InputListing.begin(Input(input_uri, options)).chunks(), 1000
    )
    return plan.images, time.monotonic() - start


def list_local(files: int, work: Path) -> dict[str, Any]:
    root = work / "tree"
    shutil.rmtree(root, ignore_errors=True)
    made = time.monotonic()
    for d in range(0, files, 100):
        folder = root / f"{d // 10000:04d}" / f"{d // 100:06d}"
        folder.mkdir(parents=True)
        for i in range(d, min(d + 100, files)):
            (folder / f"{i:09d}.png").touch()
    made = time.monotonic() - made
    images, seconds = plan_into(str(work / "plan-local"), str(root))
    assert images == files, images
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(work / "plan-local", ignore_errors=True)
    return {"files": files, "seconds": round(seconds, 2), "uris_per_s": round(files / seconds),
            "made_in_s": round(made, 1), "into": "plan shards of 1000, local"}  # fmt: skip


def list_s3(objects: int) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.helpers.cluster_fixture import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret"}
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
        client.create_bucket(Bucket="scale")
        made = time.monotonic()

        def put(i: int) -> None:
            client.put_object(Bucket="scale", Key=f"in/{i // 1000:04d}/{i:09d}.png", Body=b"")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(objects)))
        made = time.monotonic() - made
        options = {"key": creds["aws_access_key_id"], "secret": creds["aws_secret_access_key"],
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}  # fmt: skip
        import ray

        # The AWS variables for the Ray workers: they list with the same options' endpoint.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            images, seconds = plan_into("s3://scale/out", "s3://scale/in", options)
        finally:
            ray.shutdown()
        assert images == objects, images
    finally:
        server.stop()
    return {"objects": objects, "seconds": round(seconds, 2),
            "uris_per_s": round(objects / seconds), "made_in_s": round(made, 1),
            "into": "plan shards of 1000 on the same S3, listed in Ray tasks"}  # fmt: skip


def _per_row(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round(1e6 * (b[key] - a[key]) / (b["rows"] - a["rows"]), 1)


def _per_second(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round((b[key] - a[key]) / (b["in_run_s"] - a["in_run_s"]), 3)


def _marginal(runs: list[dict[str, Any]]) -> dict[str, Any]:
    a, b = runs
    return {
        "runs": runs,
        "marginal_cpu_us_per_row": _per_row(a, b, "driver_cpu_s"),
        "peak_rss_ratio": round(b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"], 3),
        # The driver's CPU per second of run: what it costs while it waits on records.
        "driver_cores_while_running": _per_second(a, b, "driver_cpu_s"),
        # The executor actor's CPU, which Ray Data's scheduling loop spent in the driver
        # before it moved out: per second of run, not per row.
        "executor_marginal_cpu_us_per_row": _per_row(a, b, "executor_cpu_s"),
        "executor_cores_while_running": _per_second(a, b, "executor_cpu_s"),
        "targets": {
            "marginal_cpu_us_per_row": 10,
            "peak_rss_ratio": 1.2,
            "rows_per_s_in_run": 3000,
        },
    }


SECTIONS = {"driver": "driver", "real": "real", "local": "list_local", "s3": "list_s3"}


def _carried(skipped: list[str]) -> dict[str, Any]:
    """The sections ``skipped`` names, from the results file this run replaces, each marked
    with the date of the run that measured it (code they measure is unchanged)."""
    path = RESULTS / "scale.json"
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    when = previous.get("date")
    return {
        SECTIONS[k]: {
            **previous[SECTIONS[k]],
            "carried_from": previous[SECTIONS[k]].get("carried_from", when),
        }
        for k in skipped
        if SECTIONS[k] in previous
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="two row counts, small,large")
    p.add_argument("--rows-per-part", type=int, default=1000)
    p.add_argument("--real-images", default="1000,3000", help="two counts, small,large")
    p.add_argument("--list-files", type=int, default=1_000_000)
    p.add_argument("--s3-objects", type=int, default=100_000)
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=list(SECTIONS),
        help="sections not run: kept from the previous results file, with its date",
    )
    args = p.parse_args()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    result: dict[str, Any] = {"command": "PYTHONPATH=. .venv/bin/python bench/scale_bench.py "
                              + " ".join(sys.argv[1:])}  # fmt: skip
    try:
        from maskrcnn.checkpoint import save
        from tests.helpers.segment_data import tiny_model

        model = work / "tiny.safetensors"
        save(tiny_model(0), str(model))
        for key, counts, real in (("driver", args.rows, False), ("real", args.real_images, True)):
            if key in args.skip:
                continue
            small, large = (int(x) for x in counts.split(","))
            runs = []
            for n in (small, large):
                runs.append(driver_run(n, work, model, args.rows_per_part, real))
                print(key, runs[-1], flush=True)
            result[key] = _marginal(runs)
            print(key, result[key], flush=True)
        if "local" not in args.skip:
            result["list_local"] = list_local(args.list_files, work)
            print(result["list_local"], flush=True)
        if "s3" not in args.skip:
            result["list_s3"] = list_s3(args.s3_objects)
            print(result["list_s3"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(_carried(args.skip))
    result["machine"] = machine_info(load_before, os.getloadavg())
    print(f"wrote {write_result('scale', result)}")


if __name__ == "__main__":
    main()
