"""segment: a bucket of images -> rows in a Delta table, each image exactly once.

The data flow reads like the sentence it is::

    plan (shard files of the listed URIs the table has no row for)
      -> read a shard's URIs (CPU tasks) -> read bytes + decode + resize (CPU tasks)
      -> Segmenter (model actors, one model load each, batched predict)
      -> paste masks + RLE encode (CPU tasks) -> each shard's Parquet part, written by
         the task that finishes it -> one commit of every part to the table

and so does :func:`segment`: check INPUT, load the model, open the run (run.py: resume,
or plan what the table lacks), execute it (:func:`build_dataset`, run by an actor beside
the driver, monitor.py; the driver hears of each part in a small record), finish it (the
commit).

Exactly once and resume follow the protocol in commit.py: a shard's part appears in
OUTPUT only as a whole, under a name the plan fixes; a re-run skips the shards whose
parts are there; the commit adds exactly one part per shard, each checked against its
shard's count, and carries the run's ``txn`` so that it happens once. The driver holds
shard numbers and counts, never URIs or rows.
"""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from pipeline.cluster import init_ray
from pipeline.output.table import has_table
from pipeline.segment.inputs.kinds import Input
from pipeline.segment.inputs.listing import InputListing
from pipeline.segment.lease import Lease
from pipeline.segment.model_source import ModelSource, build_model, read_model
from pipeline.segment.output import MANIFEST_NAME, RUN_DIR, SPEC_NAME, OutputDir, now_iso
from pipeline.segment.plan import Plan
from pipeline.segment.run import (
    Resources,
    SegmentOptions,
    SegmentRun,
    leased,
    open_run,
)
from pipeline.segment.stages.decode import decoded_tables
from pipeline.segment.stages.encode import encode_rows
from pipeline.segment.stages.model import Segmenter
from pipeline.segment.stages.read import expand_shards
from pipeline.segment.stages.shared import Shared
from pipeline.segment.stages.write import write_parts
from pipeline.storage import redact

__all__ = ["SegmentOptions", "segment"]

MIN_ACTORS_WAIT_S = 30 * 24 * 3600  # Ray Data's wait for the first model actors: unbounded


