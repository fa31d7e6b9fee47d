"""What a run on a grown INPUT segments: the listing against the table, range by range.

INPUT is listed into shard files under ``_run/listing/`` (sorted, unique keys, as a
plan is). Its shards are grouped into ranges of at most RANGE_SHARDS shards. Range ``g``
covers the keys from its first key up to the next range's first key (the first range
from the lowest key, the last to the highest), so the ranges split the key space and
every row of the table falls in exactly one. A task per range (a Ray task; a thread of
the driver when the listing has a few shards only) reads the range's keys and the table's
``uri`` and ``status`` in its key range, from the files whose ``uri`` statistics overlap it,
and writes:

    _run/diff/new-<g>.txt    the keys to segment: no row yet, or (--retry-errors) an error row
    _run/diff/drop-<g>.txt   the table's keys whose rows go: gone from INPUT (--prune), or
                             replaced (--retry-errors)

It returns counts and the table files that hold rows to drop. A task per such file then
writes it again without them, as ``run-<seq>/kept-<hash of its path>.parquet``: the
commit removes the file and adds that one (none when no row is left). The driver holds
counts, the ranges' first keys and the names of the files that change: never a key.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.table import DataFile, file_stats, load_table
from pipeline.segment.commit import Counts, Diff, canonical_rows, parquet_part
from pipeline.segment.output import DIFF_DIR, LISTING_DIR, OutputDir, shard_name
from pipeline.segment.plan import Plan, read_shard
from pipeline.storage import retrying

RANGE_SHARDS = 64  # listing shards per range: a task holds that many keys at most
LOCAL_SHARDS = 8  # listings this small are compared in the driver's threads, without Ray
LOCAL_THREADS = 4
DIFF_CPUS = 0.5


@dataclass(frozen=True)
class DiffJob:
    """What every task of one comparison needs (plain data: tasks unpickle it)."""

    output: str
    options: dict[str, Any] | None
    listing: Plan  # INPUT's listing under LISTING_DIR
    version: int  # the table version compared against
    parts: str  # this run's parts folder: where kept files go
    prune: bool
    retry_errors: bool
    starts: tuple[str, ...]  # each range's first key
    range_shards: int

    def shards_of(self, index: int) -> range:
        start = index * self.range_shards
        return range(start, min(self.listing.shards, start + self.range_shards))

    def bounds(self, index: int) -> tuple[str | None, str | None]:
        """Range ``index``'s keys: [low, high); None where the key space is open."""
        low = None if index == 0 else self.starts[index]
        high = self.starts[index + 1] if index + 1 < len(self.starts) else None
        return low, high


