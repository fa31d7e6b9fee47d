"""Exactly-once output for `maskrcnn segment`: parts, plan, the table's commit.

The names under OUTPUT are in pipeline/segment/output.py, the table in
pipeline/output/table.py. Protocol:

1. First start: list INPUT once, streaming it into the plan's shard files (on a table
   with rows, only the keys it has no row for: diff.py), then write the spec with the
   run's sequence number (one more than the last committed run's ``txn``). A re-run of
   the same command reads the spec back instead of listing again: the images a run
   covers are fixed when it starts. A run whose model, INPUT, score threshold, max
   detections or fast mode differ from what made the table's rows is refused unless
   --overwrite.
2. A shard is the unit of work, commit and resume. Ray tasks read it, process it, and
   write its part ``run-<seq>/part-<shard>.parquet`` themselves (stages/write.py), in
   one atomic step: one PUT on an object store (S3 shows a whole object or none), a temp
   file + rename on a local disk. A part's name is fixed by the plan and its bytes by its
   rows, so a retried or duplicated task writes the same object again. The driver learns
   of it from a small record (shard, counts), never from its bytes.
3. Resume: the shards done are the names of the parts in the run's folder; only the
   other shards are processed. A run killed after a task wrote a part but before the
   driver heard of it loses nothing: the re-run finds the part by its name.
4. Finish (:func:`finalize`): list the parts; every shard of the plan must have its part
   and no other part may be there; each part's row count (from its Parquet footer) must
   equal its shard's and its counts add up; then commit them, with the files the run
   replaces removed, in one Delta transaction carrying ``txn`` (APP_ID, seq). A run
   whose ``txn`` is in the log already (its driver died after committing) does not
   commit again. Readers trust only the log. URIs are unique across a run's parts
   because the plan's shards are disjoint (checked as the plan is written) and a part
   holds exactly its shard's rows; across runs, because a run plans only keys the table
   has no row for, or removes their rows in the same commit.
5. One writer at a time: the lease (pipeline/segment/lease.py) refuses a second run while
   the first is alive; a run that loses its lease stops: its tasks read the lock before
   each write and write nothing once it is another run's, and its driver commits nothing.

Why not Ray Data's own checkpointing (ray.data.checkpoint in 2.60) or ``write_delta``: the
first records ids after its writes, apart from the data files, so a crash between the
two leaves rows that are written again; the second commits once from the driver without
a transaction id, so a driver restart can commit twice. Here writing a whole part is the
single step that records progress, and the commit is idempotent by its ``txn``.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.schema import FORMAT, SCHEMA
from pipeline.output.table import DataFile, commit_files, file_stats
from pipeline.segment.output import OutputDir, OutputStateError, now_iso
from pipeline.segment.plan import Plan
from pipeline.storage import retrying

COUNTS_KEY = "maskrcnn.counts"
FOOTER_THREADS = 16


@dataclass(frozen=True)
class Counts:
    """Rows by outcome, and the instances in them: of a part, a record, a run. Adds up."""

    rows: int = 0
    ok: int = 0
    error: int = 0
    instances: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @classmethod
    def of_rows(cls, table: pa.Table) -> Counts:
        """The counts of rows in SCHEMA."""
        ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
        instances = int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0)
        return cls(table.num_rows, ok, table.num_rows - ok, instances)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Counts:
        """Of to_dict's or as_images' keys."""
        values = {**values, "rows": values.get("rows", values.get("images"))}
        return cls(*(int(values.get(f.name) or 0) for f in fields(cls)))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def as_images(self) -> dict[str, int]:
        """The counts as a commit's record spells them (``images`` for rows)."""
        return {
            "images": self.rows,
            "ok": self.ok,
            "error": self.error,
            "instances": self.instances,
        }


