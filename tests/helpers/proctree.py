"""Memory and CPU time of a process tree (Linux /proc), sampled from a thread.

Used by the segment benchmarks (bench/pipeline_bench.py, bench/bad_data_bench.py)
and tests/fault/test_bad_data_at_scale.py: a segment run is this process plus
Ray's raylet and workers below it.
"""

from __future__ import annotations

import os
import threading

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_pids(root_pid: int) -> dict[int, float]:
    """{pid: CPU seconds (user + system) so far} of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    tree: dict[int, float] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if pid in cpu:
            tree[pid] = cpu[pid]
    return tree


def tree_memory(root_pid: int) -> tuple[int, int, int]:
    """(RSS bytes, PSS bytes, processes) of ``root_pid`` and all its descendants.

    PSS shares each page among the processes mapping it (torch's libraries in every
    Ray worker, the object store's shared memory): the memory the tree really uses.
    RSS counts shared pages once per process, so it overstates; both are reported.
    """
    return _memory(_tree_pids(root_pid))


def _memory(pids) -> tuple[int, int, int]:
    rss = pss = count = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
            count += 1
        except OSError:
            continue
    return rss, pss, count


class TreeMonitor:
    """Samples a process tree every ``interval`` s while in a with-block (or from
    :meth:`start` to :meth:`stop`): peak RSS and PSS (see :func:`tree_memory`), and the
    CPU seconds its processes used meanwhile (work done, whatever else loads the machine;
    a process that ends between two samples loses its last interval)."""

    def __init__(self, root_pid: int | None = None, interval: float = 0.2) -> None:
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.interval = interval
        self.peak_rss = self.peak_pss = self.max_processes = self.samples = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cpu_seconds(self) -> float:
        return sum(t - self._cpu_start.get(pid, 0.0) for pid, t in self._cpu_last.items())

    def _sample(self) -> None:
        cpu = _tree_pids(self.root_pid)
        self._cpu_last.update(cpu)
        rss, pss, count = _memory(cpu)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_processes = max(self.max_processes, count)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> TreeMonitor:
        self._cpu_start = _tree_pids(self.root_pid)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def __enter__(self) -> TreeMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
