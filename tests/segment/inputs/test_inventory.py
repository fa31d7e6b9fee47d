"""pipeline/segment/inputs/inventory.py: an S3 Inventory report as INPUT."""

from __future__ import annotations

import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.inventory_report import csv_gz, manifest

from pipeline.segment.inputs.listing import iter_input_chunks, list_inputs

# --- S3 Inventory reports --------------------------------------------------------------
# (key as S3 writes it in CSV: URL-encoded, is_latest, is_delete_marker) per data file.
CSV_ROWS = [
    [
        ("imgs/b.jpg", "true", "false"),
        ("imgs/with%20space%20%C3%A9t%C3%A9.png", "true", "false"),  # "with space été.png"
        ("imgs/plus+sign.JPG", "true", "false"),  # "+" is a space
        ("imgs/notes.txt", "true", "false"),
        ("imgs/deleted.jpg", "true", "true"),  # a delete marker
        ("imgs/old.jpg", "false", "false"),  # a noncurrent version
    ],
    [("imgs/a.jpg", "true", "false"), ("imgs/b.jpg", "true", "false")],  # b again, a first
]


INVENTORY_URIS = [
    "s3://photos-src/imgs/a.jpg",
    "s3://photos-src/imgs/b.jpg",
    "s3://photos-src/imgs/plus sign.JPG",
    "s3://photos-src/imgs/with space été.png",
]


def test_s3_inventory_csv_manifest_as_input(s3_server, s3_bucket, ray_local):
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    report = "inv/photos-src/daily"
    keys = [f"{report}/data/part-{i}.csv.gz" for i in range(len(CSV_ROWS))]
    for key, rows in zip(keys, CSV_ROWS):
        fs.pipe(f"{s3_bucket}/{key}", csv_gz(rows))
    uri = f"s3://{s3_bucket}/{report}/2024-01-01T00-00Z/manifest.json"
    fs.pipe(uri, manifest("CSV", keys))
    assert list_inputs(uri, s3_server["storage_options"]) == INVENTORY_URIS
    # Past sort_run URIs the sort spills runs to disk; the result is the same.
    chunks = list(iter_input_chunks(uri, s3_server["storage_options"], chunk=3, sort_run=2))
    assert chunks == [INVENTORY_URIS[:3], INVENTORY_URIS[3:]]


def test_s3_inventory_parquet_manifest_local_copy(tmp_path):
    dest = tmp_path / "dest"
    report = "inv/photos-src/weekly"
    tables = [
        {"key": ["imgs/b.jpg", "imgs/c d.PNG", "imgs/x.json", "imgs/gone.jpg", "imgs/v0.jpg"],
         "is_latest": [True, True, True, True, False],
         "is_delete_marker": [False, False, False, True, False]},
        {"key": ["imgs/a.jpg", "imgs/b.jpg", None], "is_latest": [True, True, True],
         "is_delete_marker": [False, False, False]},
    ]  # fmt: skip
    keys = []
    for i, columns in enumerate(tables):
        keys.append(f"{report}/data/{i}.parquet")
        (dest / keys[-1]).parent.mkdir(parents=True, exist_ok=True)
        n = len(columns["key"])
        table = pa.table({"bucket": ["photos-src"] * n, **columns, "size": [1] * n})
        pq.write_table(table, dest / keys[-1], row_group_size=2)
    path = dest / report / "2024-01-07T00-00Z" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest("Parquet", keys, schema="message s3.inventory { ... }"))
    assert list_inputs(str(path)) == [
        "s3://photos-src/imgs/a.jpg",
        "s3://photos-src/imgs/b.jpg",
        "s3://photos-src/imgs/c d.PNG",
    ]


@pytest.mark.parametrize(
    "content, error",
    [
        (b"{not json", r"not an S3 Inventory manifest \(invalid JSON: "),
        (b'{"sourceBucket": "s", "files": []}', r"not an S3 Inventory manifest \(no fileFormat\)"),
        (manifest("ORC", ["d/1.orc"]), "ORC inventory reports are not supported"),
        (manifest("Avro", ["d/1.avro"]), "unknown fileFormat 'Avro' \\(CSV or Parquet\\)"),
        (manifest("CSV", ["d/1.csv.gz"], schema="Bucket, Size"), "fileSchema names no Key column"),
        (b'{"sourceBucket": "s", "fileFormat": "CSV", "files": [{"size": 1}]}', r"files\[0\] has no key"),
        (manifest("CSV", ["d/missing.csv.gz"]), "data file d/missing.csv.gz is in no folder above"),
    ],
    ids=["json", "fields", "orc", "format", "schema", "files", "data-root"],
)  # fmt: skip
def test_malformed_inventory_manifest_one_line_error(tmp_path, content, error):
    path = tmp_path / "inv" / "manifest.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        list_inputs(str(path))
    message = str(caught.value)
    assert message.startswith(f"INPUT {path}") and "\n" not in message, message
    assert re.search(error, message), message


def test_inventory_data_file_missing_or_corrupt_names_input(s3_server, s3_bucket):
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    fs.pipe(f"{s3_bucket}/d/ok.csv.gz", csv_gz(CSV_ROWS[1]))
    fs.pipe(f"{s3_bucket}/d/bad.csv.gz", b"not gzip")
    for name, keys, error in [
        ("gone", ["d/ok.csv.gz", "d/gone.csv.gz"], f"data file s3://{s3_bucket}/d/gone.csv.gz is missing"),
        ("bad", ["d/bad.csv.gz"], f"data file s3://{s3_bucket}/d/bad.csv.gz is not gzip-compressed CSV"),
    ]:  # fmt: skip
        uri = f"s3://{s3_bucket}/{name}/manifest.json"
        fs.pipe(uri, manifest("CSV", keys))
        with pytest.raises(
            (FileNotFoundError, ValueError), match=f"^INPUT {uri}: inventory {error}"
        ):
            list_inputs(uri, s3_server["storage_options"])
    with pytest.raises(
        FileNotFoundError, match=f"INPUT s3://{s3_bucket}/none/manifest.json: no such file"
    ):
        list_inputs(f"s3://{s3_bucket}/none/manifest.json", s3_server["storage_options"])
