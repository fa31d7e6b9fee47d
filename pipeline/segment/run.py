"""A segment run into OUTPUT, made ready under the lease: the plan made or resumed.

:func:`open_run` reads what OUTPUT holds (table_state.py: a table, a folder-format OUTPUT
it converts, nothing), resumes the unfinished run there or plans anew (every image of
INPUT, or on a table with rows the images it lacks: diff.py), and returns a
:class:`SegmentRun` that has everything it needs: its spec, plan and sources are fixed
from then on. :meth:`SegmentRun.execute` runs the pipeline over the shards no part holds
yet (monitor.py: executor, tracker, watchdog); :meth:`finish` commits (commit.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.cluster import launching, node_shapes, wait_interval
from pipeline.output.table import latest_record, load_table
from pipeline.segment.commit import Diff, finalize, spec_mismatches
from pipeline.segment.diff import compare, new_keys
from pipeline.segment.inputs.kinds import Input
from pipeline.segment.inputs.listing import CHUNK, InputListing, list_inputs
from pipeline.segment.lease import Lease
from pipeline.segment.output import (
    DIFF_DIR,
    LISTING_DIR,
    PLAN_DIR,
    SPEC_NAME,
    OutputDir,
    OutputStateError,
    parts_dir,
)
from pipeline.segment.plan import Plan, SecretsInInput, chunked, plan_digest, write_plan
from pipeline.segment.resources import actor_plan
from pipeline.segment.resources import check as check_plan
from pipeline.segment.stages.write import ShardRecord
from pipeline.segment.table_state import TableState, convert_folder
from pipeline.storage import redact

# Memory reserved per decode task: a worker with torch loaded (~0.5 GiB) plus a
# 40-megapixel photo decoded and resized to float.
DECODE_TASK_MEMORY = 1024**3
# Logical CPUs per task of the CPU stages. Fractions on purpose: with whole CPUs
# a small cluster's budget (what the model actors leave) let Ray Data run decode
# alone until it was done, and no part came out before the end (measured: 160
# images on 2 CPUs, first part at 27 s of 29 s; with these, at 16 s of 33 s and
# then steadily). Decode also waits on storage, so two per core keep cores busy.
DECODE_CPUS, ENCODE_CPUS, PART_CPUS = 0.5, 0.5, 0.25


@dataclass
class SegmentOptions:
    """How to run. Only score_threshold, max_detections, fast and tf32 change the rows."""

    batch_size: int = 4
    actors: tuple[int, int] | None = None  # (min, max); default from the cluster
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # default: 1 with a GPU, else half the largest node's
    score_threshold: float | None = None
    max_detections: int | None = None
    fast: bool = False
    tf32: bool = False  # TF32 for fp32 on CUDA (Ampere+); stages.model.set_tf32
    overwrite: bool = False  # replace every row of the table, in one commit
    prune: bool = False  # remove the rows of images gone from INPUT, in the run's commit
    retry_errors: bool = False  # segment again the images whose row is an error
    rows_per_part: int = 500  # images per Parquet file: also what a killed run can lose
    resize_on_cpu: bool = True  # GPU actors still get uint8 where that is fewer bytes
    ray_address: str | None = None  # when Ray is not initialised yet; None: RAY_ADDRESS or local
    input_options: dict[str, Any] | None = None
    output_options: dict[str, Any] | None = None
    model_options: dict[str, Any] | None = None
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    stall_timeout: float = 900.0  # seconds without a part while Ray cannot place; 0: off
    autoscaling: bool = False  # the cluster may add nodes: an actor no node hosts only warns
    wait_interval: float | None = None  # between "waiting for resources" lines; None: 60 s
    # or MASKRCNN_WAIT_INTERVAL_S (pipeline.cluster.wait_interval)


@dataclass(frozen=True)
class Resources:
    """What the pipeline's stages ask Ray for (:meth:`SegmentRun.resources`)."""

    gpus_per_actor: float
    cpus_per_actor: float
    actors: tuple[int, int]  # (min, max) model actors
    rows_per_block: int  # input rows per Ray Data block
    # Place the model actors before any task starts (driver.build_dataset): on more than
    # one node, Ray Data's budget counts CPUs cluster-wide, and tasks can take every CPU
    # of the node an actor needs while the CPUs it leaves free are spread elsewhere.
    actors_first: bool = False
    decode_cpus: float = DECODE_CPUS
    decode_memory: int = DECODE_TASK_MEMORY
    encode_cpus: float = ENCODE_CPUS
    part_cpus: float = PART_CPUS


