"""`maskrcnn query` and pipeline.output.results: views over a committed OUTPUT, read-only DuckDB."""

from __future__ import annotations

import csv
import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import outputs_fixture as outputs
from helpers.cli import run_cli as maskrcnn
from pycocotools import mask as mask_utils

from pipeline.output.results import open_results
from pipeline.output.schema import SCHEMA, IncompleteOutputError

H, W = 48, 64


def fixture_rows() -> list[dict]:
    """Three ok images (2, 0 and 1 detections) and one error row, with known masks."""
    sq = outputs.rect_mask(H, W, 4, 6, 20, 30)
    disc = outputs.disc_mask(H, W, 40, 20, 8)
    big = outputs.rect_mask(H, W, 10, 10, 60, 40)
    return [
        outputs.ok_row(
            "s3://in/a/cat.jpg",
            W,
            H,
            [outputs.instance(1, "square", 0.9, sq), outputs.instance(2, "circle", 0.75, disc)],
        ),
        outputs.ok_row("s3://in/a/empty.jpg", W, H, []),
        outputs.ok_row("s3://in/b/dog.png", W, H, [outputs.instance(1, "square", 0.5, big)]),
        outputs.error_row("s3://in/b/broken.jpg", "decode: image file is truncated"),
    ]


@pytest.fixture(params=["table", "folder"])
def output(tmp_path, request):
    """The fixture rows committed to a Delta table, and in the previous folder format."""
    out = tmp_path / "out"
    write = outputs.write_table_output if request.param == "table" else outputs.write_output
    write(str(out), fixture_rows(), rows_per_file=2)
    return out


def test_views_hold_every_row_and_flatten_instances(output):
    con = open_results(str(output)).connect()
    assert con.sql("SELECT count(*) FROM images").fetchall()[0][0] == 4
    assert con.sql("SELECT uri, error FROM images WHERE status = 'error'").fetchall() == [
        ("s3://in/b/broken.jpg", "decode: image file is truncated")
    ]
    rows = con.sql(
        "SELECT uri, width, height, detection, label, label_name, score, x1, y1, x2, y2, area "
        "FROM instances ORDER BY uri, detection"
    ).fetchall()
    assert [(r[0], r[3], r[5]) for r in rows] == [
        ("s3://in/a/cat.jpg", 0, "square"),
        ("s3://in/a/cat.jpg", 1, "circle"),
        ("s3://in/b/dog.png", 0, "square"),
    ]
    cat_square = rows[0]
    assert cat_square[1:3] == (W, H)
    assert cat_square[6] == pytest.approx(0.9)
    assert cat_square[7:11] == (4.0, 6.0, 20.0, 30.0)
    assert cat_square[11] == 16 * 24
    # The box column and x1..y2 agree; counts decode to the mask that was written.
    box, counts, h, w = con.sql(
        "SELECT box, mask_counts, height, width FROM instances WHERE label_name = 'circle'"
    ).fetchall()[0]
    assert list(box) == [32.0, 12.0, 49.0, 29.0]
    decoded = mask_utils.decode({"size": [h, w], "counts": counts.encode()}).astype(bool)
    assert np.array_equal(decoded, outputs.disc_mask(H, W, 40, 20, 8))


def test_only_manifest_files_are_read(output):
    # A part file left by a killed run, not in the manifest, must stay invisible.
    stray = pa.Table.from_pylist([outputs.ok_row("s3://in/stray.jpg", W, H, [])] * 3, schema=SCHEMA)
    pq.write_table(stray, output / "part-99999.parquet")
    results = open_results(str(output))
    assert results.num_rows() == 4
    con = results.connect()
    assert con.sql("SELECT count(*) FROM images WHERE uri LIKE '%stray%'").fetchall()[0][0] == 0


def test_uncommitted_output_is_refused(tmp_path):
    out = tmp_path / "out"
    outputs.write_output(str(out), fixture_rows(), commit=False)
    with pytest.raises(IncompleteOutputError, match="did not finish"):
        open_results(str(out))
    proc = maskrcnn("query", str(out), "SELECT 1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskrcnn query: error:")
    assert "did not finish" in lines[0] and "Traceback" not in proc.stderr


