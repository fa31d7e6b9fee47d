"""Sorted and unique beyond memory: an external merge sort of URIs.

Lists of URIs (a .txt or .parquet list, an inventory report) come in any order and may
repeat a URI anywhere: :func:`sorted_unique` sorts them in runs of at most ``run`` URIs,
spills each run to a local temporary file, and merges the runs.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa

SORT_RUN = 1_000_000  # URIs sorted in memory at a time before a run spills to disk
RUN_BATCH = 8192  # URIs per batch in a spilled run (what a merge holds per run)


def sorted_unique(
    chunks: Iterable[list[str]], chunk: int, run: int = SORT_RUN
) -> Iterator[list[str]]:
    """The distinct strings of ``chunks``, sorted, ``chunk`` at a time.

    At most about ``run`` strings are held to sort; past that, each sorted run is written to
    a local temporary file (Arrow IPC) and the runs are merged, RUN_BATCH strings per run in
    memory. The temporary files go when the iterator ends or is closed.
    """
    buffer: list[str] = []
    runs: list[str] = []
    folder: str | None = None
    try:
        for part in chunks:
            buffer.extend(part)
            if len(buffer) >= run:
                folder = folder or tempfile.mkdtemp(prefix="maskrcnn-list-")
                runs.append(_write_run(os.path.join(folder, f"{len(runs)}.arrow"), buffer))
                buffer = []
        last_run = sorted(set(buffer))
        merged = heapq.merge(*(_read_run(p) for p in runs), last_run) if runs else iter(last_run)
        out: list[str] = []
        previous = None
        for item in merged:
            if item != previous:
                out.append(item)
                previous = item
                if len(out) == chunk:
                    yield out
                    out = []
        if out:
            yield out
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _write_run(path: str, items: list[str]) -> str:
    items = sorted(set(items))
    schema = pa.schema([("s", pa.large_string())])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for i in range(0, len(items), RUN_BATCH):
            writer.write_batch(
                pa.record_batch(
                    [pa.array(items[i : i + RUN_BATCH], pa.large_string())], schema=schema
                )
            )
    return path


def _read_run(path: str) -> Iterator[str]:
    with pa.memory_map(path) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield from reader.get_batch(i).column(0).to_pylist()