@dataclass(frozen=True)
class SegmentRun:
    """One run of segment into OUTPUT, its plan made or resumed (:func:`open_run`).

    ``plan`` says how many images there are and how they are sharded (plan.py): the
    driver holds no URI. An image's key is its URI redacted (pipeline.storage.redact),
    which is also the ``uri`` column, so that signed-URL parameters are never stored;
    ``sources`` maps key -> the URI to read for an INPUT whose URIs carry secrets (None
    otherwise). Such an INPUT is held in memory, and listed again on resume, since its
    URIs may not be written to OUTPUT.
    """

    out: OutputDir
    spec: dict[str, Any]  # this invocation's, or the resumed run's
    plan: Plan
    sources: dict[str, str] | None
    lease: Lease
    opts: SegmentOptions
    log: Callable[[str], None]

    def pending(self) -> list[int]:
        """The plan's shards no committed part holds yet, in order.

        Raises OutputStateError when OUTPUT holds a part that is not of the plan.
        """
        done: set[int] = set()
        for name in self.out.part_names():
            shard = self.plan.shard_of_part(name)
            if shard is None:
                raise OutputStateError(
                    f"OUTPUT {self.out.show()} holds {name}, which is not a part of its run's "
                    "plan; pass --overwrite"
                )
            done.add(shard)
        if done:
            images_done = sum(self.plan.rows(i) for i in done)
            self.log(
                f"segment: {images_done} of {self.plan.images} images already committed; "
                f"{self.plan.images - images_done} to go"
            )
        return [i for i in range(self.plan.shards) if i not in done]

    def execute(self, build: Callable[[list[int], Resources], Callable[[], Any]]) -> dict:
        """Run the pipeline over the :meth:`pending` shards: ``build(pending, resources)``
        returns what builds the dataset (in the executor actor); its tasks write the parts,
        and the driver hears of each in a record (monitor.ShardTracker).

        Returns this run's figures (ShardTracker.summary).
        """
        # lazy: monitor.py imports ray, and a bad INPUT or model fails before Ray is
        # imported (0.3 s; tests/test_cli_args.py checks that it is not)
        from pipeline.segment.monitor import ShardTracker, Watchdog, remote_rows

        pending = self.pending()
        started = time.monotonic()
        tracker = ShardTracker(self.out, self.plan, self.lease, started)
        if pending:
            total = sum(self.plan.rows(i) for i in pending)
            dataset = build(pending, self.resources(total))
            interval = self.opts.wait_interval or wait_interval()
            watchdog = Watchdog(self.log, self.opts.stall_timeout, interval, total=total)
            with remote_rows(dataset) as rows:
                for row in rows.rows(waiting=watchdog.check, poll=watchdog.every):
                    watchdog.progress(tracker.add(ShardRecord.from_row(row)))
                    watchdog.poll()
                tracker.wait(watchdog.check, watchdog.every)
        return tracker.summary(time.monotonic() - started)

    def finish(self, processed: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
        """Commit the run to the table (commit.finalize) while the lease is still ours; the
        summary."""
        self.lease.check(read=True)
        extra = {"versions": versions, **self.opts.extra_manifest}
        record = finalize(self.out, self.spec, self.plan, extra)
        elapsed, rows = processed["seconds"], processed["rows"]
        rate = rows / elapsed if elapsed > 0 and rows else 0.0
        if record.get("found"):
            self.log(
                f"segment: run {record['run_id']} was committed before its driver stopped "
                f"(version {record['version']}); not committing it again"
            )
        else:
            changes = record["changes"]
            self.log(
                f"segment: {self.out.show()} version {record['version']}: "
                f"{changes['added']} images added, {changes['replaced']} replaced, "
                f"{changes['removed']} removed; the table: {counts_text(record['counts'])}; "
                f"this run {rows} images in {elapsed:.1f}s ({rate:.2f} images/s)"
            )
        return {**record, "already_complete": False, "images_per_s": rate, "this_run": processed}

    def nothing_to_do(self) -> bool:
        """True when the run would commit nothing: no image to segment, no row to change."""
        diff = Diff.from_spec(self.spec)
        return self.plan.images == 0 and not diff.replaces and not self.spec.get("overwrite")

    def up_to_date(self, state: TableState) -> dict[str, Any]:
        """The summary of a run with :meth:`nothing_to_do`; says so in one line."""
        gone = Diff.from_spec(self.spec).gone
        note = f"; {gone} of its images are gone from INPUT (--prune removes them)" if gone else ""
        self.log(
            f"segment: {self.out.show()} is up to date ({counts_text(state.counts.as_images())})"
            f"{note}; no new image in INPUT, nothing to do"
        )
        record = latest_record(load_table(self.out.uri, self.out.options)) or {}
        return {**record, "already_complete": True, "images_per_s": None, "gone": gone}

    def resources(self, pending: int) -> Resources:
        """Each stage's resources for ``pending`` images, from the options and each node's
        shape (resources.py); raises InfeasibleError before any work when the nodes cannot
        run them (a warning instead on a cluster that may add nodes)."""
        opts, shapes = self.opts, node_shapes()
        if opts.actors is not None and (opts.actors[0] < 1 or opts.actors[1] < opts.actors[0]):
            raise ValueError(
                f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {opts.actors}"
            )
        plan = actor_plan(opts.gpus_per_actor, opts.cpus_per_actor, opts.actors, shapes)
        check_plan(plan, shapes, lambda: launching(opts.autoscaling), self.log)
        # Enough input blocks for every CPU to decode, small enough to stream.
        cpus_total = max(1, int(sum(s.cpus for s in shapes)))
        per_block = max(1, min(self.plan.rows_per_shard, math.ceil(pending / (4 * cpus_total))))
        return Resources(plan.gpus, plan.cpus, plan.actors, per_block, len(shapes) > 1)


@contextmanager
def leased(lease: Lease) -> Iterator[None]:
    """Hold OUTPUT's lease for the block; tidy ``_run/`` after, whatever happened."""
    lease.acquire()
    try:
        yield
    finally:
        lease.release()
        lease.out.remove_empty_run_dir()


def open_run(
    out: OutputDir,
    source: Input,
    spec: dict[str, Any],
    lease: Lease,
    opts: SegmentOptions,
    log: Callable[[str], None],
    listing: InputListing | None,
    start_ray: Callable[[], Any],
) -> tuple[SegmentRun, TableState]:
    """Under ``lease``: resume the unfinished run in OUTPUT (unless --overwrite), or plan
    anew: every image of INPUT into an empty table (or, with --overwrite, in place of its
    rows), else the images the table has no row for (diff.py). The run, ready, and OUTPUT's
    state before it.

    ``listing``: INPUT's listing when begun already, else begun here when needed;
    ``start_ray`` is called before work that fans out over Ray tasks.
    """
    state = TableState.read(out)
    if opts.overwrite:
        out.clear_run_state()
    old = out.read_json(SPEC_NAME)
    if old is not None:
        spec, plan, sources = _resume(out, source, spec, old, log)
        return SegmentRun(_parts_of(out, spec), spec, plan, sources, lease, opts, log), state
    if not opts.overwrite:
        state.refuse_another(out, spec)
    if state.folder is not None:
        state = convert_folder(out, state, log)
    seq = state.seq + 1
    out = OutputDir(out.uri, out.options, parts_dir(seq))
    out.remove(out.parts, recursive=True)  # an abandoned attempt's: the log holds not one
    listing = listing or InputListing.begin(source)
    spec = {
        **spec,
        "seq": seq,
        "parts": out.parts,
        "base_version": state.version,
        "base_counts": state.counts.as_images(),
        "overwrite": bool(opts.overwrite and state.rows),
    }
    if state.rows and not opts.overwrite:
        plan, sources, extra = _plan_increment(out, source, opts, listing, state, start_ray, log)
    else:
        plan, sources = _plan(out, source, opts, listing, start_ray)
        extra = {}
    spec = {**spec, **plan.to_spec(), **extra, "sources_redacted": sources is not None}
    out.put_json(SPEC_NAME, spec)  # after the plan: a spec always has its plan
    return SegmentRun(out, spec, plan, sources, lease, opts, log), state


def _parts_of(out: OutputDir, spec: dict[str, Any]) -> OutputDir:
    return OutputDir(out.uri, out.options, spec["parts"])


def _plan_increment(
    out: OutputDir,
    source: Input,
    opts: SegmentOptions,
    listing: InputListing,
    state: TableState,
    start_ray: Callable[[], Any],
    log: Callable[[str], None],
) -> tuple[Plan, dict[str, str] | None, dict[str, Any]]:
    """(plan, sources, spec fields) of a run on a table with rows: INPUT listed under
    LISTING_DIR, compared with the table (diff.compare), the keys to segment planned."""
    listed, sources = _plan(out, source, opts, listing, start_ray, LISTING_DIR)
    assert state.version is not None
    diff = compare(out, listed, state.version, (opts.prune, opts.retry_errors), start_ray)
    plan = write_plan(out, new_keys(out), opts.rows_per_part, check_plain=False, allow_empty=True)
    for folder in (LISTING_DIR, DIFF_DIR):
        out.remove(folder, recursive=True)
    log(
        f"segment: INPUT lists {listed.images} images: {diff.new} new"
        + (f", {diff.retry} with errors to retry" if opts.retry_errors else "")
        + f"; {diff.gone} of the table's images are gone from INPUT"
        + (" (pruned)" if opts.prune and diff.gone else "")
    )
    return plan, sources, {"diff": diff.to_spec(), "listing_digest": listed.digest}


def _resume(
    out: OutputDir,
    source: Input,
    spec: dict[str, Any],
    old: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], Plan, dict[str, str] | None]:
    """(spec, plan, sources) of the unfinished run ``old`` in OUTPUT."""
    _refuse_another(
        out,
        old,
        spec,
        "holds an unfinished run",
        "re-run that command to finish it, or pass --overwrite",
    )
    plan = Plan.from_spec(old)
    if plan is None or "seq" not in old:
        raise OutputStateError(
            f"OUTPUT {out.show()} holds an unfinished run of an earlier version of "
            "maskrcnn, whose state this one does not read; pass --overwrite to redo it"
        )
    sources = None
    if old.get("sources_redacted"):
        sources = keyed_sources(list_inputs(source))
        if plan_digest(chunked(sorted(sources), CHUNK)) != old.get("listing_digest", plan.digest):
            raise OutputStateError(
                f"INPUT {source.show()} now lists other images than when the run "
                f"in {out.show()} started; restore it, or pass --overwrite"
            )
    log(f"segment: resuming run {old['run_id']} in {out.show()} ({plan.images} images planned)")
    return old, plan, sources


