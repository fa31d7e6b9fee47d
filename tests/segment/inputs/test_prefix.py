"""pipeline/segment/inputs/prefix.py: a prefix listed in parallel pieces equals one serial find."""

from __future__ import annotations

import fsspec
from helpers.listing import flat, make_tree

from pipeline.segment.inputs.listing import iter_input_chunks, list_inputs
from pipeline.segment.inputs.prefix import iter_prefix, split_prefix

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
