"""What a driver costs per second when it does nothing: Ray core against Ray Data.

    PYTHONPATH=. .venv/bin/python bench/executor_floor_bench.py [--seconds 40]

Issue 15's driver-CPU figure (bench/scale_bench.py) is the driver's CPU per row, and at
the row rates this 2-core machine reaches it is mostly a cost per *second*, not per row.
This measures that floor alone. Each case runs in its own process with its own local Ray
(2 CPUs), over tasks that only sleep (2 s each), so that nothing of ours and no row is in
the driver:

* ``ray_core``: the driver submits pairs of sleeping tasks and blocks in ``ray.get``;
* ``ray_data_1_op`` / ``ray_data_3_ops``: a Ray Data pipeline of 1 or 3 map_batches stages
  (unfused: each asks for other CPUs) of sleeping tasks, consumed like segment consumes
  its records (``iter_rows``), progress bars off.

Reports the driver's CPU seconds per wall second in each, and the ratio to ray_core.
Writes bench/results/executor_floor.json. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, write_result  # noqa: E402

CASES = ("ray_core", "ray_data_1_op", "ray_data_3_ops")
TASK_S = 2.0


def _case(name: str, seconds: float) -> dict:
    """One case, in this process: the driver's CPU per wall second while it runs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        rounds = max(1, int(seconds / TASK_S))

        @ray.remote(num_cpus=1)
        def nap() -> None:
            time.sleep(TASK_S)

        def nap_batch(batch):
            time.sleep(TASK_S)
            return batch

        start, cpu = time.monotonic(), time.process_time()
        if name == "ray_core":
            for _ in range(rounds):
                ray.get([nap.remote(), nap.remote()])
        else:
            ops = 1 if name == "ray_data_1_op" else 3
            # As many sleeping tasks in all as ray_core's. Stages of half a CPU run more
            # of them at once, so the wall time differs: the figure is per wall second.
            blocks = 2 * rounds // ops
            ds = ray.data.from_items([{"x": i} for i in range(blocks)], override_num_blocks=blocks)
            for k in range(ops):  # other CPUs per stage: Ray Data does not fuse them
                ds = ds.map_batches(nap_batch, batch_size=None, num_cpus=0.5 + 0.01 * k)
            for _ in ds.iter_rows():
                pass
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
    finally:
        ray.shutdown()
    return {"wall_s": round(wall, 1), "driver_cpu_s": round(cpu, 2),
            "driver_cores": round(cpu / wall, 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="wall seconds per case")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.case:
        print(json.dumps(_case(args.case, args.seconds)))
        return
    load_before = os.getloadavg()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cases = {}
    for name in CASES:
        argv = [sys.executable, __file__, "--case", name, "--seconds", str(args.seconds)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        cases[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, cases[name], flush=True)
    base = cases["ray_core"]["driver_cores"]
    for name in CASES:
        cases[name]["ratio_to_ray_core"] = round(cases[name]["driver_cores"] / base, 2)
    result = {
        "command": "PYTHONPATH=. .venv/bin/python bench/executor_floor_bench.py "
        + " ".join(sys.argv[1:]),
        "cases": cases,
        "machine": machine_info(load_before, os.getloadavg()),
    }
    print(f"wrote {write_result('executor_floor', result)}")


if __name__ == "__main__":
    main()