def compare(
    out: OutputDir,
    listing: Plan,
    version: int,
    opts: tuple[bool, bool],
    start_ray: Callable[[], Any],
) -> Diff:
    """Compare the listing under LISTING_DIR with the table at ``version``; write the keys
    to segment under DIFF_DIR (:func:`new_keys` reads them) and the kept files of the
    files that change. ``opts``: (prune, retry_errors)."""
    range_shards = RANGE_SHARDS
    ranges = -(-listing.shards // range_shards)
    starts = tuple(_listed(out, g * range_shards)[0] for g in range(ranges))
    job = DiffJob(out.uri, out.options, listing, version, out.parts, *opts, starts, range_shards)
    run = _runner(listing.shards > LOCAL_SHARDS, start_ray)
    results = run(compare_range, [(job, g) for g in range(ranges)])
    files = sorted({path for result in results for path in result["files"]})
    replaces = tuple(run(rewrite_file, [(job, path) for path in files]))
    total = {k: sum(r[k] for r in results) for k in ("new", "retry", "gone")}
    return Diff(
        total["new"], total["retry"], total["gone"], total["gone"] if opts[0] else 0, replaces
    )


def new_keys(out: OutputDir) -> Iterator[list[str]]:
    """The keys to segment, range by range: sorted and unique over all ranges."""
    folder = out.path(DIFF_DIR)
    out.fs.invalidate_cache(folder)
    try:
        names = retrying(out.fs.ls, folder, False, what=f"listing {out.show(DIFF_DIR)}")
    except FileNotFoundError:
        return
    for path in sorted(n for n in names if n.rsplit("/", 1)[-1].startswith("new-")):
        yield read_shard(out.fs, path)


def compare_range(job: DiffJob, index: int) -> dict[str, Any]:
    """One range's comparison (module doc): counts, and the files with rows to drop."""
    out = OutputDir(job.output, job.options)
    keys = [k for shard in job.shards_of(index) for k in _listed(out, shard)]
    low, high = job.bounds(index)
    rows = _table_rows(out, job, low, high)
    listed = set(keys)
    have = set(rows.column("uri").to_pylist())
    errors = set(rows.filter(pc.equal(rows.column("status"), "error")).column("uri").to_pylist())
    new = [k for k in keys if k not in have]
    retry = [k for k in keys if k in errors] if job.retry_errors else []
    gone = have - listed
    drop = (gone if job.prune else set()) | set(retry)
    segment = sorted(new + retry)
    if segment:
        out.put_bytes(f"{DIFF_DIR}/new-{index:06d}.txt", _lines(segment))
    if drop:
        out.put_bytes(f"{DIFF_DIR}/drop-{index:06d}.txt", _lines(sorted(drop)))
    files = []
    if drop:
        dropping = pc.is_in(rows.column("uri"), pa.array(sorted(drop), pa.string()))
        files = sorted(set(rows.filter(dropping).column("file").to_pylist()))
    return {"new": len(new), "retry": len(retry), "gone": len(gone), "files": files}


def rewrite_file(job: DiffJob, path: str) -> dict[str, Any]:
    """Table file ``path`` without its rows to drop: the kept file written, and what the
    commit does with both (remove, add or None, the removed rows' counts)."""
    out = OutputDir(job.output, job.options)
    data = retrying(out.fs.cat_file, out.path(path), what=f"reading {out.show(path)}")
    rows = pq.read_table(io.BytesIO(data))
    uris = rows.column("uri")
    first, last = pc.min(uris).as_py(), pc.max(uris).as_py()
    drop: list[str] = []
    for g in range(len(job.starts)):
        low, high = job.bounds(g)
        if (high is None or first < high) and (low is None or last >= low):
            name = f"{DIFF_DIR}/drop-{g:06d}.txt"
            if out.exists(name):
                drop += read_shard(out.fs, out.path(name))
    dropping = pc.is_in(uris, pa.array(drop, pa.string()))
    kept = canonical_rows(rows.filter(pc.invert(dropping)))
    change: dict[str, Any] = {
        "remove": {"path": path, "size": len(data), "rows": rows.num_rows},
        "removed": Counts.of_rows(rows.filter(dropping)).to_dict(),
        "add": None,
    }
    if kept.num_rows:
        name = f"{job.parts}/kept-{hashlib.sha256(path.encode()).hexdigest()[:16]}.parquet"
        body, _ = parquet_part(kept)
        out.put_bytes(name, body)
        meta = pq.ParquetFile(io.BytesIO(body)).metadata
        change["add"] = DataFile(name, len(body), file_stats(meta), kept.num_rows).__dict__
    return change


def _listed(out: OutputDir, shard: int) -> list[str]:
    return read_shard(out.fs, out.path(shard_name(shard, LISTING_DIR)))


def _table_rows(out: OutputDir, job: DiffJob, low: str | None, high: str | None) -> pa.Table:
    """uri, status and file (its path in the table) of the table's rows in [low, high)."""
    actions = pa.table(
        load_table(job.output, job.options, job.version).get_add_actions(flatten=True)
    )
    names = set(actions.schema.names)
    tables = []
    for action in actions.to_pylist():
        lo, hi = (
            (action.get("min.uri"), action.get("max.uri")) if "min.uri" in names else (None,) * 2
        )
        if lo is not None and high is not None and lo >= high:
            continue
        if hi is not None and low is not None and hi < low:
            continue
        rows = _file_rows(out, action["path"], low, high)
        tables.append(rows.append_column("file", pa.array([action["path"]] * rows.num_rows)))
    empty = pa.table({"uri": [], "status": [], "file": []}, schema=_ROWS)
    return pa.concat_tables([t.cast(_ROWS) for t in tables]) if tables else empty


_ROWS = pa.schema([("uri", pa.string()), ("status", pa.string()), ("file", pa.string())])


def _file_rows(out: OutputDir, path: str, low: str | None, high: str | None) -> pa.Table:
    bounds = ([("uri", ">=", low)] if low is not None else []) + (
        [("uri", "<", high)] if high is not None else []
    )
    with out.fs.open(out.path(path), "rb") as f:
        return pq.read_table(f, columns=["uri", "status"], filters=bounds or None)


def _lines(keys: list[str]) -> bytes:
    return ("\n".join(keys) + "\n").encode()


def _runner(remote: bool, start_ray: Callable[[], Any]) -> Callable[..., list[Any]]:
    """Runs ``fn(*args)`` for each args: in Ray tasks, or in the driver's threads."""

    def in_threads(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=LOCAL_THREADS) as pool:
            return list(pool.map(lambda args: fn(*args), calls))

    def in_ray(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
        if not calls:
            return []
        start_ray()
        import ray  # lazy: a small listing is compared without Ray

        task = ray.remote(num_cpus=DIFF_CPUS, max_retries=3, retry_exceptions=[OSError])(fn)
        return ray.get([task.remote(*args) for args in calls])

    return in_ray if remote else in_threads
