"""segment: a bucket of images -> a Parquet dataset of every object found, exactly once.

The data flow reads like the sentence it is::

    plan (listed URIs) -> read bytes + decode + resize (CPU tasks)
      -> Segmenter (model actors, one model load each, batched predict)
      -> paste masks + RLE encode (CPU tasks) -> Parquet parts (CPU tasks)
      -> the driver writes each part it receives, atomically -> manifest

Exactly once and resume follow the protocol in pipeline/segment/commit.py: a part
file appears in OUTPUT only as a whole, only the driver puts it there, a
re-run skips the URIs already in parts, and the manifest written last lists
exactly the parts, checked to hold every planned URI once.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.output.schema import MANIFEST_NAME
from pipeline.segment.commit import (
    PLAN_NAME,
    RUN_DIR,
    SPEC_NAME,
    OutputDir,
    OutputStateError,
    encode_part,
    finalize,
    now_iso,
    spec_mismatches,
)
from pipeline.segment.inputs import list_inputs
from pipeline.segment.lease import Lease
from pipeline.segment.model_source import ModelSource, load_model
from pipeline.storage import get_fs, redact

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
    """How to run. Only score_threshold, max_detections and fast change the rows."""

    batch_size: int = 4
    actors: tuple[int, int] | None = None  # (min, max); default from the cluster
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # default: 1 with a GPU, else half the CPUs
    score_threshold: float | None = None
    max_detections: int | None = None
    fast: bool = False
    overwrite: bool = False
    rows_per_part: int = 500  # images per Parquet file: also what a killed run can lose
    resize_on_cpu: bool = True
    ray_address: str | None = None  # when Ray is not initialised yet; None: RAY_ADDRESS or local
    input_options: dict[str, Any] | None = None
    output_options: dict[str, Any] | None = None
    model_options: dict[str, Any] | None = None
    extra_manifest: dict[str, Any] = field(default_factory=dict)


def normalized_input(input_uri: str, options: dict[str, Any] | None) -> str:
    """INPUT as one spelling (absolute local path, scheme kept), redacted."""
    from pipeline.storage import full_uri

    fs, path = get_fs(input_uri, options)
    return redact(full_uri(fs, path.rstrip("/") or "/"))


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


def _resources(opts: SegmentOptions, log) -> tuple[float, float, tuple[int, int]]:
    """(gpus per actor, cpus per actor, (min, max) actors) from options and the cluster."""
    import ray

    total = ray.cluster_resources()
    gpus_total, cpus_total = int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))
    gpus = opts.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if gpus_total > 0 else 0.0
    cpus = opts.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus > 0 else float(max(1, cpus_total // 2))
    actors = opts.actors
    if actors is None:
        actors = (1, max(1, int(gpus_total // gpus))) if gpus > 0 else (1, 1)
    if actors[0] < 1 or actors[1] < actors[0]:
        raise ValueError(f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {actors}")
    if gpus * actors[0] > gpus_total:
        # Not an error: an autoscaling cluster adds GPU nodes when Ray asks for them.
        log(
            f"segment: waiting for {gpus * actors[0]:g} GPUs for {actors[0]} model actors; "
            f"the cluster has {gpus_total} now"
        )
    return gpus, cpus, actors


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
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.rows_per_part < 1:
        raise ValueError(f"--rows-per-part must be at least 1, got {opts.rows_per_part}")
    out = OutputDir(output_uri, opts.output_options)
    # INPUT first: a typo in it fails in a moment, before the model is read and Ray starts.
    listed = _list_if_planning(out, input_uri, opts)
    model, model_bytes = load_model(source, opts.model_options)
    from maskrcnn.checkpoint import model_id

    spec = {
        "run_id": uuid.uuid4().hex[:16],
        "model": model_id(model),
        "model_uri": redact(source.uri),
        "config": model.cfg.to_dict(),
        "input": normalized_input(input_uri, opts.input_options),
        "options": {
            "score_threshold": opts.score_threshold,
            "max_detections": opts.max_detections,
            "fast": bool(opts.fast),
        },
        "started": now_iso(),
    }
    if not opts.overwrite:
        manifest = out.read_json(MANIFEST_NAME)
        if manifest is not None:
            diffs = spec_mismatches(manifest, spec)
            if diffs:
                raise OutputStateError(
                    f"OUTPUT {out.show()} already holds a finished run with another "
                    f"{'; '.join(diffs)}; choose another OUTPUT or pass --overwrite"
                )
            log(
                f"segment: {out.show()} is complete ({_counts_text(manifest['counts'])}); "
                "nothing to do (--overwrite to redo it)"
            )
            return {**manifest, "already_complete": True, "images_per_s": None}

    lease = Lease(out, spec["run_id"])
    lease.acquire()
    try:
        if opts.overwrite:
            out.clear()
        spec, plan, sources = _plan(out, spec, input_uri, listed, opts, log)
        import ray

        if not ray.is_initialized():
            # address None: RAY_ADDRESS when set (under `ray job submit`), else a local instance.
            ray.init(address=opts.ray_address, configure_logging=False)
        summary = _run(out, spec, plan, sources, model, model_bytes, lease, opts, log)
    finally:
        lease.release()
        out.remove_empty_run_dir()
    out.remove(RUN_DIR, recursive=True)
    return summary


def _list_if_planning(out: OutputDir, input_uri: str, opts: SegmentOptions) -> list[str] | None:
    """INPUT's image URIs (pipeline.segment.inputs.list_inputs) when this run will plan anew: with
    --overwrite, or when OUTPUT holds neither a finished run nor a plan to resume. None
    otherwise: those runs list INPUT only when _plan needs it, as they always did.

    Raises what list_inputs raises (FileNotFoundError, ValueError, OSError naming INPUT).
    """
    if not opts.overwrite and (
        out.exists(MANIFEST_NAME) or (out.exists(SPEC_NAME) and out.exists(PLAN_NAME))
    ):
        return None
    return list_inputs(input_uri, opts.input_options)


def _plan(out, spec, input_uri, listed, opts, log) -> tuple[dict[str, Any], list[str], dict | None]:
    """(spec, plan, sources): read back on resume, else made from ``listed`` (INPUT's URIs,
    listed now when None) and written now.

    The plan holds each image's key: its URI redacted (pipeline.storage.redact),
    which is also the ``uri`` column, so that signed-URL parameters are never
    stored. ``sources`` maps key -> the URI to read when the two differ (None
    when no URI carried secrets); on resume it comes from listing INPUT again.
    """

    def listing() -> list[str]:
        return listed if listed is not None else list_inputs(input_uri, opts.input_options)

    old = out.read_json(SPEC_NAME)
    if old is not None and out.exists(PLAN_NAME):
        diffs = spec_mismatches(old, spec)
        if diffs:
            raise OutputStateError(
                f"OUTPUT {out.show()} holds an unfinished run with another "
                f"{'; '.join(diffs)}; re-run that command to finish it, or pass --overwrite"
            )
        plan = out.read_plan()
        sources = None
        if old.get("sources_redacted"):
            sources = _sources(listing())
            if set(sources) != set(plan):
                raise OutputStateError(
                    f"INPUT {redact(input_uri)} now lists other images than when the run in "
                    f"{out.show()} started; restore it, or pass --overwrite"
                )
        log(f"segment: resuming run {old['run_id']} in {out.show()} ({len(plan)} images planned)")
        return old, plan, sources
    if out.part_names():
        raise OutputStateError(
            f"OUTPUT {out.show()} holds part files but no run state; pass --overwrite to "
            "replace them"
        )
    sources = _sources(listing())
    plan = sorted(sources)
    out.write_plan(plan)
    redacted = any(key != uri for key, uri in sources.items())
    spec = {**spec, "images": len(plan), "sources_redacted": redacted}
    out.put_json(SPEC_NAME, spec)  # after the plan: a spec always has its plan
    return spec, plan, (sources if redacted else None)


def _sources(uris: list[str]) -> dict[str, str]:
    """key (redacted URI) -> URI; of URIs that differ only in secrets, the first is kept."""
    sources: dict[str, str] = {}
    for uri in uris:
        sources.setdefault(redact(uri), uri)
    return sources


def _run(out, spec, plan, sources, model, model_bytes, lease, opts, log) -> dict[str, Any]:
    names = out.part_names()
    uris_by_part, _ = out.read_part_uris_and_counts(names)
    done = {u for uris in uris_by_part.values() for u in uris}
    if not done <= set(plan):
        raise OutputStateError(
            f"OUTPUT {out.show()} holds parts with URIs outside its plan; pass --overwrite"
        )
    pending = [u for u in plan if u not in done]
    if done:
        log(f"segment: {len(done)} of {len(plan)} images already committed; {len(pending)} to go")
    started = time.monotonic()
    processed = {"rows": 0, "ok": 0, "error": 0, "instances": 0, "parts": 0}
    if pending:
        for record in _dataset(spec, pending, sources, model, model_bytes, opts, log).iter_rows():
            lease.check()  # never write a part after another run took OUTPUT over
            out.write_part(record["name"], record["data"])
            processed["parts"] += 1
            if processed["parts"] == 1:  # startup (actors, first batches) shows here
                processed["first_part_s"] = time.monotonic() - started
                processed["first_part_rows"] = int(record["rows"])
            for key in ("rows", "ok", "error", "instances"):
                processed[key] += int(record[key])
    elapsed = time.monotonic() - started
    processed["seconds"] = elapsed
    lease.check(read=True)
    versions = _versions()
    manifest = finalize(out, spec, plan, {"versions": versions, **opts.extra_manifest})
    rate = processed["rows"] / elapsed if elapsed > 0 and processed["rows"] else 0.0
    log(
        f"segment: {_counts_text(manifest['counts'])}; this run {processed['rows']} images "
        f"in {elapsed:.1f}s ({rate:.2f} images/s) -> {out.show(MANIFEST_NAME)}"
    )
    return {**manifest, "already_complete": False, "images_per_s": rate, "this_run": processed}


def _counts_text(counts: dict[str, int]) -> str:
    return (
        f"{counts['ok']} images ok, {counts['error']} with errors, {counts['instances']} instances"
    )


def _dataset(spec, pending, sources, model, model_bytes, opts, log):
    """The Ray Data pipeline over ``pending`` URIs; yields one record per Parquet part."""
    import pyarrow as pa
    import ray

    from pipeline.segment.stages import Segmenter, encode_rows, read_and_decode

    gpus, cpus, (min_actors, max_actors) = _resources(opts, log)
    cpus_total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Enough input blocks for every CPU to decode, small enough to stream.
    per_block = max(1, min(256, math.ceil(len(pending) / (4 * cpus_total))))
    blocks = []
    for i in range(0, len(pending), per_block):
        keys = pending[i : i + per_block]
        columns = {"uri": pa.array(keys, pa.string())}
        if sources is not None:  # read from the full URI, store the key
            columns["source"] = pa.array([sources[k] for k in keys], pa.string())
        blocks.append(pa.table(columns))
    model_ref = ray.put(model_bytes)
    cfg = model.cfg
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            read_and_decode,
            batch_size=max(1, min(opts.batch_size, per_block)),
            batch_format="pyarrow",
            fn_kwargs={
                "storage_options": opts.input_options,
                "cfg": cfg if opts.resize_on_cpu else None,
            },
            num_cpus=DECODE_CPUS,
            # Room for one large image; being unlike the actor's resources, this also
            # keeps Ray Data from fusing decode into the model actor, whose time is the
            # model's alone.
            memory=DECODE_TASK_MEMORY,
        )
        .map_batches(
            Segmenter,
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            batch_size=opts.batch_size,
            batch_format="pyarrow",
            num_gpus=gpus,
            num_cpus=cpus,
            fn_constructor_args=([model_ref],),
            fn_constructor_kwargs={
                "resized_on_cpu": opts.resize_on_cpu,
                "score_threshold": opts.score_threshold,
                "max_detections": opts.max_detections,
                "fast": opts.fast,
                "threads": int(cpus),
            },
        )
        .map_batches(
            encode_rows,
            batch_format="pyarrow",
            fn_kwargs={
                "class_names": cfg.label_names,
                "model_id": spec["model"],
                "mask_threshold": cfg.mask_threshold,
            },
            num_cpus=ENCODE_CPUS,
        )
        .map_batches(
            encode_part_batch,
            batch_size=opts.rows_per_part,
            batch_format="pyarrow",
            num_cpus=PART_CPUS,
        )
    )


def encode_part_batch(batch: Any) -> Any:
    """map_batches form of commit.encode_part: one Parquet part per batch, as a one-row table."""
    import pyarrow as pa

    return pa.Table.from_pylist([encode_part(batch)])