def test_s3_output(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/out"
    outputs.write_output(uri, fixture_rows(), options=s3_server["storage_options"], rows_per_file=2)
    con = open_results(uri, s3_server["storage_options"]).connect()
    assert con.sql("SELECT count(*) FROM instances").fetchall()[0][0] == 3
    # The CLI reaches the endpoint through AWS_ENDPOINT_URL (set by the fixture).
    proc = maskrcnn(
        "query",
        uri,
        "SELECT label_name, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"label_name": "circle", "n": 1},
        {"label_name": "square", "n": 2},
    ]


def test_formats(output):
    sql = "SELECT uri, detection, score, box, mask_counts FROM instances ORDER BY uri, detection"
    as_csv = maskrcnn("query", str(output), sql, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    records = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["uri"] for r in records] == ["s3://in/a/cat.jpg"] * 2 + ["s3://in/b/dog.png"]
    assert json.loads(records[0]["box"]) == [4.0, 6.0, 20.0, 30.0]
    assert float(records[1]["score"]) == pytest.approx(0.75)

    as_jsonl = maskrcnn("query", str(output), sql, "--format", "jsonl")
    objs = [json.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert [o["detection"] for o in objs] == [0, 1, 0]
    # Full values in machine formats: the counts are not cut.
    assert objs[2]["mask_counts"] == records[2]["mask_counts"]

    table = maskrcnn("query", str(output), sql)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split("|")[0].strip() == "uri"
    assert set(lines[1]) <= {"-", "+"}
    assert lines[-1] == "(3 rows)"
    body = lines[2:-1]
    assert len(body) == 3 and body[0].startswith("s3://in/a/cat.jpg")
    # Long cells are cut to a readable width with an ellipsis.
    longest = max(len(r["mask_counts"]) for r in records)
    assert longest > 40
    assert all(len(cell.strip()) <= 40 for line in body for cell in line.split("|"))
    assert any("…" in line for line in body)

    capped = maskrcnn("query", str(output), "SELECT * FROM range(50)", "--max-rows", "5")
    assert capped.stdout.splitlines()[-1].startswith("(5 rows, more not shown")


FORBIDDEN = [
    ("COPY (SELECT * FROM images) TO '{target}'", "target"),
    ("COPY images TO '{target}' (FORMAT parquet)", "target"),
    ("EXPORT DATABASE '{target}'", "target"),
    ("ATTACH '{target}' AS other", "target"),
    ("SELECT * FROM read_csv('/etc/passwd')", None),
    ("SELECT content FROM read_text('/etc/passwd')", None),
    ("SELECT * FROM glob('/etc/*')", None),
    ("SELECT * FROM read_parquet('{other}')", None),
    ("SELECT * FROM '{other}'", None),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
    ("SET enable_external_access = true", None),
    ("RESET enable_external_access", None),
    ("SET lock_configuration = false", None),
    ("SET memory_limit = '1GB'", None),
    ("PRAGMA enable_profiling", None),
]


@pytest.mark.parametrize(
    "sql,writes", FORBIDDEN, ids=[f[0].split()[0] + str(i) for i, f in enumerate(FORBIDDEN)]
)
def test_forbidden_operations_are_refused(output, tmp_path, sql, writes):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), other)
    target = tmp_path / "written"
    con = open_results(str(output)).connect()
    # Refused by the lock-down itself, not by some other failure (no network, no such file).
    with pytest.raises(duckdb.Error, match="Permission Error|disabled|has been locked"):
        con.sql(sql.format(target=target, other=other)).fetchall()
    assert not target.exists()
    # The connection still works for reading after the refusal.
    assert con.sql("SELECT count(*) FROM images").fetchall()[0][0] == 4


def test_python_variables_are_not_scannable(output):
    secret_table = pa.table({"secret": ["s3cr3t"]})  # noqa: F841 (what a replacement scan would find)
    con = open_results(str(output)).connect()
    with pytest.raises(duckdb.CatalogException):
        con.sql("SELECT * FROM secret_table").fetchall()


def test_cli_refusals_are_one_line_exit_2(output, tmp_path):
    target = tmp_path / "leak.csv"
    proc = maskrcnn("query", str(output), f"COPY (SELECT * FROM images) TO '{target}'")
    assert proc.returncode == 2
    assert not target.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Permission Error" in lines[0] and "read-only" in lines[0]

    bad = maskrcnn("query", str(output), "SELEC * FROM images")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        'maskrcnn query: error: query failed: Parser Error: syntax error at or near "SELEC"'
    ]
    passwd = maskrcnn("query", str(output), "SELECT * FROM read_csv('/etc/passwd')")
    assert passwd.returncode == 2 and "root" not in passwd.stdout + passwd.stderr