def segment(
    input_uri: str,
    output_uri: str,
    source: ModelSource,
    opts: SegmentOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment every image INPUT names that OUTPUT's table has no row for yet, and commit
    their rows to it; returns the summary (the commit's record + rate).

    Starts Ray (``opts.ray_address``) unless it is initialised already, and only
    once there is work to do. Raises OutputStateError when OUTPUT holds rows of another
    model or options (without ``overwrite``) or another run is writing it. Works from any
    thread: a stall raises StallError in the calling thread (monitor.py).
    """
    opts = opts or SegmentOptions()
    _check_options(opts)
    log = log or _to_stderr
    out = OutputDir(output_uri, opts.output_options)
    inputs = Input(input_uri, opts.input_options)
    # INPUT first: a typo in it fails in a moment, before the model is read and Ray starts.
    listing = _listing_if_planning(out, inputs, opts)
    # Ray starts once: before work that fans out over Ray tasks, else once there is work.
    start_ray = functools.cache(functools.partial(init_ray, opts.ray_address, log, "segment"))
    model, model_bytes = _load_model(
        source, opts, start_ray if _work_is_certain(out, listing, opts) else None
    )
    spec = _new_spec(model, source, inputs, opts)
    lease = Lease(out, spec["run_id"])
    with leased(lease):
        run, state = open_run(out, inputs, spec, lease, opts, log, listing, start_ray)
        if run.nothing_to_do():
            summary = run.up_to_date(state)
        else:
            if run.plan.images:
                start_ray()
            job = functools.partial(PipelineJob.of, run, model.cfg, model_bytes)
            summary = run.finish(run.execute(job), _versions())
    out.remove(RUN_DIR, recursive=True)
    return summary


@dataclass(frozen=True)
class PipelineJob:
    """Everything :func:`build_dataset` needs, as plain data and object refs: the executor
    actor unpickles it, and never imports torch (the model's config is a dict)."""

    plan: Plan
    pending: list[int]
    res: Resources
    opts: SegmentOptions
    model_config: dict[str, Any]  # MaskRCNNConfig.to_dict()
    class_names: list[str]
    mask_threshold: float
    model_id: str
    output: tuple[str, dict[str, Any] | None, str]  # OUTPUT, its options, the parts folder
    attempt: str
    sources: Shared | None
    model: Shared

    @classmethod
    def of(
        cls,
        run: SegmentRun,
        cfg: Any,
        model_bytes: bytes,
        pending: list[int],
        res: Resources,
    ) -> Callable[[], Any]:
        """What builds the pipeline over ``pending`` shards of ``run``, for the executor
        actor to call, so that the pipeline's input blocks are that actor's objects."""
        import ray  # lazy: see SegmentRun.execute (Ray is up by the time this runs)

        job = cls(
            plan=run.plan,
            pending=pending,
            res=res,
            opts=run.opts,
            model_config=cfg.to_dict(),
            class_names=cfg.label_names,
            mask_threshold=cfg.mask_threshold,
            model_id=run.spec["model"],
            output=(run.out.uri, run.out.options, run.out.parts),
            attempt=run.lease.attempt,
            sources=None if run.sources is None else Shared(ray.put(run.sources)),
            model=Shared(ray.put(model_bytes)),
        )
        return functools.partial(build_dataset, job)


def build_dataset(job: PipelineJob) -> Any:
    """The Ray Data pipeline over the ``job.pending`` shards: the sentence itself."""
    import ray.data  # lazy: only the executor actor builds datasets (0.8 s, measured)

    where = {"output_uri": job.output[0], "output_options": job.output[1]}
    res = job.res
    ranges = _ranges(job.plan, job.pending, res.rows_per_block)
    dataset = (
        # from_items builds each block's metadata here; from_arrow runs a Ray task per
        # block for it before the pipeline starts (a worker start on the critical path,
        # and one task per range of a large plan).
        ray.data.from_items(ranges, override_num_blocks=len(ranges))
        .map_batches(
            expand_shards,
            batch_size=None,  # a block: one range of one shard
            batch_format="pyarrow",
            fn_kwargs={**where, "sources": job.sources},
            # decode's resources: Ray Data fuses the two, one task and no hop between
            num_cpus=res.decode_cpus,
            memory=res.decode_memory,
        )
        .map_batches(decoded_tables, **_decode_args(job))
        .map_batches(Segmenter, **_model_args(job))
        .map_batches(
            encode_rows,
            batch_format="pyarrow",
            fn_kwargs={
                "class_names": job.class_names,
                "model_id": job.model_id,
                "mask_threshold": job.mask_threshold,
            },
            num_cpus=res.encode_cpus,
        )
        .map_batches(
            write_parts,
            batch_size=job.plan.rows_per_shard,
            batch_format="pyarrow",
            fn_kwargs={**where, "attempt": job.attempt, "parts": job.output[2]},
            num_cpus=res.part_cpus,
        )
    )
    if res.actors_first:
        # Seen on 3-CPU nodes: a 2-CPU actor waited the whole run while tasks took each
        # CPU that freed. The wait has no limit of its own: the driver's watchdog ends a
        # run whose actors cannot be placed. On one node the budget itself keeps the
        # actors' CPUs free, and their start (about 4 s) overlaps the first decodes.
        dataset.context.wait_for_min_actors_s = MIN_ACTORS_WAIT_S
    return dataset


def _decode_args(job: PipelineJob) -> dict[str, Any]:
    return {
        "batch_size": None,  # the block: reads overlap across it, tables come out bounded
        "batch_format": "pyarrow",
        "fn_kwargs": {
            "storage_options": job.opts.input_options,
            "cfg": job.model_config if job.opts.resize_on_cpu else None,
            # GPU actors resize on the device what ships smaller as uint8.
            "resize": "smaller" if job.res.gpus_per_actor > 0 else "always",
        },
        "num_cpus": job.res.decode_cpus,
        # Room for one large image; being unlike the actor's resources, this also keeps
        # Ray Data from fusing decode into the model actor, whose time is the model's alone.
        "memory": job.res.decode_memory,
    }


def _model_args(job: PipelineJob) -> dict[str, Any]:
    import ray.data  # see build_dataset

    res, opts = job.res, job.opts
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=res.actors[0], max_size=res.actors[1]),
        "batch_size": None,  # a block a call; predict takes opts.batch_size at a time
        "batch_format": "pyarrow",
        "num_gpus": res.gpus_per_actor,
        "num_cpus": res.cpus_per_actor,
        "fn_constructor_args": (job.model,),
        "fn_constructor_kwargs": {
            "score_threshold": opts.score_threshold,
            "max_detections": opts.max_detections,
            "fast": opts.fast,
            "tf32": opts.tf32,
            "threads": int(res.cpus_per_actor),
            "batch_size": opts.batch_size,
        },
    }


def _load_model(
    source: ModelSource, opts: SegmentOptions, start_ray: Callable[[], Any] | None
) -> tuple[Any, bytes]:
    """(model, bytes for the actors). The bytes are read first, so that a missing model
    fails before Ray starts; with ``start_ray``, Ray then starts in this thread while the
    model is built in another: on 2 cores a local Ray's start took 4.6 s and the model's
    build 2.5 s, most of it importing torch (measured), and they overlap."""
    data = read_model(source, opts.model_options)
    if start_ray is None:
        return build_model(source, data)
    with ThreadPoolExecutor(1, thread_name_prefix="segment-model") as pool:
        building = pool.submit(build_model, source, data)
        start_ray()
        return building.result()


def _work_is_certain(out: OutputDir, listing: InputListing | None, opts: SegmentOptions) -> bool:
    """Whether this run will segment images whatever the plan says: it plans anew
    (``listing``), and every listed image is to segment (OUTPUT holds no rows, or
    --overwrite replaces them). An empty INPUT has failed by now (InputListing.begin).
    A hint read before the lease: open_run reads OUTPUT's state again under it, and a
    wrong hint costs only when Ray starts."""
    if listing is None:
        return False
    return opts.overwrite or not (has_table(out.uri, out.options) or out.exists(MANIFEST_NAME))


def _check_options(opts: SegmentOptions) -> None:
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.rows_per_part < 1:
        raise ValueError(f"--rows-per-part must be at least 1, got {opts.rows_per_part}")


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _listing_if_planning(
    out: OutputDir, inputs: Input, opts: SegmentOptions
) -> InputListing | None:
    """INPUT's listing, begun (InputListing.begin), when this run will plan anew: with
    --overwrite, or when OUTPUT holds no unfinished run to resume. None otherwise: a
    resumed run lists INPUT only when open_run needs it.

    Raises what list_inputs raises (FileNotFoundError, ValueError, OSError naming INPUT).
    """
    if not opts.overwrite and out.exists(SPEC_NAME):
        return None
    return InputListing.begin(inputs)


def _ranges(plan: Plan, shards: list[int], per_block: int) -> list[dict[str, int]]:
    """The pipeline's input: for each shard, its rows in ranges of ``per_block``, one row
    (a block of its own) each: shard, start, stop, shard_rows."""
    ranges = []
    for shard in shards:
        size = plan.rows(shard)
        for start in range(0, size, per_block):
            stop = min(size, start + per_block)
            ranges.append({"shard": shard, "start": start, "stop": stop, "shard_rows": size})
    return ranges


def _new_spec(model: Any, source: ModelSource, inputs: Input, opts: SegmentOptions) -> dict:
    """This invocation's spec: a fresh run id and the fields that decide what rows hold."""
    from maskrcnn.checkpoint import model_id  # lazy: a bad INPUT fails before torch loads

    return {
        "run_id": uuid.uuid4().hex[:16],
        "model": model_id(model),
        "model_uri": redact(source.uri),
        "config": model.cfg.to_dict(),
        "input": inputs.normalized(),
        "options": {
            "score_threshold": opts.score_threshold,
            "max_detections": opts.max_detections,
            "fast": bool(opts.fast),
            **({"tf32": True} if opts.tf32 else {}),
        },
        "started": now_iso(),
    }


def _versions() -> dict[str, str]:
    names = ("maskrcnn", "torch", "torchvision", "ray", "pyarrow")
    # All loaded by now but torchvision, whose package the model never imports (its op
    # library is loaded alone, maskrcnn/ops.py): its installed version.
    return {
        name: sys.modules[name].__version__ if name in sys.modules else version(name)
        for name in names
    }
