"""Listing INPUT: prefixes by image extension, URI lists, clear errors."""

from __future__ import annotations

import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.inventory_report import csv_gz, manifest

from pipeline.segment.inputs.listing import iter_input_chunks, list_inputs
from pipeline.segment.inputs.prefix import iter_prefix, split_prefix

IMAGES = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.TIF", "e.tiff", "f.bmp", "g.WebP", "h.gif"]
OTHERS = ["notes.txt", "sub/data.json", "x.jpg.bak", "Makefile", "sub/deeper/y.parquet"]


def make_tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_local_prefix_recursive_by_extension(tmp_path):
    make_tree(tmp_path, IMAGES + OTHERS)
    uris = list_inputs(str(tmp_path))
    assert uris == sorted(str(tmp_path / n) for n in IMAGES)


def test_relative_local_prefix_gives_absolute_uris(tmp_path, monkeypatch):
    make_tree(tmp_path / "imgs", ["one.jpg"])
    monkeypatch.chdir(tmp_path)
    assert list_inputs("imgs") == [str(tmp_path / "imgs" / "one.jpg")]
    assert list_inputs("imgs/one.jpg") == [str(tmp_path / "imgs" / "one.jpg")]


def test_txt_list_sorted_unique_relative_and_comments(tmp_path):
    (tmp_path / "list.txt").write_text(
        "# images to segment\ns3://bucket/z.jpg\n\npics/a.png\n/abs/b.jpg\ns3://bucket/z.jpg\n"
    )
    assert list_inputs(str(tmp_path / "list.txt")) == [
        "/abs/b.jpg",
        str(tmp_path / "pics" / "a.png"),
        "s3://bucket/z.jpg",
    ]


def test_parquet_list(tmp_path):
    pq.write_table(
        pa.table({"uri": ["s3://b/2.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]}), tmp_path / "l.parquet"
    )
    assert list_inputs(str(tmp_path / "l.parquet")) == ["s3://b/1.jpg", "s3://b/2.jpg"]


def test_parquet_without_uri_column(tmp_path):
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match=r"l\.parquet has no `uri` column \(columns: path\)"):
        list_inputs(str(tmp_path / "l.parquet"))


def test_missing_prefix_names_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="INPUT .*nowhere: no such folder or prefix"):
        list_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="INPUT .*gone.txt: no such file"):
        list_inputs(str(tmp_path / "gone.txt"))


