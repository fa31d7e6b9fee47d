"""pipeline/segment/commit.py: the table commits exactly the plan's parts, or nothing is
committed; OUTPUT on S3 (output.py) writes atomically and clears a run's state."""

from __future__ import annotations

import pytest
from helpers.output_rows import SPEC, planned, rows, shard_batch, take_lock, write_batch

from pipeline.output.schema import read_manifest
from pipeline.output.table import APP_ID, has_table, load_table
from pipeline.segment.commit import encode_part, finalize
from pipeline.segment.output import PLAN_DIR, SPEC_NAME, OutputDir, shard_name
from pipeline.segment.plan import read_shard


def test_finalize_commits_exactly_the_parts(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(5)]
    plan = planned(out, uris, 2)
    take_lock(out)
    for shard in range(3):
        chunk = uris[2 * shard : 2 * shard + 2]
        write_batch(out, shard_batch(chunk, shard, len(chunk), errors={"/in/4.png"}))
    manifest = finalize(out, SPEC, plan, {"versions": {}})
    read = read_manifest(str(tmp_path / "out"))
    record = {k: v for k, v in manifest.items() if k not in ("files", "version")}
    assert {k: read[k] for k in record} == record
    assert sorted(read["files"]) == manifest["files"] == out.part_names()
    assert len(manifest["files"]) == 3
    assert manifest["counts"] == {"images": 5, "ok": 4, "error": 1, "instances": 8}
    assert load_table(out.uri).transaction_version(APP_ID) == SPEC["seq"]
    again = finalize(out, SPEC, plan, {"versions": {}})  # a re-run after the commit
    assert again["found"] and again["version"] == manifest["version"]
    assert load_table(out.uri).version() == read["version"]  # no second commit


@pytest.mark.parametrize(
    "extra, match",
    [
        ("missing", "1 of 3 parts are missing"),
        ("foreign", "1 part.s. are not of this run's plan .first: part-000003.parquet"),
        ("old-style", "not of this run's plan .first: part-0a1b2c3d4e5f60718293.parquet"),
        ("short", "part-000001.parquet holds 1 rows, its shard 2"),
    ],
)
def test_finalize_refuses_a_missing_foreign_or_short_part(tmp_path, extra, match):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(6)]
    plan = planned(out, uris, 2)
    take_lock(out)
    for shard in range(3):
        if extra == "missing" and shard == 2:
            continue
        chunk = uris[2 * shard : 2 * shard + 2]
        if extra == "short" and shard == 1:
            chunk = chunk[:1]
        write_batch(out, shard_batch(chunk, shard, len(chunk)))
    if extra in ("foreign", "old-style"):
        data, _ = encode_part(rows(["/in/9.png"]))
        name = "part-000003.parquet" if extra == "foreign" else "part-0a1b2c3d4e5f60718293.parquet"
        out.put_bytes(name, data)
    with pytest.raises(RuntimeError, match=match):
        finalize(out, SPEC, plan, {})
    assert not has_table(out.uri) and out.exists(SPEC_NAME)


def test_s3_output_atomic_writes_commit_and_clear(s3_server, s3_bucket):
    out = OutputDir(f"s3://{s3_bucket}/out", s3_server["storage_options"])
    uris = ["s3://b/in/0.png", "s3://b/in/1.png", "s3://b/in/2.png"]
    plan = planned(out, uris, 2)
    take_lock(out)
    write_batch(out, shard_batch(uris[:2], 0, 2))
    write_batch(out, shard_batch(uris[2:], 1, 1))
    assert read_shard(out.fs, out.path(shard_name(1))) == uris[2:]
    finalize(out, SPEC, plan, {})
    assert (
        sorted(read_manifest(out.uri, out.options)["files"])
        == out.part_names()
        == [
            "part-000000.parquet",
            "part-000001.parquet",
        ]
    )
    out.clear_run_state()
    assert not out.exists(SPEC_NAME) and not out.fs.exists(out.path(PLAN_DIR))
    assert read_manifest(out.uri, out.options)["counts"]["images"] == 3  # committed stays
