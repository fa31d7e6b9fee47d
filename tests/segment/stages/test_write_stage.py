"""pipeline/segment/stages/write.py: parts and pieces written by tasks, joined by one,
byte for byte a function of their rows; nothing written once the lease is lost."""

from __future__ import annotations

import pyarrow as pa
from helpers.output_rows import SPEC, planned, rows, shard_batch, take_lock, write_batch

from pipeline.segment.commit import Counts, encode_part, finalize, read_part
from pipeline.segment.output import OutputDir, part_name, piece_dir
from pipeline.segment.stages.write import ShardRecord, assemble_part


def test_part_bytes_are_a_function_of_the_rows_only(tmp_path):
    a = ["/in/a.png", "/in/b.png", "/in/c.png"]
    data, counts = encode_part(rows(a, errors={"/in/c.png"}))
    # Another order, and a row twice (a retried batch): the same bytes.
    again, _ = encode_part(rows(a[::-1] + a[:1], errors={"/in/c.png"}))
    assert again == data
    assert counts == Counts(rows=3, ok=2, error=1, instances=4)
    out = OutputDir(str(tmp_path / "out"))
    out.put_bytes("part-000000.parquet", data)
    assert read_part(out, "part-000000.parquet")[0] == counts


def test_a_whole_shard_is_its_part_and_a_split_one_is_joined_to_the_same_bytes(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(6)]
    plan = planned(out, uris, 3)
    take_lock(out)
    # Shard 0 whole in one batch; shard 1 split over two batches, one row in both (the
    # same rows twice: a duplicated task).
    records = write_batch(
        out, pa.concat_tables([shard_batch(uris[:3], 0, 3), shard_batch(uris[3:4], 1, 3)])
    )
    records += write_batch(out, shard_batch(uris[3:6], 1, 3, errors={"/in/5.png"})[1:])
    assert [(r["shard"], r["rows"], r["whole"]) for r in records] == [
        (0, 3, True),
        (1, 1, False),
        (1, 2, False),
    ]
    assert out.part_names() == ["part-000000.parquet"]
    assert len(list((tmp_path / "out" / piece_dir(1)).iterdir())) == 2
    joined = assemble_part(out.uri, None, "a1", 1, 3)
    assert joined == ShardRecord(1, Counts(rows=3, ok=2, error=1, instances=4), whole=True)
    assert not (tmp_path / "out" / piece_dir(1)).exists()
    whole, _ = encode_part(shard_batch(uris[3:6], 1, 3, errors={"/in/5.png"}))
    assert (tmp_path / "out" / part_name(1)).read_bytes() == whole
    # The same shard written again, whole (a duplicated task): the same object, once.
    write_batch(out, shard_batch(uris[3:6], 1, 3, errors={"/in/5.png"}))
    assert (tmp_path / "out" / part_name(1)).read_bytes() == whole
    manifest = finalize(out, {**SPEC, **plan.to_spec()}, plan, {})
    assert manifest["files"] == ["part-000000.parquet", "part-000001.parquet"]
    assert manifest["counts"] == {"images": 6, "ok": 5, "error": 1, "instances": 10}


def test_assembly_writes_nothing_while_rows_are_missing(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(3)]
    planned(out, uris, 3)
    take_lock(out)
    write_batch(out, shard_batch(uris[:2], 0, 3))
    assert assemble_part(out.uri, None, "a1", 0, 3).missing == 1
    assert out.part_names() == []


def test_a_task_of_a_run_that_lost_the_lease_writes_nothing(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i}.png" for i in range(4)]
    planned(out, uris, 2)
    take_lock(out, attempt="intruder")
    records = write_batch(
        out, pa.concat_tables([shard_batch(uris[:2], 0, 2), shard_batch(uris[2:3], 1, 2)])
    )
    assert {r["lost"] for r in records} == {"run r1 (host h) took over"}
    assert assemble_part(out.uri, None, "a1", 1, 2).lost == "run r1 (host h) took over"
    assert out.part_names() == [] and not (tmp_path / "out" / piece_dir(1)).exists()