def _plan(
    out: OutputDir,
    source: Input,
    opts: SegmentOptions,
    listing: InputListing,
    start_ray: Callable[[], Any],
    folder: str = PLAN_DIR,
) -> tuple[Plan, dict[str, str] | None]:
    """(plan, sources) of a new run: INPUT listed into shard files under OUTPUT's
    ``folder``."""
    for stale in (PLAN_DIR, LISTING_DIR, DIFF_DIR):
        out.remove(stale, recursive=True)  # of a start killed while planning
    if listing.fans_out:
        start_ray()
    rows = opts.rows_per_part
    try:
        try:
            return write_plan(out, listing.chunks(), rows, folder=folder), None
        except SecretsInInput:  # keys differ from URIs: sorted by key, in memory
            sources = keyed_sources(list_inputs(source))
            out.remove(folder, recursive=True)
            keys = chunked(sorted(sources), CHUNK)
            return write_plan(out, keys, rows, check_plain=False, folder=folder), sources
    except BaseException:
        out.remove(folder, recursive=True)
        raise


def keyed_sources(uris: list[str]) -> dict[str, str]:
    """key (redacted URI) -> URI; of URIs that differ only in secrets, the first is kept."""
    sources: dict[str, str] = {}
    for uri in uris:
        sources.setdefault(redact(uri), uri)
    return sources


def counts_text(counts: dict[str, int]) -> str:
    return (
        f"{counts['ok']} images ok, {counts['error']} with errors, {counts['instances']} instances"
    )


def _refuse_another(
    out: OutputDir, old: dict[str, Any], spec: dict[str, Any], holds: str, advice: str
) -> None:
    """Raise OutputStateError when ``old`` (a manifest or spec) decides rows otherwise."""
    diffs = spec_mismatches(old, spec)
    if diffs:
        raise OutputStateError(
            f"OUTPUT {out.show()} {holds} with another {'; '.join(diffs)}; {advice}"
        )
