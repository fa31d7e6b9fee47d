"""The stages take whole blocks: decode reads ahead across a block and yields bounded
tables, the model actor runs predict ``batch_size`` images at a time within a block, and
a block of unreadable images costs no torch import. Called directly (no Ray)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from helpers.segment_data import tiny_model
from PIL import Image

from maskrcnn.checkpoint import state_dict_bytes
from pipeline.segment.stages import decode, read
from pipeline.segment.stages.decode import decoded_tables, read_and_decode
from pipeline.segment.stages.model import Segmenter


def _png(h: int, w: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def block(tmp_path) -> pa.Table:
    """Six rows of one shard: five PNGs and, third, a file that is not there."""
    uris = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        if i != 2:
            path.write_bytes(_png(40 + 8 * i, 50, i))
        uris.append(str(path))
    return pa.table({"uri": uris, "shard": [7] * 6, "shard_rows": [6] * 6})


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def test_decode_yields_bounded_tables_holding_the_rows_of_one(block, model, monkeypatch):
    whole = read_and_decode(block, storage_options=None, cfg=model.cfg)
    assert whole.column("status").to_pylist() == ["ok", "ok", "error", "ok", "ok", "ok"]
    one_image = min(len(v.as_py()) for v in whole.column("image") if v.as_py())
    monkeypatch.setattr(decode, "DECODED_BYTES_PER_TABLE", one_image)
    tables = list(decoded_tables(block, storage_options=None, cfg=model.cfg))
    # A table ends at the image that fills it: five images, five tables, the unreadable
    # row in the table of the image after it.
    assert [t.num_rows for t in tables] == [1, 1, 2, 1, 1]
    assert pa.concat_tables(tables).equals(whole)
    assert pa.concat_tables(tables).column("uri").to_pylist() == block.column("uri").to_pylist()


def test_decode_of_an_empty_block_is_one_empty_table(model):
    empty = pa.table({"uri": pa.array([], pa.string())})
    tables = list(decoded_tables(empty, storage_options=None, cfg=model.cfg))
    assert [t.num_rows for t in tables] == [0]


class _CountingPool:
    def __init__(self, pool):
        self.pool, self.submitted = pool, 0

    def submit(self, *args):
        self.submitted += 1
        return self.pool.submit(*args)


def test_remote_reads_stay_a_window_ahead_and_in_order(monkeypatch):
    fs = fsspec.filesystem("memory")
    uris = [f"memory://blocks-test/{i}.bin" for i in range(60)]
    for i, uri in enumerate(uris):
        if i % 7 != 3:
            fs.pipe(uri, str(i).encode())
    pool = _CountingPool(read._read_pool())
    monkeypatch.setattr(read, "_read_pool", lambda: pool)
    reads = read.fetched(uris, None)
    first = next(reads)
    # Bytes waiting for decode stay bounded: no read of the whole block up front.
    assert first == b"0" and pool.submitted == read.READ_AHEAD
    rest = [first, *reads]
    assert pool.submitted == len(uris)
    for i, data in enumerate(rest):
        if i % 7 == 3:
            assert isinstance(data, FileNotFoundError), (i, data)
        else:
            assert data == str(i).encode(), i


def test_the_actor_runs_predict_batch_size_images_at_a_time_within_a_block(block, model):
    decoded = read_and_decode(block, storage_options=None, cfg=model.cfg)
    weights = state_dict_bytes(model)
    kwargs = dict(score_threshold=0.0, max_detections=5, fast=False, threads=1)
    seg = Segmenter(weights, batch_size=2, **kwargs)
    calls = []
    predict = seg.model.predict

    def counted(images, **kw):
        calls.append(len(images))
        return predict(images, **kw)

    seg.model.predict = counted
    out = seg(decoded)
    assert calls == [2, 2, 1]  # five readable images; the unreadable one skipped
    one = Segmenter(weights, batch_size=1, **kwargs)
    alone = pa.concat_tables([one(decoded.slice(i, 1)) for i in range(decoded.num_rows)])
    assert out.equals(alone)
    assert out.column("shard").to_pylist() == [7] * 6


def test_a_block_of_unreadable_images_is_encoded_without_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import pyarrow as pa
        from pipeline.segment.stages.decode import read_and_decode
        from pipeline.segment.stages.encode import encode_rows
        from pipeline.segment.stages.model import Segmenter
        uris = [{str(tmp_path / "missing-a.png")!r}, {str(tmp_path / "missing-b.png")!r}]
        decoded = read_and_decode(pa.table({{"uri": uris}}), storage_options=None, cfg=None)
        seg = Segmenter.__new__(Segmenter)
        seg.batch_size = 4
        rows = encode_rows(seg(decoded), class_names=["a"], model_id="m", mask_threshold=0.5)
        assert rows.column("status").to_pylist() == ["error", "error"], rows
        assert rows.column("error").to_pylist() == ["read: no such file"] * 2, rows
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stderr


def test_segmenter_refuses_a_batch_size_below_one(model):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        Segmenter(
            state_dict_bytes(model),
            score_threshold=None,
            max_detections=None,
            fast=False,
            threads=1,
            batch_size=0,
        )
