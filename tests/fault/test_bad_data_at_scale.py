"""Bad data at scale (issue 7, item 4): `maskrcnn segment` over a few hundred images of which
about 10% are broken, plus huge and tiny ones (tests/helpers/mixed_data.py), on a real local Ray.

Every input is accounted for exactly once (read back with pyarrow and DuckDB); each
broken file is an error row saying what is wrong; each huge or tiny image is ok, with
masks of its own full size, unless it is over Pillow's decompression-bomb limit (an error
row, as pipeline/formats/decode.py documents); and the memory of the whole process tree (driver,
raylet, Ray workers) stays within a bound taken from a clean run of the same size measured
in the same test. Also, the two pieces that keep huge images cheap: decode_for_model and
the windowed RLE encoding.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers.mixed_data import Expected, write_clean_set, write_mixed_set
from helpers.proc import kill_group, maskrcnn_process
from helpers.proctree import TreeMonitor
from helpers.segment_data import tiny_model
from PIL import Image
from pycocotools import mask as mask_utils

import pipeline.formats.rle as rle
from pipeline.formats.decode import REDUCE_FROM, decode_for_model, decode_image, reduction_factor
from pipeline.output.schema import SCHEMA, committed_files, read_manifest
from pipeline.segment.run import DECODE_TASK_MEMORY

IMAGES = 200  # per set: 20 broken, 7 odd modes, 4 huge, 3 tiny, 166 plain
MAX_DETECTIONS = 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from maskrcnn.checkpoint import save

    path = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    save(tiny_model(0), path)
    return path


def _segment_cli(input_dir: Path, output: Path, model: str, log: Path) -> tuple[int, TreeMonitor]:
    """Run `maskrcnn segment` (its own local Ray) to the end; (exit code, its tree's monitor)."""
    argv = ["segment", str(input_dir), str(output), "--model", model,
            "--score-threshold", "0", "--max-detections", str(MAX_DETECTIONS),
            "--batch-size", "4", "--rows-per-part", "50"]  # fmt: skip
    with log.open("wb") as out:
        proc = maskrcnn_process(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            with TreeMonitor(proc.pid, interval=0.1) as monitor:
                proc.wait(timeout=600)
        finally:
            kill_group(proc)  # whatever Ray left behind in its group
    return proc.returncode, monitor


def _read_back(output: Path) -> pa.Table:
    manifest = read_manifest(str(output))
    tables = [pq.read_table(f) for f in committed_files(str(output))]
    for t in tables:
        assert t.schema.equals(SCHEMA)
    table = pa.concat_tables(tables)
    counts = manifest["counts"]
    assert counts["images"] == counts["ok"] + counts["error"] == table.num_rows
    return table


def _rle_runs(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the format pycocotools writes:
    6-bit groups from '0', 5 data bits, 0x20 = more, 0x10 = sign; from the third run
    on, each value is a difference to the run two before)."""
    runs: list[int] = []
    data, p = counts.encode("ascii"), 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[p] - 48
            value |= (c & 0x1F) << shift
            more, p, shift = bool(c & 0x20), p + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def _check_row(row: dict, expected: Expected) -> None:
    if expected.error is not None:
        assert row["status"] == "error" and row["error"] == expected.error, (row["uri"], row)
        assert row["width"] is None and row["height"] is None and row["instances"] == []
        return
    assert row["status"] == "ok" and row["error"] is None, (row["uri"], row["error"])
    w, h = expected.size
    assert (row["width"], row["height"]) == (w, h), row["uri"]
    # score threshold 0: every image gets MAX_DETECTIONS, even a 1x1 one.
    assert len(row["instances"]) == MAX_DETECTIONS, row["uri"]
    for inst in row["instances"]:
        runs = _rle_runs(inst["mask_counts"])
        assert sum(runs) == w * h, (row["uri"], "mask is not of the image's size")
        assert sum(runs[1::2]) == inst["area"]
        x1, y1, x2, y2 = inst["box"]
        assert -1 <= x1 <= x2 <= w + 1 and -1 <= y1 <= y2 <= h + 1, (row["uri"], inst["box"])
        if inst["area"]:  # the mask lies in its box (grown by the 28 -> 30 px padding, + 1 px)
            bx, by, bw, bh = mask_utils.toBbox(
                {"size": [h, w], "counts": inst["mask_counts"].encode()}
            )
            pad_x, pad_y = (x2 - x1) / 28 + 1, (y2 - y1) / 28 + 1
            assert x1 - pad_x <= bx and bx + bw <= x2 + pad_x, (row["uri"], inst["box"])
            assert y1 - pad_y <= by and by + bh <= y2 + pad_y, (row["uri"], inst["box"])


# Its own Ray: the memory of the process tree (driver, raylet, workers) is measured.
@pytest.mark.slow
@pytest.mark.ray
def test_mixed_set_every_image_accounted_for_errors_explained_memory_bounded(tmp_path, model_path):
    clean = write_clean_set(tmp_path / "clean", IMAGES)
    mixed = write_mixed_set(tmp_path / "mixed", IMAGES, seed=3)
    kinds = {k: sum(e.kind == k for e in mixed.values()) for k in ("broken", "huge", "tiny")}
    assert kinds["broken"] >= 0.1 * IMAGES and kinds["huge"] >= 3 and kinds["tiny"] == 3

    runs = {}
    for name in ("clean", "mixed"):
        rc, monitor = _segment_cli(
            tmp_path / name, tmp_path / f"out-{name}", model_path, tmp_path / f"{name}.log"
        )
        log = (tmp_path / f"{name}.log").read_text()
        assert rc == 0, log[-3000:]
        runs[name] = monitor

    expected_errors = sum(e.error is not None for e in mixed.values())
    for name, expected in (("clean", clean), ("mixed", mixed)):
        table = _read_back(tmp_path / f"out-{name}")
        uris = table.column("uri").to_pylist()
        assert len(uris) == len(set(uris)) == len(expected) and set(uris) == set(expected)
        statuses = table.column("status").to_pylist()
        errors = expected_errors if name == "mixed" else 0
        assert statuses.count("error") == errors and statuses.count("ok") == len(expected) - errors
        files = committed_files(str(tmp_path / f"out-{name}"))
        con = duckdb.connect()
        assert con.execute(
            "SELECT count(*), count(DISTINCT uri), count(*) FILTER (status = 'ok'), "
            "count(*) FILTER (status = 'error' AND error IS NOT NULL AND width IS NULL) "
            "FROM read_parquet(?)",
            [files],
        ).fetchone() == (len(expected), len(expected), len(expected) - errors, errors)
        for row in table.to_pylist():
            _check_row(row, expected[row["uri"]])

    # Memory: PSS of the CLI's whole process tree. Bad data may cost at most one
    # large image's room on top of the clean run: the DECODE_TASK_MEMORY (1 GiB) a
    # decode task reserves in pipeline/segment/driver.py for "one large image". Measured
    # before decode_for_model: +2.7 GiB (an 81-megapixel PNG normalised in float32
    # at full size); after: within a few hundred MiB of the clean run.
    clean_peak, mixed_peak = runs["clean"].peak_pss, runs["mixed"].peak_pss
    mib = 2**20
    print(f"peak PSS clean {clean_peak / mib:.0f} MiB, mixed {mixed_peak / mib:.0f} MiB; RSS clean "
          f"{runs['clean'].peak_rss / mib:.0f}, mixed {runs['mixed'].peak_rss / mib:.0f} MiB")  # fmt: skip
    assert runs["clean"].samples > 20 and runs["mixed"].samples > 20  # really sampled
    assert mixed_peak <= clean_peak + DECODE_TASK_MEMORY, (
        f"peak PSS mixed {mixed_peak / mib:.0f} MiB vs clean {clean_peak / mib:.0f} MiB "
        f"(RSS {runs['mixed'].peak_rss / mib:.0f} vs {runs['clean'].peak_rss / mib:.0f})"
    )


# --- the pieces that keep huge images cheap ----------------------------------------


def _picture(width: int, height: int) -> Image.Image:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 3] = (200, 30, 40)  # a red block top left, as stored
    rgb[height // 2 :, width // 2 :] = (20, 40, 220)  # a blue block bottom right
    return Image.fromarray(rgb)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_huge_image_decoded_small_with_its_full_size(fmt):
    # 4800 x 3600 for a model taking 128..224 px (it resizes this one to 128 x 170): 28x
    # too large -> shrunk by 28 (JPEG: 1/8 in libjpeg, then by 3), never below 128 x 170.
    data = _encode(_picture(4800, 3600), fmt)
    rgb, size = decode_for_model(data, 128, 224)
    assert size == (3600, 4800)
    assert reduction_factor(4800, 3600, 128, 224) == 28
    expected = (3600 // 24, 4800 // 24) if fmt == "JPEG" else (-(-3600 // 28), -(-4800 // 28))
    assert rgb.shape == (*expected, 3) and rgb.dtype == np.uint8
    assert rgb.shape[0] >= 128 and rgb.shape[1] >= 170
    h, w = rgb.shape[:2]
    np.testing.assert_allclose(rgb[h // 4, w // 6], (200, 30, 40), atol=12)
    np.testing.assert_allclose(rgb[3 * h // 4, 3 * w // 4], (20, 40, 220), atol=12)
    np.testing.assert_allclose(rgb[h // 4, 3 * w // 4], (0, 0, 0), atol=12)


def test_huge_rotated_and_palette_images_keep_orientation_and_colour():
    exif = Image.Exif()
    exif[0x0112] = 6  # viewed turned 90 degrees clockwise: the red block goes top right
    data = _encode(_picture(4000, 3000), "JPEG", exif=exif)
    rgb, size = decode_for_model(data, 128, 224)
    assert size == (4000, 3000)  # (height, width) as viewed
    h, w = rgb.shape[:2]
    assert h > w
    np.testing.assert_allclose(rgb[h // 6, 3 * w // 4], (200, 30, 40), atol=12)
    np.testing.assert_allclose(rgb[3 * h // 4, w // 4], (20, 40, 220), atol=12)

    palette = _picture(3000, 2000).quantize(colors=4)  # reduced as colours, not indices
    rgb, size = decode_for_model(_encode(palette, "PNG"), 128, 224)
    assert size == (2000, 3000)
    h, w = rgb.shape[:2]
    np.testing.assert_allclose(rgb[h // 4, w // 6], (200, 30, 40), atol=12)


def test_images_below_the_reduction_threshold_decode_exactly_as_decode_image():
    # 4x is where shrinking starts; just under it the pixels are decode_image's, bit for bit.
    side = REDUCE_FROM * 224 - 1
    assert reduction_factor(side, side, 224, 224) == 1
    assert reduction_factor(side + 1, side + 1, 224, 224) == REDUCE_FROM
    for data in (
        _encode(_picture(side, side), "JPEG"),
        _encode(_picture(side, side), "PNG"),
        _encode(_picture(5, 5), "PNG"),
    ):
        rgb, size = decode_for_model(data, 224, 224)
        np.testing.assert_array_equal(rgb, decode_image(data))
        assert size == rgb.shape[:2]


def test_windowed_rle_equals_pycocotools_on_the_whole_mask(monkeypatch):
    rng = np.random.default_rng(5)
    masks = []
    for h, w in [(1, 1), (7, 1), (1, 9), (23, 17), (40, 31)]:
        for _ in range(40):
            m = np.zeros((h, w), bool)
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            m[y0 : y0 + int(rng.integers(1, h + 1)), x0 : x0 + int(rng.integers(1, w + 1))] = True
            m ^= rng.random((h, w)) < rng.choice([0.0, 0.1, 0.5])  # touching every edge, too
            masks.append(m)
        masks += [np.ones((h, w), bool), np.zeros((h, w), bool)]
    monkeypatch.setattr(rle, "WINDOWED_MIN_PIXELS", 1)  # every mask through the windowed path
    for m in masks:
        whole = mask_utils.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]
        counts, areas = rle.encode_masks(m[None])
        assert counts == [whole["counts"].decode()] and areas.tolist() == [int(m.sum())]
    # Large masks take the windowed path by default; it is the same string.
    monkeypatch.setattr(rle, "WINDOWED_MIN_PIXELS", 1 << 20)
    big = np.zeros((1200, 1000), bool)
    big[300:420, 990:] = rng.random((120, 10)) < 0.7
    whole = mask_utils.encode(np.asfortranarray(big[:, :, None].astype(np.uint8)))[0]
    assert rle.encode_masks(big[None])[0] == [whole["counts"].decode()]