@dataclass(frozen=True)
class Diff:
    """The comparison's outcome (the spec keeps it for a resumed run)."""

    new: int  # listed keys without a row
    retry: int  # listed keys whose row is an error, segmented again (--retry-errors)
    gone: int  # rows whose key INPUT no longer lists
    pruned: int  # of those, removed (--prune)
    replaces: tuple[dict[str, Any], ...]  # per changed file: remove, add (or None), removed

    def to_spec(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "retry": self.retry,
            "gone": self.gone,
            "pruned": self.pruned,
            "replaces": list(self.replaces),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Diff:
        d = spec.get("diff") or {}
        keys = ("new", "retry", "gone", "pruned")
        return cls(*(int(d.get(k) or 0) for k in keys), tuple(d.get("replaces") or ()))


def canonical_rows(table: pa.Table) -> pa.Table:
    """``table``'s rows in SCHEMA, sorted by URI, each URI once (the first of equal ones)."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    order = pc.sort_indices(table, sort_keys=[("uri", "ascending")])
    table = table.take(order)
    uris = table.column("uri")
    if table.num_rows > 1:
        first = pa.concat_arrays(
            [
                pa.array([True]),
                pc.not_equal(uris.slice(1), uris.slice(0, table.num_rows - 1)).combine_chunks(),
            ]
        )
        table = table.filter(first)
    return table


def encode_part(table: pa.Table) -> tuple[bytes, Counts]:
    """Rows -> (Parquet bytes, counts). The bytes depend on the rows only (see module doc)."""
    return parquet_part(canonical_rows(table))


def parquet_part(table: pa.Table) -> tuple[bytes, Counts]:
    """:func:`encode_part` of rows that are canonical_rows' already."""
    counts = Counts.of_rows(table)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA, compression="zstd") as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts.to_dict(), sort_keys=True)})
    return buf.getvalue(), counts


def read_part(out: OutputDir, name: str) -> tuple[Counts, DataFile]:
    """A part's counts and its entry in the table, from its footer alone: rows from the
    Parquet metadata, the rest from the key-value metadata encode_part writes. Raises
    ValueError when they disagree."""
    rel = f"{out.parts}/{name}" if out.parts else name

    def read() -> tuple[Counts, DataFile]:
        with out.fs.open(out.path(rel), "rb") as f:
            meta = pq.ParquetFile(f).metadata
            size = f.size
        counts = json.loads((meta.metadata or {}).get(COUNTS_KEY.encode(), b"{}"))
        if counts.get("rows") != meta.num_rows:
            raise ValueError(
                f"{out.show(rel)}: its footer counts {counts.get('rows')} rows, the file "
                f"holds {meta.num_rows}; re-run with --overwrite"
            )
        return Counts.from_dict(counts), DataFile(rel, size, file_stats(meta), meta.num_rows)

    return retrying(read, what=f"reading {out.show(rel)}")


