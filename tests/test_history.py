"""A table OUTPUT's versions: `maskrcnn history`, `--version` / `--as-of` on the readers,
the folder format still read, and the same rows through pyarrow, deltalake, Polars and DuckDB."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from helpers import outputs_fixture as outputs
from helpers.cli import run_cli as maskrcnn

from pipeline.output.results import open_results
from pipeline.output.schema import committed_files

H, W = 32, 40
SQUARE = outputs.rect_mask(H, W, 2, 3, 12, 15)


def first_run() -> list[dict]:
    """Run 1: a (one detection), b (none), c (none), d (an error row). The second part
    has no detection at all: its statistics must still see the model column."""
    return [
        outputs.ok_row("s3://in/a.jpg", W, H, [outputs.instance(1, "square", 0.9, SQUARE)]),
        outputs.ok_row("s3://in/b.jpg", W, H, []),
        outputs.ok_row("s3://in/c.jpg", W, H, []),
        outputs.error_row("s3://in/d.jpg", "decode: image file is truncated"),
    ]


def second_run() -> list[dict]:
    """Run 2 redoes the part holding c and d: c again (now 0.6), d gone, e new."""
    return [
        outputs.ok_row("s3://in/c.jpg", W, H, [outputs.instance(1, "square", 0.6, SQUARE)]),
        outputs.ok_row("s3://in/e.jpg", W, H, [outputs.instance(1, "square", 0.8, SQUARE)]),
    ]


@pytest.fixture
def table(tmp_path):
    """Versions 0 (run 1), 1 (the table properties) and 2 (run 2, which removes the part
    holding c and d and adds one holding c and e)."""
    out = str(tmp_path / "table")
    assert outputs.write_table_output(out, first_run(), rows_per_file=2) == 0
    removes = ["run-000001/part-000001.parquet"]
    assert (
        outputs.write_table_output(out, second_run(), run_id="run-2", seq=2, removes=removes) == 2
    )
    return out


def history(output: str) -> list[dict]:
    proc = maskrcnn("history", output, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def query(output: str, *flags: str) -> dict[str, float | None]:
    """uri -> the best score of its image (None for no detection or an error row)."""
    sql = "SELECT uri, instances[1].score AS score FROM images ORDER BY uri"
    proc = maskrcnn("query", output, sql, "--format", "json", *flags)
    assert proc.returncode == 0, proc.stderr
    return {r["uri"].removeprefix("s3://in/"): r["score"] for r in json.loads(proc.stdout)}


def one_line_error(proc, command: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskrcnn {command}: error:"), proc.stderr
    return lines[0]


def test_history_lists_every_commit_newest_first(table):
    commits = history(table)
    assert [c["version"] for c in commits] == [2, 1, 0]
    assert [c["operation"] for c in commits] == ["segment", "SET TBLPROPERTIES", "segment"]
    assert [c["run_id"] for c in commits] == ["run-2", None, "test-run-1"]
    changes = [[c[k] for k in ("added", "replaced", "removed", "errors")] for c in commits]
    assert changes == [[1, 1, 1, 0], [None] * 4, [4, 0, 0, 1]]
    assert commits[0]["model"] == commits[2]["model"] == outputs.MODEL_ID
    times = [c["time"] for c in commits]
    assert all(t.endswith("Z") and "T" in t for t in times) and times == sorted(times, reverse=True)

    proc = maskrcnn("history", table)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "version", "time", "operation", "run_id", "model", "added", "replaced", "removed",
        "errors",
    ]  # fmt: skip
    body = [[c.strip() for c in line.split("|")] for line in lines[2:5]]
    assert body[0] == ["2", times[0], "segment", "run-2", outputs.MODEL_ID, "1", "1", "1", "0"]
    assert body[1][:3] == ["1", times[1], "SET TBLPROPERTIES"] and not any(body[1][3:])
    assert body[2][0] == "0" and body[2][5:] == ["4", "0", "0", "1"]


def test_history_of_a_folder_output_is_one_line(tmp_path):
    out = str(tmp_path / "folder")
    outputs.write_output(out, first_run())
    commits = history(out)
    assert len(commits) == 1
    assert commits[0]["version"] is None and commits[0]["operation"] == "folder format"
    assert (commits[0]["added"], commits[0]["errors"]) == (4, 1)
    table = maskrcnn("history", out).stdout.splitlines()
    assert table[2].split("|")[0].strip() == "-" and "folder format" in table[2]

    unfinished = str(tmp_path / "unfinished")
    outputs.write_output(unfinished, first_run(), commit=False)
    assert "did not finish" in one_line_error(maskrcnn("history", unfinished), "history")


def test_query_reads_the_latest_version_unless_asked(table):
    latest = {"a.jpg": pytest.approx(0.9), "b.jpg": None, "c.jpg": pytest.approx(0.6)}
    latest["e.jpg"] = pytest.approx(0.8)
    first = {"a.jpg": pytest.approx(0.9), "b.jpg": None, "c.jpg": None, "d.jpg": None}
    assert query(table) == latest
    assert query(table, "--version", "2") == latest
    assert query(table, "--version", "0") == first
    assert query(table, "--version", "1") == first  # the properties' commit changes no row

    missing = one_line_error(maskrcnn("query", table, "SELECT 1", "--version", "3"), "query")
    assert "has no version 3" in missing and "its versions: 0 to 2" in missing
    both = maskrcnn("query", table, "SELECT 1", "--version", "0", "--as-of", "2026-01-01")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_as_of_reads_the_version_current_at_that_time(table):
    times = {c["version"]: c["time"] for c in history(table)}
    assert times[0] < times[2]  # three commits, milliseconds apart at least
    assert query(table, "--as-of", times[0]) == query(table, "--version", "0")
    assert query(table, "--as-of", times[2])["c.jpg"] == pytest.approx(0.6)
    assert query(table, "--as-of", "2999-01-01T00:00:00+02:00")["c.jpg"] == pytest.approx(0.6)

    before = one_line_error(
        maskrcnn("query", table, "SELECT 1", "--as-of", "2000-01-01T00:00:00Z"), "query"
    )
    assert "has no version at 2000-01-01T00:00:00.000Z" in before
    assert f"its first commit is at {times[0]}" in before
    bad = maskrcnn("query", table, "SELECT 1", "--as-of", "last tuesday")
    assert bad.returncode == 2 and "expected an ISO 8601 time" in bad.stderr


def test_a_folder_output_still_reads_and_refuses_versions(tmp_path):
    out = str(tmp_path / "folder")
    outputs.write_output(out, first_run())
    assert query(out) == {"a.jpg": pytest.approx(0.9), "b.jpg": None, "c.jpg": None, "d.jpg": None}
    for flags in (["--version", "0"], ["--as-of", "2026-01-01"]):
        line = one_line_error(maskrcnn("query", out, "SELECT 1", *flags), "query")
        assert "folder-format OUTPUT" in line and "--version/--as-of" in line


def rows_by_uri(rows: list[dict]) -> list[dict]:
    """Rows in uri order, every value as plain Python (a box is a list of 4 floats)."""
    return sorted(
        ({k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows),
        key=lambda r: r["uri"],
    )


def engine_rows(output: str, version: int | None) -> dict[str, list[dict]]:
    """The table's rows at ``version`` (None: the latest) as each engine reads them."""
    import polars as pl

    by_pyarrow = pa.concat_tables(
        [pq.read_table(f) for f in committed_files(output, version=version)]
    )
    con = open_results(output, version=version).connect()
    by_deltalake = DeltaTable(output, version=version).to_pyarrow_table()
    return {
        "pyarrow": rows_by_uri(by_pyarrow.to_pylist()),
        "deltalake": rows_by_uri(by_deltalake.to_pylist()),
        "polars": rows_by_uri(pl.read_delta(output, version=version).to_dicts()),
        "duckdb": rows_by_uri(con.sql("SELECT * FROM images").to_arrow_table().to_pylist()),
    }


@pytest.mark.parametrize("version", [None, 0])
def test_every_engine_reads_the_same_rows(table, version):
    expected = rows_by_uri(first_run() if version == 0 else first_run()[:2] + second_run())
    for row in expected:  # float32 on disk
        for inst in row["instances"] or []:
            inst["score"] = pytest.approx(inst["score"])
    for engine, rows in engine_rows(table, version).items():
        assert [r["uri"] for r in rows] == [r["uri"] for r in expected], engine
        assert rows == expected, engine