def test_prefix_without_images_names_input(tmp_path):
    make_tree(tmp_path, OTHERS)
    with pytest.raises(ValueError, match=f"INPUT {tmp_path} holds no image"):
        list_inputs(str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt lists no URI"):
        list_inputs(str(tmp_path / "empty.txt"))


def test_single_non_image_file_is_refused(tmp_path):
    make_tree(tmp_path, ["data.json"])
    with pytest.raises(ValueError, match="neither an image"):
        list_inputs(str(tmp_path / "data.json"))


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    for name in ["p/q/1.png", "p/2.JPG", "p/readme.md"]:
        fs.pipe(f"/inputs-test/{name}", b"x")
    assert list_inputs("memory://inputs-test/p") == [
        "memory:///inputs-test/p/2.JPG",
        "memory:///inputs-test/p/q/1.png",
    ]


def test_s3_prefix_and_secret_free_errors(s3_server, s3_bucket):
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    for name in ["imgs/a.jpg", "imgs/sub/b.PNG", "imgs/c.txt", "other/d.jpg"]:
        fs.pipe(f"{s3_bucket}/{name}", b"x")
    assert list_inputs(f"s3://{s3_bucket}/imgs", s3_server["storage_options"]) == [
        f"s3://{s3_bucket}/imgs/a.jpg",
        f"s3://{s3_bucket}/imgs/sub/b.PNG",
    ]
    # Options from the environment (AWS_ENDPOINT_URL) when none are given.
    assert len(list_inputs(f"s3://{s3_bucket}/imgs")) == 2
    with pytest.raises(FileNotFoundError, match=f"INPUT s3://{s3_bucket}/missing: no such"):
        list_inputs(f"s3://{s3_bucket}/missing")


# --- listing at scale ------------------------------------------------------------------
# Names chosen so that a merge in the wrong order shows: " " < "." < "/" < "_", and a
# file next to a folder of (nearly) the same name.
TREE = [
    "top.JPG", "top.txt", "a.jpg", "a b/x.png", "a.b/y.PNG", "a-b/z.gif", "a_b/w.tif",
    "a/1.jpg", "a/readme.md", "a/b/2.jpeg", "a/b/2.jpeg.bak", "a/b/c/3.webp", "a/b/c/d/4.bmp",
    "a/b/c/d/e/5.TIFF", "a/b/c/d/e/f/6.jpg", "a/b/c/empty/no.json", "b/7.jpg", "b/7.JPG",
    "c/only.csv", "zz/deep/er/8.png", "zz.png",
]  # fmt: skip


def serial_listing(fs, root):
    """Today's listing, for comparison: one fs.find, image names, sorted and unique."""
    from pipeline.segment.inputs.names import is_image_name
    from pipeline.storage import full_uri

    fs.invalidate_cache()
    return sorted({full_uri(fs, p) for p in fs.find(root) if is_image_name(p)})


def flat(chunks):
    return [uri for chunk in chunks for uri in chunk]


SPLITS = [(1, 1), (2, 1), (3, 2), (4, 9), (256, 3)]  # (pieces, depth) of split_prefix


def test_parallel_prefix_listing_equals_serial_find_local(tmp_path):
    make_tree(tmp_path, TREE)
    fs = fsspec.filesystem("file")
    serial = serial_listing(fs, str(tmp_path))
    names = [n[len(str(tmp_path)) + 1 :] for n in serial]
    assert len(names) == 16 and names[3:7] == ["a.jpg", "a/1.jpg", "a/b/2.jpeg", "a/b/c/3.webp"]
    files, prefixes = split_prefix(fs, str(tmp_path), pieces=4, depth=9)
    assert len(prefixes) >= 4 and str(tmp_path / "top.JPG") in files  # it really split
    for pieces, depth in SPLITS:
        listed = flat(iter_prefix(fs, str(tmp_path), 3, pieces=pieces, depth=depth))
        assert listed == serial, (pieces, depth)
    assert list_inputs(str(tmp_path)) == serial
    chunks = list(iter_input_chunks(str(tmp_path), chunk=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 1] and flat(chunks) == serial


def test_parallel_prefix_listing_equals_serial_find_s3_in_ray_tasks(
    s3_server, s3_bucket, ray_local
):
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    for name in TREE + ["elsewhere/9.jpg", "imgsx/10.jpg"]:
        fs.pipe(
            f"{s3_bucket}/imgs/{name}"
            if not name.startswith(("elsewhere", "imgsx"))
            else f"{s3_bucket}/{name}",
            b"x",
        )
    root = f"{s3_bucket}/imgs"
    serial = serial_listing(fs, root)
    assert len(serial) == 16 and serial[0] == f"s3://{s3_bucket}/imgs/a b/x.png"
    for pieces, depth in SPLITS:
        assert flat(iter_prefix(fs, root, 5, pieces=pieces, depth=depth)) == serial, (pieces, depth)
    assert list_inputs(f"s3://{s3_bucket}/imgs/", s3_server["storage_options"]) == serial
    # A key written after a listing is seen by the next one (no stale listing cache).
    fs.pipe(f"{root}/a/b/new.jpg", b"x")
    assert f"s3://{root}/a/b/new.jpg" in list_inputs(f"s3://{root}", s3_server["storage_options"])


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


# --- lists, read in chunks -------------------------------------------------------------
def test_txt_list_read_in_chunks_equals_sorted_unique(tmp_path):
    lines = [f"s3://b/{(i * 7919) % 1000:04d}.jpg" for i in range(3000)]  # each URI three times
    lines[::50] = [f"# comment {i}" for i in range(len(lines[::50]))]
    text = "\ufeff" + "\r\n".join(lines + ["", "  rel/x.png  ", "/abs/y.jpg\u2028s3://b/z.png"])
    (tmp_path / "big.txt").write_bytes(text.encode())
    expected = sorted(
        {ln for ln in lines if not ln.startswith("#")}
        | {str(tmp_path / "rel/x.png"), "/abs/y.jpg", "s3://b/z.png"}
    )
    assert list_inputs(str(tmp_path / "big.txt")) == expected
    chunks = list(iter_input_chunks(str(tmp_path / "big.txt"), chunk=64, sort_run=100))
    assert flat(chunks) == expected and {len(c) for c in chunks[:-1]} == {64}


def test_parquet_list_read_in_batches_equals_sorted_unique(tmp_path):
    uris = [f"s3://b/{(i * 7919) % 500}.jpg" for i in range(2000)] + ["", None, "rel/q.png"]
    pq.write_table(
        pa.table({"uri": uris, "n": range(len(uris))}), tmp_path / "l.parquet", row_group_size=300
    )
    expected = sorted({u for u in uris[:2000]} | {str(tmp_path / "rel/q.png")})
    assert list_inputs(str(tmp_path / "l.parquet")) == expected
    assert flat(iter_input_chunks(str(tmp_path / "l.parquet"), chunk=10, sort_run=7)) == expected
