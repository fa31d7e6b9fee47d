"""segment: a bucket of images -> a Parquet dataset of every object found, exactly once.

The data flow reads like the sentence it is::

    plan (shard files of listed URIs) -> read a shard's URIs (CPU tasks)
      -> read bytes + decode + resize (CPU tasks)
      -> Segmenter (model actors, one model load each, batched predict)
      -> paste masks + RLE encode (CPU tasks) -> each shard's Parquet part, written by
         the task that finishes it -> manifest

and so does :func:`segment`: check INPUT, load the model, open the run
(:class:`SegmentRun`: resume or plan), execute it (the Ray Data pipeline, run by an
actor beside the driver, pipeline/segment/executor.py; the driver hears of each part
in a small record), finish it (the manifest).

Exactly once and resume follow the protocol in pipeline/segment/commit.py: a shard's
part appears in OUTPUT only as a whole, under a name the plan fixes; a re-run skips the
shards whose parts are there; the manifest, written last, lists exactly one part per
shard, each checked against its shard's count. The driver holds shard numbers and
counts, never URIs or rows.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.cluster import init_ray, launching, node_shapes, wait_interval
from pipeline.output.schema import MANIFEST_NAME
from pipeline.segment.commit import (
    RUN_DIR,
    SPEC_NAME,
    OutputDir,
    OutputStateError,
    finalize,
    now_iso,
    spec_mismatches,
)
from pipeline.segment.executor import remote_rows
from pipeline.segment.inputs import CHUNK, InputListing, list_inputs
from pipeline.segment.lease import Lease
from pipeline.segment.model_source import ModelSource, load_model
from pipeline.segment.plan import PLAN_DIR, Plan, SecretsInInput, chunked, plan_digest, write_plan
from pipeline.segment.resources import actor_plan
from pipeline.segment.resources import check as check_plan
from pipeline.segment.tracker import ShardTracker
from pipeline.segment.watchdog import Watchdog
from pipeline.storage import get_fs, redact

if TYPE_CHECKING:
    from maskrcnn.config import MaskRCNNConfig

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
    tf32: bool = False  # TF32 for fp32 on CUDA (Ampere+); stages.set_tf32
    overwrite: bool = False
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


def segment(
    input_uri: str,
    output_uri: str,
    source: ModelSource,
    opts: SegmentOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment every image INPUT names into OUTPUT; returns the summary (manifest + rate).

    Starts Ray (``opts.ray_address``) unless it is initialised already, and only
    once there is work to do. Raises OutputStateError when OUTPUT holds another
    run's work (without ``overwrite``) or another run is writing it.
    """
    opts = opts or SegmentOptions()
    _check_options(opts)
    out = OutputDir(output_uri, opts.output_options)
    # INPUT first: a typo in it fails in a moment, before the model is read and Ray starts.
    listing = _listing_if_planning(out, input_uri, opts)
    model, model_bytes = load_model(source, opts.model_options)
    spec = _new_spec(model, source, input_uri, opts)
    run = SegmentRun(out, input_uri, spec, model.cfg, model_bytes, opts, log or _to_stderr)
    if not opts.overwrite and (summary := run.already_complete()) is not None:
        return summary
    with run.leased():
        start_ray = lambda: init_ray(opts.ray_address, run.log, "segment")  # noqa: E731
        run.open(listing, start_ray)
        start_ray()
        summary = run.finish(run.execute())
    out.remove(RUN_DIR, recursive=True)
    return summary


@dataclass(frozen=True)
class Resources:
    """What the pipeline's stages ask Ray for (SegmentRun.resources)."""

    gpus_per_actor: float
    cpus_per_actor: float
    actors: tuple[int, int]  # (min, max) model actors
    rows_per_block: int  # input rows per Ray Data block
    decode_cpus: float = DECODE_CPUS
    decode_memory: int = DECODE_TASK_MEMORY
    encode_cpus: float = ENCODE_CPUS
    part_cpus: float = PART_CPUS


