"""Rows in the output schema, and the plan, spec and lock a first start writes: the
exactly-once building blocks' inputs, without Ray."""

from __future__ import annotations

import pyarrow as pa

from pipeline.output.schema import SCHEMA
from pipeline.segment.output import LOCK_NAME, SPEC_NAME, OutputDir
from pipeline.segment.plan import Plan, write_plan
from pipeline.segment.stages.write import write_parts


def rows(uris: list[str], errors: set[str] = frozenset(), instances: int = 2) -> pa.Table:
    inst = {
        "label": 1,
        "label_name": "square",
        "score": 0.9,
        "box": [1.0, 2.0, 3.0, 4.0],
        "mask_counts": "0b0",
        "area": 3,
    }
    records = [
        {
            "uri": u,
            "status": "error" if u in errors else "ok",
            "error": "decode: empty file" if u in errors else None,
            "width": None if u in errors else 8,
            "height": None if u in errors else 6,
            "instances": [] if u in errors else [inst] * instances,
            "model": "m1",
        }
        for u in uris
    ]
    return pa.Table.from_pylist(records, schema=SCHEMA)


SPEC = {
    "run_id": "r1",
    "model": "m1",
    "model_uri": "/models/m.safetensors",
    "config": {"num_classes": 2},
    "input": "/in",
    "options": {"score_threshold": None, "max_detections": None, "fast": False},
    "started": "2026-01-01T00:00:00+00:00",
    "seq": 1,
}


def planned(out: OutputDir, uris: list[str], rows_per_shard: int) -> Plan:
    """Write ``uris`` (sorted) as the plan and SPEC with it, as a first start does."""
    plan = write_plan(out, [uris], rows_per_shard)
    out.put_json(SPEC_NAME, {**SPEC, **plan.to_spec()})
    return plan


def shard_batch(uris: list[str], shard: int, size: int, **kw) -> pa.Table:
    """encode_rows' output for ``uris`` of shard ``shard`` (of ``size`` rows)."""
    table = rows(uris, **kw)
    n = table.num_rows
    table = table.append_column("shard", pa.array([shard] * n, pa.int64()))
    return table.append_column("shard_rows", pa.array([size] * n, pa.int64()))


def write_batch(out: OutputDir, batch: pa.Table, attempt: str = "a1") -> list:
    return write_parts(
        batch,
        output_uri=out.uri,
        output_options=out.options,
        attempt=attempt,
    ).to_pylist()


def take_lock(out: OutputDir, attempt: str = "a1") -> None:
    out.put_json(LOCK_NAME, {"run_id": "r1", "attempt": attempt, "host": "h"})
