"""Fixtures of the stage tests (tests/segment/stages/, registered in tests/conftest.py):
a tiny model, a block of images with one unreadable file, images big enough to resize."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from helpers.segment_data import tiny_model


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
