"""pipeline/segment/inputs/listing.py and kinds.py: every kind of INPUT as sorted, unique
URIs, in chunks; a bad INPUT named in one line."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.listing import flat, make_tree

from pipeline.segment.inputs.listing import iter_input_chunks, list_inputs

IMAGES = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.TIF", "e.tiff", "f.bmp", "g.WebP", "h.gif"]


OTHERS = ["notes.txt", "sub/data.json", "x.jpg.bak", "Makefile", "sub/deeper/y.parquet"]


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