def spec_mismatches(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences in the fields that decide what rows hold."""
    diffs = []
    for key in ("model", "input"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)} (now {new.get(key)})")
    old_opts, new_opts = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            diffs.append(f"{key}: {old_opts.get(key)} (now {new_opts.get(key)})")
    return diffs


def checked_parts(out: OutputDir, plan: Plan) -> list[tuple[Counts, DataFile]]:
    """The run's parts, each checked against the plan (footers only, read on threads).

    Raises RuntimeError (nothing committed) when a shard's part is missing, a part is not
    the plan's, or a part's rows are not its shard's count.
    """
    names = out.part_names()
    shards = {name: plan.shard_of_part(name) for name in names}
    foreign = sorted(name for name, shard in shards.items() if shard is None)
    if foreign:
        raise RuntimeError(
            f"{out.show(out.parts)}: {len(foreign)} part(s) are not of this run's plan "
            f"(first: {foreign[0]}; did two runs write it at once?); not committing. Re-run "
            "with --overwrite"
        )
    missing = plan.shards - len(names)
    if missing:
        raise RuntimeError(
            f"{out.show()}: {missing} of {plan.shards} parts are missing; not committing. "
            "Re-run the same command"
        )
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        parts = list(pool.map(lambda name: read_part(out, name), names))
    for name, (counts, _) in zip(names, parts):
        if counts.rows != plan.rows(shards[name]):
            raise RuntimeError(
                f"{out.show(name)} holds {counts.rows} rows, its shard "
                f"{plan.rows(shards[name])}; not committing. Re-run with --overwrite"
            )
    total = sum((c for c, _ in parts), Counts())
    if total.ok + total.error != plan.images:
        raise RuntimeError(f"{out.show()}: part counts do not add up ({total}); not committing")
    return parts


def finalize(
    out: OutputDir, spec: dict[str, Any], plan: Plan, extra: dict[str, Any]
) -> dict[str, Any]:
    """Commit the run to OUTPUT's table: its parts added, the files it changes replaced
    (diff.py) or, with --overwrite, every file before removed; in one transaction carrying
    the run's sequence number (table.commit_files). A run whose transaction the log holds
    already (its driver died after committing) does not commit again.

    Returns the commit's record, with ``version`` and ``files`` (the run's parts).
    """
    from pipeline.output.table import APP_ID, has_table, load_table

    table = load_table(out.uri, out.options) if has_table(out.uri, out.options) else None
    if table is not None and (table.transaction_version(APP_ID) or -1) >= spec["seq"]:
        return committed_before(out, table, spec)
    parts = checked_parts(out, plan)
    diff = Diff.from_spec(spec)
    removes = [DataFile(**{**c["remove"], "stats": ""}) for c in diff.replaces]
    removed = sum((Counts.from_dict(c["removed"]) for c in diff.replaces), Counts())
    base = Counts.from_dict(spec.get("base_counts") or {})
    if spec.get("overwrite") and table is not None:
        removes = _every_file(table)
        removed = base
    if table is not None and removes and table.version() != spec.get("base_version"):
        raise OutputStateError(
            f"OUTPUT {out.show()} changed since this run compared INPUT with it (version "
            f"{spec.get('base_version')}, now {table.version()}); re-run the same command"
        )
    added = sum((c for c, _ in parts), Counts())
    adds = [f for _, f in parts] + [DataFile(**c["add"]) for c in diff.replaces if c["add"]]
    record = _record(spec, base - removed + added, added, diff, removed, extra)
    version = commit_files(out.uri, out.options, adds, removes, record, spec["seq"], SCHEMA)
    out.remove_temporaries()
    return {**record, "version": version, "files": [f.path for f in adds]}


def committed_before(out: OutputDir, table: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The record of the run's own commit, found in the log (an earlier attempt's), with
    the table properties it implies set where the attempt died before setting them."""
    from pipeline.output.table import commit_record, numbered_history, set_properties

    for commit in numbered_history(table, 50):
        record = commit_record(commit)
        if record is not None and record.get("run_id") == spec["run_id"]:
            set_properties(table, record)
            return {**record, "version": commit["version"], "files": [], "found": True}
    raise OutputStateError(
        f"OUTPUT {out.show()}: the log holds run {spec['run_id']}'s transaction, but not "
        "within its last 50 commits; its state under _run/ is stale: pass --overwrite"
    )


def _every_file(table: Any) -> list[DataFile]:
    actions = pa.table(table.get_add_actions(flatten=True)).select(["path", "size_bytes"])
    return [DataFile(p, s, "", 0) for p, s in zip(*(c.to_pylist() for c in actions.columns))]


def _record(
    spec: dict[str, Any],
    total: Counts,
    added: Counts,
    diff: Diff,
    removed: Counts,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The commit's record (pipeline/output/table.py's module doc)."""
    return {
        "format": FORMAT,
        "operation": "segment",
        "run_id": spec["run_id"],
        "model": spec["model"],
        "model_uri": spec["model_uri"],
        "config": spec["config"],
        "input": spec["input"],
        "options": spec["options"],
        "counts": total.as_images(),
        "changes": {
            "added": added.rows - diff.retry,
            "replaced": diff.retry,
            "removed": removed.rows if spec.get("overwrite") else diff.pruned,
            "errors": added.error,
        },
        "started": spec["started"],
        "finished": now_iso(),
        **extra,
    }
