"""Listing a prefix at scale: fanned out over sub-prefixes, in Ray tasks or threads.

A prefix is listed in pieces. :func:`split_prefix` lists it one level at a time (``fs.ls``)
until there are enough sub-prefixes or a depth limit is reached; the files met on the way
are kept as they are, and each sub-prefix left is listed whole (``fs.find``) in a Ray task,
or a thread. Every name under a sub-prefix ``d`` starts with ``d + "/"``, so it sorts inside
one interval that no other piece or file enters: the pieces, each sorted, laid end to end in
the order of ``d + "/"`` and the file names, *are* the sorted whole, with no merge and with
only a window of pieces in memory.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import islice
from typing import Any, TypeVar

from pipeline.segment.inputs.names import is_image_name
from pipeline.storage import full_uri

T = TypeVar("T")
R = TypeVar("R")

LIST_PIECES = 256  # split a prefix until it is in at least this many sub-prefixes...
LIST_DEPTH = 3  # ...or this many levels below it have been listed
LIST_TASKS = 256  # at most this many listing tasks: sub-prefixes beyond it are grouped
IN_FLIGHT = 32  # tasks (or threads' jobs) running ahead of the consumer
THREADS = 16  # threads when the work stays in this process
TASK_CPUS = 0.25  # listing waits on storage: several tasks share a core

# Storage that lives in this process or on this machine: a Ray task elsewhere would see
# another disk (or an empty in-memory store) and list nothing, so it is listed here.
LOCAL_PROTOCOLS = ("file", "local", "memory")


def is_local(fs: Any) -> bool:
    """True when ``fs`` is only readable from this process's machine."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


# --- fan-out ---------------------------------------------------------------------------
def ordered_map(
    fn: Callable[..., R], jobs: Iterable[tuple], *, remote: bool, in_flight: int = IN_FLIGHT
) -> Iterator[R]:
    """``fn(*job)`` for each job, in parallel, yielded in the jobs' order.

    Runs in Ray tasks when ``remote`` and Ray is initialised (``fn`` must be importable
    there), else in a thread pool; at most ``in_flight`` jobs run ahead of the consumer, and
    closing the iterator cancels what is still running. A task's exception is re-raised as
    itself, not wrapped in Ray's.
    """
    ray = sys.modules.get("ray")  # not imported: certainly not initialised
    if remote and ray is not None and ray.is_initialized():
        yield from _ray_map(ray, fn, jobs, in_flight)
        return
    pool = ThreadPoolExecutor(max_workers=min(THREADS, in_flight))
    jobs = iter(jobs)
    pending = deque(pool.submit(fn, *job) for job in islice(jobs, in_flight))
    try:
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, *job) for job in islice(jobs, 1))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _ray_map(ray: Any, fn: Callable[..., R], jobs: Iterable[tuple], in_flight: int) -> Iterator[R]:
    task = _remote(fn)
    jobs = iter(jobs)
    pending = deque(task.remote(*job) for job in islice(jobs, in_flight))
    try:
        while pending:
            try:
                result = ray.get(pending.popleft())
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, BaseException):
                    raise exc.cause from None
                raise
            pending.extend(task.remote(*job) for job in islice(jobs, 1))
            yield result
    finally:
        for ref in pending:
            ray.cancel(ref)


@cache
def _remote(fn: Callable[..., Any]) -> Any:
    import ray  # lazy: 0.3 s, for a listing that fans out over Ray tasks only (measured)

    return ray.remote(num_cpus=TASK_CPUS)(fn)


# --- prefixes --------------------------------------------------------------------------
def split_prefix(
    fs: Any, root: str, pieces: int = LIST_PIECES, depth: int = LIST_DEPTH
) -> tuple[list[str], list[str]]:
    """(files, sub-prefixes) under ``root`` that together hold what ``fs.find(root)`` lists.

    Lists ``root`` and then each level below it breadth-first (the listings of a level run
    in threads), replacing a prefix by its files and sub-prefixes, until there are at least
    ``pieces`` sub-prefixes, ``depth`` levels were listed or none is left. Paths are ``fs``
    paths, as ``fs.ls`` names them. A sub-prefix that vanished meanwhile is empty, as
    ``fs.find`` has it; any other storage error is raised.
    """
    files: list[str] = []
    frontier = [root.rstrip("/") or root]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for _ in range(depth):
            if not frontier or len(frontier) >= pieces:
                break
            below: list[str] = []
            for parent, entries in zip(frontier, pool.map(lambda p: _ls(fs, p), frontier)):
                for entry in entries:
                    name = entry["name"].rstrip("/")
                    if name == parent.rstrip("/"):
                        continue  # a listing can name the prefix itself; the level above has it
                    (below if entry["type"] == "directory" else files).append(entry["name"])
            frontier = below
    return files, frontier


def _ls(fs: Any, path: str) -> list[dict[str, Any]]:
    fs.invalidate_cache(path)  # an older listing of the same fs instance must not hide new keys
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def list_pieces(fs: Any, prefixes: list[str]) -> list[list[str]]:
    """For each sub-prefix, the sorted full URIs of the images under it (a task's work)."""
    out = []
    for prefix in prefixes:
        fs.invalidate_cache(prefix)
        under = prefix.rstrip("/") + "/"
        names = {full_uri(fs, p) for p in fs.find(prefix) if p.startswith(under)}
        out.append(sorted(n for n in names if is_image_name(n)))
    return out


def iter_prefix(
    fs: Any, root: str, chunk: int, pieces: int = LIST_PIECES, depth: int = LIST_DEPTH
) -> Iterator[list[str]]:
    """Full URIs of the images under ``root``, sorted and unique, ``chunk`` at a time.

    The same URIs in the same order as ``sorted(set(full_uri(fs, p) for p in fs.find(root)
    if is_image_name(p)))``; the sub-prefixes of :func:`split_prefix` are listed in parallel
    (Ray tasks for remote storage when Ray is up), at most LIST_TASKS jobs in all.
    """
    files, prefixes = split_prefix(fs, root, pieces, depth)
    # Each unit sorts by its key: a file by its name, a sub-prefix by its name + "/".
    units = sorted(
        [(f, None) for f in files if is_image_name(f)]
        + [(p.rstrip("/") + "/", p) for p in prefixes],
        key=lambda unit: unit[0],
    )
    ordered = [prefix for _, prefix in units if prefix is not None]
    per_job = max(1, math.ceil(len(ordered) / LIST_TASKS))
    jobs = ((fs, ordered[i : i + per_job]) for i in range(0, len(ordered), per_job))
    mapped = ordered_map(list_pieces, jobs, remote=not is_local(fs))
    listed = (piece for group in mapped for piece in group)
    out: list[str] = []
    last = None
    try:
        for key, prefix in units:
            for uri in next(listed) if prefix is not None else (full_uri(fs, key),):
                if uri != last:  # a name a listing repeats is kept once
                    out.append(uri)
                    last = uri
            if len(out) >= chunk:
                whole = len(out) - len(out) % chunk
                yield from _split(out[:whole], chunk)
                out = out[whole:]
        if out:
            yield out
    finally:
        mapped.close()


def _split(items: list[T], chunk: int) -> Iterator[list[T]]:
    for i in range(0, len(items), chunk):
        yield items[i : i + chunk]
