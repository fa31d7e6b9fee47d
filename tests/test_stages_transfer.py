"""What decode ships to the model actor: float32 model inputs for CPU actors, uint8 pixels
where that is fewer bytes for GPU actors (resized there), and the same rows either way.

The stages are called directly (no Ray): Segmenter takes the model's bytes in place of an
object ref."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers.segment_data import tiny_model
from PIL import Image

from maskrcnn.checkpoint import state_dict_bytes
from pipeline.formats.decode import decode_image
from pipeline.segment.stages.decode import read_and_decode
from pipeline.segment.stages.encode import encode_rows
from pipeline.segment.stages.model import Segmenter


def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (200, 40, 90)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """uri -> bytes: two images smaller than the tiny model's input (128..224 px), one
    three times larger (its float32 input is fewer bytes than its pixels)."""
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, (h, w) in {"a.jpg": (90, 120), "b.jpg": (100, 70), "big.jpg": (480, 640)}.items():
        data = _jpeg(h, w, len(out))
        (root / name).write_bytes(data)
        out[str(root / name)] = data
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


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