@dataclass
class SegmentRun:
    """One run of segment into OUTPUT: its spec, plan, lease, and the model to ship.

    ``spec`` is this invocation's until :meth:`open` finds an unfinished run to
    resume, then that run's. ``plan`` says how many images there are and how they are
    sharded (pipeline/segment/plan.py): the driver holds no URI. An image's key is its URI
    redacted (pipeline.storage.redact), which is also the ``uri`` column, so that
    signed-URL parameters are never stored; ``sources`` maps key -> the URI to read for an
    INPUT whose URIs carry secrets (None otherwise). Such an INPUT is held in memory, and
    listed again on resume, since its URIs may not be written to OUTPUT.
    """

    out: OutputDir
    input_uri: str
    spec: dict[str, Any]
    cfg: MaskRCNNConfig
    model_bytes: bytes  # safetensors, what each model actor builds its model from
    opts: SegmentOptions
    log: Callable[[str], None]
    plan: Plan | None = None
    sources: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.lease = Lease(self.out, self.spec["run_id"])

    # --- before the lease ---------------------------------------------------------
    def already_complete(self) -> dict[str, Any] | None:
        """The summary when OUTPUT holds this run finished; None when it holds no manifest.

        Raises OutputStateError when the finished run there is another one.
        """
        manifest = self.out.read_json(MANIFEST_NAME)
        if manifest is None:
            return None
        self._refuse_another(
            manifest, "already holds a finished run", "choose another OUTPUT or pass --overwrite"
        )
        self.log(
            f"segment: {self.out.show()} is complete ({_counts_text(manifest['counts'])}); "
            "nothing to do (--overwrite to redo it)"
        )
        return {**manifest, "already_complete": True, "images_per_s": None}

    @contextmanager
    def leased(self) -> Iterator[None]:
        """Hold OUTPUT's lease for the block; tidy ``_run/`` after, whatever happened."""
        self.lease.acquire()
        try:
            yield
        finally:
            self.lease.release()
            self.out.remove_empty_run_dir()

    # --- under the lease ----------------------------------------------------------
    def open(self, listing: InputListing | None, start_ray: Callable[[], Any]) -> None:
        """Clear OUTPUT (--overwrite), then resume the unfinished run there or plan anew.

        ``listing``: INPUT's listing when begun already, else begun here when needed;
        ``start_ray`` is called before a listing that fans out over Ray tasks.
        """
        if self.opts.overwrite:
            self.out.clear()
        old = self.out.read_json(SPEC_NAME)
        if old is not None:
            self._resume(old)
        else:
            self._plan(
                listing or InputListing.begin(self.input_uri, self.opts.input_options), start_ray
            )

    def _resume(self, old: dict[str, Any]) -> None:
        self._refuse_another(
            old,
            "holds an unfinished run",
            "re-run that command to finish it, or pass --overwrite",
        )
        plan = Plan.from_spec(old)
        if plan is None:
            raise OutputStateError(
                f"OUTPUT {self.out.show()} holds an unfinished run of an earlier version of "
                "maskrcnn, whose state this one does not read; pass --overwrite to redo it"
            )
        sources = None
        if old.get("sources_redacted"):
            sources = _sources(list_inputs(self.input_uri, self.opts.input_options))
            if plan_digest(chunked(sorted(sources), CHUNK)) != plan.digest:
                raise OutputStateError(
                    f"INPUT {redact(self.input_uri)} now lists other images than when the run "
                    f"in {self.out.show()} started; restore it, or pass --overwrite"
                )
        self.log(
            f"segment: resuming run {old['run_id']} in {self.out.show()} "
            f"({plan.images} images planned)"
        )
        self.spec, self.plan, self.sources = old, plan, sources

    def _plan(self, listing: InputListing, start_ray: Callable[[], Any]) -> None:
        if self.out.part_names():
            raise OutputStateError(
                f"OUTPUT {self.out.show()} holds part files but no run state; pass --overwrite "
                "to replace them"
            )
        self.out.remove(PLAN_DIR, recursive=True)  # shards of a start killed while planning
        if listing.fans_out:
            start_ray()
        rows, sources = self.opts.rows_per_part, None
        try:
            try:
                plan = write_plan(self.out, listing.chunks(), rows)
            except SecretsInInput:  # keys differ from URIs: sorted by key, in memory
                sources = _sources(list_inputs(self.input_uri, self.opts.input_options))
                self.out.remove(PLAN_DIR, recursive=True)
                plan = write_plan(
                    self.out, chunked(sorted(sources), CHUNK), rows, check_plain=False
                )
        except BaseException:
            self.out.remove(PLAN_DIR, recursive=True)
            raise
        self.spec = {**self.spec, **plan.to_spec(), "sources_redacted": sources is not None}
        self.out.put_json(SPEC_NAME, self.spec)  # after the plan: a spec always has its plan
        self.plan, self.sources = plan, sources

    def pending(self) -> list[int]:
        """The plan's shards no committed part holds yet, in order.

        Raises OutputStateError when OUTPUT holds a part that is not of the plan.
        """
        plan = self.plan
        done: set[int] = set()
        for name in self.out.part_names():
            shard = plan.shard_of_part(name)
            if shard is None:
                raise OutputStateError(
                    f"OUTPUT {self.out.show()} holds {name}, which is not a part of its run's "
                    "plan; pass --overwrite"
                )
            done.add(shard)
        pending = [i for i in range(plan.shards) if i not in done]
        if done:
            images_done = sum(plan.rows(i) for i in done)
            self.log(
                f"segment: {images_done} of {plan.images} images already committed; "
                f"{plan.images - images_done} to go"
            )
        return pending

    def execute(self) -> dict[str, Any]:
        """Run the pipeline over the :meth:`pending` shards; their parts are written by the
        pipeline's tasks, and the driver hears of each in a record (ShardTracker).

        Returns this run's counts: rows, ok, error, instances, parts, seconds, and
        first_part_s / first_part_rows when a part came out.
        """
        pending = self.pending()
        started = time.monotonic()
        tracker = ShardTracker(self.out, self.plan, self.lease, started)
        if pending:
            total = sum(self.plan.rows(i) for i in pending)
            build = self.pipeline(pending, total)
            interval = self.opts.wait_interval or wait_interval()
            watchdog = Watchdog(self.log, self.opts.stall_timeout, interval, total=total)
            with watchdog.watching(), remote_rows(build) as records:
                for record in records:
                    watchdog.progress(tracker.add(record))
                tracker.wait()
        return {**tracker.processed, "seconds": time.monotonic() - started}

    def finish(self, processed: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (commit.finalize) while the lease is still ours; the summary."""
        self.lease.check(read=True)
        extra = {"versions": _versions(), **self.opts.extra_manifest}
        manifest = finalize(self.out, self.spec, self.plan, extra)
        elapsed, rows = processed["seconds"], processed["rows"]
        rate = rows / elapsed if elapsed > 0 and rows else 0.0
        self.log(
            f"segment: {_counts_text(manifest['counts'])}; this run {rows} images "
            f"in {elapsed:.1f}s ({rate:.2f} images/s) -> {self.out.show(MANIFEST_NAME)}"
        )
        return {**manifest, "already_complete": False, "images_per_s": rate, "this_run": processed}

    # --- the Ray Data pipeline ------------------------------------------------------
    def resources(self, pending: int) -> Resources:
        """Each stage's resources for ``pending`` images, from the options and each node's
        shape (pipeline.segment.resources); raises InfeasibleError before any work when the
        nodes cannot run them (a warning instead on a cluster that may add nodes)."""
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
        return Resources(plan.gpus, plan.cpus, plan.actors, per_block)

    def pipeline(self, pending: list[int], images: int) -> Callable[[], Any]:
        """What builds the Ray Data pipeline over the ``pending`` shards, ``images`` images
        in all (it yields one
        record per shard a batch of its last stage held, pipeline.segment.parts.RECORD):
        :func:`build_dataset` with its arguments, for the executor actor to call, so that
        the pipeline's input blocks are that actor's objects, not the driver's. Resources
        are worked out here, where their warnings are logged."""
        import ray

        res = self.resources(images)
        return functools.partial(
            build_dataset,
            plan=self.plan,
            pending=pending,
            res=res,
            opts=self.opts,
            cfg=self.cfg,
            model_id=self.spec["model"],
            output=(self.out.uri, self.out.options),
            attempt=self.lease.attempt,
            sources=[ray.put(self.sources)] if self.sources is not None else None,
            model_ref=ray.put(self.model_bytes),
        )

    # --- helpers ----------------------------------------------------------------------
    def _refuse_another(self, old: dict[str, Any], holds: str, advice: str) -> None:
        """Raise OutputStateError when ``old`` (a manifest or spec) decides rows otherwise."""
        diffs = spec_mismatches(old, self.spec)
        if diffs:
            raise OutputStateError(
                f"OUTPUT {self.out.show()} {holds} with another {'; '.join(diffs)}; {advice}"
            )


def build_dataset(
    *,
    plan: Plan,
    pending: list[int],
    res: Resources,
    opts: SegmentOptions,
    cfg: MaskRCNNConfig,
    model_id: str,
    output: tuple[str, dict[str, Any] | None],
    attempt: str,
    sources: list | None,
    model_ref: Any,
) -> Any:
    """The Ray Data pipeline over the ``pending`` shards of ``plan`` (SegmentRun.pipeline
    gathers the arguments; the executor actor calls this)."""
    import ray

    from pipeline.segment.parts import expand_shards, write_parts
    from pipeline.segment.stages import Segmenter, decoded_tables, encode_rows

    where = {"output_uri": output[0], "output_options": output[1]}
    return (
        ray.data.from_arrow(_ranges(plan, pending, res.rows_per_block))
        .map_batches(
            expand_shards,
            batch_size=None,  # a block: one range of one shard
            batch_format="pyarrow",
            fn_kwargs={**where, "rows_per_shard": plan.rows_per_shard, "sources": sources},
            # decode's resources: Ray Data fuses the two, one task and no hop between
            num_cpus=res.decode_cpus,
            memory=res.decode_memory,
        )
        .map_batches(
            decoded_tables,
            batch_size=None,  # the block: reads overlap across it, tables come out bounded
            batch_format="pyarrow",
            fn_kwargs={
                "storage_options": opts.input_options,
                "cfg": cfg if opts.resize_on_cpu else None,
                # GPU actors resize on the device what ships smaller as uint8.
                "resize": "smaller" if res.gpus_per_actor > 0 else "always",
            },
            num_cpus=res.decode_cpus,
            # Room for one large image; being unlike the actor's resources, this also
            # keeps Ray Data from fusing decode into the model actor, whose time is the
            # model's alone.
            memory=res.decode_memory,
        )
        .map_batches(
            Segmenter,
            compute=ray.data.ActorPoolStrategy(min_size=res.actors[0], max_size=res.actors[1]),
            batch_size=None,  # a block a call; predict takes opts.batch_size at a time
            batch_format="pyarrow",
            num_gpus=res.gpus_per_actor,
            num_cpus=res.cpus_per_actor,
            fn_constructor_args=([model_ref],),
            fn_constructor_kwargs={
                "score_threshold": opts.score_threshold,
                "max_detections": opts.max_detections,
                "fast": opts.fast,
                "tf32": opts.tf32,
                "threads": int(res.cpus_per_actor),
                "batch_size": opts.batch_size,
            },
        )
        .map_batches(
            encode_rows,
            batch_format="pyarrow",
            fn_kwargs={
                "class_names": cfg.label_names,
                "model_id": model_id,
                "mask_threshold": cfg.mask_threshold,
            },
            num_cpus=res.encode_cpus,
        )
        .map_batches(
            write_parts,
            batch_size=plan.rows_per_shard,
            batch_format="pyarrow",
            fn_kwargs={
                **where,
                "rows_per_shard": plan.rows_per_shard,
                "attempt": attempt,
            },
            num_cpus=res.part_cpus,
        )
    )


def normalized_input(input_uri: str, options: dict[str, Any] | None) -> str:
    """INPUT as one spelling (absolute local path, scheme kept), redacted."""
    from pipeline.storage import full_uri

    fs, path = get_fs(input_uri, options)
    return redact(full_uri(fs, path.rstrip("/") or "/"))


def _check_options(opts: SegmentOptions) -> None:
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.rows_per_part < 1:
        raise ValueError(f"--rows-per-part must be at least 1, got {opts.rows_per_part}")


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _listing_if_planning(
    out: OutputDir, input_uri: str, opts: SegmentOptions
) -> InputListing | None:
    """INPUT's listing, begun (inputs.InputListing.begin), when this run will plan anew:
    with --overwrite, or when OUTPUT holds neither a finished run nor one to resume. None
    otherwise: those runs list INPUT only when SegmentRun.open needs it.

    Raises what list_inputs raises (FileNotFoundError, ValueError, OSError naming INPUT).
    """
    if not opts.overwrite and (out.exists(MANIFEST_NAME) or out.exists(SPEC_NAME)):
        return None
    return InputListing.begin(input_uri, opts.input_options)


def _ranges(plan: Plan, shards: list[int], per_block: int) -> list[Any]:
    """The pipeline's input: for each shard, its rows in ranges of ``per_block``, one
    Arrow table (a block) each: shard, start, stop, shard_rows."""
    import pyarrow as pa

    blocks = []
    for shard in shards:
        size = plan.rows(shard)
        for start in range(0, size, per_block):
            stop = min(size, start + per_block)
            blocks.append(
                pa.table(
                    {
                        "shard": pa.array([shard], pa.int64()),
                        "start": pa.array([start], pa.int64()),
                        "stop": pa.array([stop], pa.int64()),
                        "shard_rows": pa.array([size], pa.int64()),
                    }
                )
            )
    return blocks


def _new_spec(model: Any, source: ModelSource, input_uri: str, opts: SegmentOptions) -> dict:
    """This invocation's spec: a fresh run id and the fields that decide what rows hold."""
    from maskrcnn.checkpoint import model_id

    return {
        "run_id": uuid.uuid4().hex[:16],
        "model": model_id(model),
        "model_uri": redact(source.uri),
        "config": model.cfg.to_dict(),
        "input": normalized_input(input_uri, opts.input_options),
        "options": {
            "score_threshold": opts.score_threshold,
            "max_detections": opts.max_detections,
            "fast": bool(opts.fast),
            **({"tf32": True} if opts.tf32 else {}),
        },
        "started": now_iso(),
    }


def _sources(uris: list[str]) -> dict[str, str]:
    """key (redacted URI) -> URI; of URIs that differ only in secrets, the first is kept."""
    sources: dict[str, str] = {}
    for uri in uris:
        sources.setdefault(redact(uri), uri)
    return sources


def _counts_text(counts: dict[str, int]) -> str:
    return (
        f"{counts['ok']} images ok, {counts['error']} with errors, {counts['instances']} instances"
    )


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    import maskrcnn

    return {
        "maskrcnn": maskrcnn.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }
