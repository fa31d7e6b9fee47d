"""pipeline/segment/diff.py: a grown INPUT against the table, range by range, in threads."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers.outputs_fixture import error_row, ok_row, write_table_output

import pipeline.segment.diff as diff_module
from pipeline.output.table import load_table
from pipeline.segment.diff import compare, new_keys
from pipeline.segment.output import LISTING_DIR, OutputDir
from pipeline.segment.plan import write_plan


def _never_ray():
    raise AssertionError("a small listing is compared without Ray")


@pytest.mark.parametrize("prune, retry", [(False, False), (True, True)])
def test_new_gone_and_error_keys_over_several_ranges(tmp_path, monkeypatch, prune, retry):
    monkeypatch.setattr(diff_module, "RANGE_SHARDS", 2)  # 5 listing shards: 3 ranges
    output = str(tmp_path / "out")
    table_rows = [ok_row(f"/in/{k}.png", 8, 8, []) for k in ("a", "c", "e", "g", "x")]
    table_rows.append(error_row("/in/f.png", "read: truncated"))
    write_table_output(output, table_rows, rows_per_file=2)  # files span ranges
    listed = [f"/in/{k}.png" for k in "abcdefghij"]  # x is gone; b, d, h, i, j are new
    out = OutputDir(output, None, "run-000002")
    listing = write_plan(out, [listed], 2, folder=LISTING_DIR)
    version = load_table(output).version()

    diff = compare(out, listing, version, (prune, retry), _never_ray)

    keys = [k for chunk in new_keys(out) for k in chunk]
    assert keys == sorted(
        ["/in/b.png", "/in/d.png", "/in/h.png", "/in/i.png", "/in/j.png"]
        + (["/in/f.png"] if retry else [])
    )
    assert (diff.new, diff.gone) == (5, 1)
    assert (diff.retry, diff.pruned) == ((1, 1) if retry else (0, 0))
    if not (prune or retry):
        assert diff.replaces == ()
        return
    # The files holding x (gone) and f (an error to retry) are written again without them.
    changed = {c["remove"]["path"]: c for c in diff.replaces}
    kept = set()
    for change in changed.values():
        if change["add"]:
            kept |= set(
                pq.read_table(tmp_path / "out" / change["add"]["path"]).column("uri").to_pylist()
            )
    removed = sum(c["removed"]["rows"] for c in changed.values())
    assert removed == 2 and not kept & {"/in/x.png", "/in/f.png"}
    assert all(
        c["add"] is None or c["add"]["path"].startswith("run-000002/kept-")
        for c in changed.values()
    )
