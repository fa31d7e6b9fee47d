"""pipeline/segment/plan.py: the plan in shard files of sorted, unique keys."""

from __future__ import annotations

import pytest

from pipeline.segment.output import PLAN_DIR, OutputDir, shard_name
from pipeline.segment.plan import (
    Plan,
    SecretsInInput,
    is_plain,
    plan_digest,
    read_shard,
    write_plan,
)
from pipeline.storage import redact


def test_plan_is_shard_files_of_sorted_unique_keys(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    uris = [f"/in/{i:03d}.png" for i in range(23)]
    # Chunks of any size, as a listing yields them.
    plan = write_plan(out, [uris[:3], [], uris[3:17], uris[17:]], 5)
    assert (plan.images, plan.rows_per_shard, plan.shards) == (23, 5, 5)
    assert [plan.rows(i) for i in range(5)] == [5, 5, 5, 5, 3]
    assert plan.digest == plan_digest([uris])
    names = sorted(p.name for p in (tmp_path / "out" / PLAN_DIR).iterdir())
    assert names == [f"shard-{i:06d}.txt" for i in range(5)]
    shards = [read_shard(out.fs, out.path(shard_name(i))) for i in range(5)]
    assert [u for shard in shards for u in shard] == uris
    assert Plan.from_spec(plan.to_spec()) == plan
    assert plan.shard_of_part("part-000004.parquet") == 4
    for foreign in ("part-000005.parquet", "part-4.parquet", "part-0123abcd.parquet", "x"):
        assert plan.shard_of_part(foreign) is None


@pytest.mark.parametrize(
    "chunks, match",
    [
        ([["/in/a.png", "/in/b.png"], ["/in/b.png"]], "comes twice"),
        ([["/in/b.png", "/in/a.png"]], "out of order"),
        ([["/in/a.png", "/in/c.png"], ["/in/b.png"]], "out of order"),
    ],
)
def test_plan_refuses_keys_that_would_overlap_shards(tmp_path, chunks, match):
    with pytest.raises(ValueError, match=match):
        write_plan(OutputDir(str(tmp_path / "out")), chunks, 1)


def test_plan_of_urls_with_secrets_is_made_from_keys(tmp_path):
    signed = "https://h.example/img/a.jpg?X-Amz-Signature=abc"
    with pytest.raises(SecretsInInput):
        write_plan(OutputDir(str(tmp_path / "out")), [["https://h.example/img/0.jpg", signed]], 1)
    for uri in (
        "/local/a.png",
        "s3://bucket/a/b.png",
        "s3://Bucket/a.png",
        "https://user:pw@h/a.png",
        "https://h/a.png#frag",
        "gs://b/a%20b.png",
        "https://h:8080/a.png",
        signed,
    ):
        assert is_plain(uri) == (redact(uri) == uri), uri
