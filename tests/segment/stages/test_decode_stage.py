"""pipeline/segment/stages/decode.py: decoded tables of bounded size, uint8 shipped where it
is fewer bytes, and the same rows whether an image is resized in decode or in the actor."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from maskrcnn.checkpoint import state_dict_bytes
from pipeline.formats.decode import decode_image
from pipeline.segment.stages import decode
from pipeline.segment.stages.decode import decoded_tables, read_and_decode
from pipeline.segment.stages.encode import encode_rows
from pipeline.segment.stages.model import Segmenter


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


def _decoded(files, model, resize: str) -> pa.Table:
    uris = pa.array(list(files), pa.string())
    return read_and_decode(
        pa.table({"uri": uris}), storage_options=None, cfg=model.cfg, resize=resize
    )


def test_gpu_actors_get_uint8_where_it_is_fewer_bytes(files, model):
    always, smaller = _decoded(files, model, "always"), _decoded(files, model, "smaller")
    assert always.column("resized").to_pylist() == [True, True, True]
    assert smaller.column("resized").to_pylist() == [False, False, True]
    for i, data in enumerate(files.values()):
        h, w = decode_image(data).shape[:2]
        sent = len(smaller.column("image")[i].as_py())
        as_float = len(always.column("image")[i].as_py())
        assert sent == min(3 * h * w, as_float), (i, sent, as_float)
    # The small images: 4 bytes a channel at the model's size against 1 at theirs.
    assert sum(len(v.as_py()) for v in always.column("image")[:2]) > 8 * sum(
        len(v.as_py()) for v in smaller.column("image")[:2]
    )


def test_bad_resize_mode_is_refused(files, model):
    with pytest.raises(ValueError, match="resize must be 'always' or 'smaller', got 'gpu'"):
        _decoded(files, model, "gpu")


def test_rows_equal_predict_whether_resized_in_decode_or_in_the_actor(files, model):
    torch.set_num_threads(1)
    seg = Segmenter(
        state_dict_bytes(model), score_threshold=0.0, max_detections=5, fast=False, threads=1
    )
    rows = {}
    for mode in ("always", "smaller"):
        decoded = _decoded(files, model, mode)
        rows[mode] = []
        for i in range(decoded.num_rows):  # one image a batch, as predict() below
            table = encode_rows(
                seg(decoded.slice(i, 1)),
                class_names=model.cfg.label_names,
                model_id="m",
                mask_threshold=0.5,
            )
            rows[mode] += table.to_pylist()
    assert rows["always"] == rows["smaller"]
    for row, data in zip(rows["smaller"], files.values()):
        image = torch.from_numpy(decode_image(data)).permute(2, 0, 1)
        ref = model.predict([image], score_threshold=0.0, max_detections=5)[0]
        assert row["status"] == "ok" and len(row["instances"]) == len(ref["scores"]) > 0
        np.testing.assert_array_equal([i["score"] for i in row["instances"]], ref["scores"])
        np.testing.assert_array_equal(
            np.array([i["box"] for i in row["instances"]], np.float32).reshape(-1, 4),
            ref["boxes"].numpy(),
        )
