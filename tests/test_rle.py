"""RLE encoding round trips through pycocotools.mask.decode."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import pipeline.formats.rle as rle
from pipeline.formats.rle import decode_masks, encode_masks


def random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):  # blobs of varied size, plus salt noise so runs are irregular
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        masks[i, y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        masks[i] ^= rng.random((h, w)) < 0.05
    return masks


@pytest.mark.parametrize("shape", [(5, 37, 53), (1, 1, 1), (3, 128, 64), (2, 64, 1)])
def test_round_trip_with_pycocotools(shape):
    masks = random_masks(*shape)
    counts, areas = encode_masks(masks)
    assert len(counts) == shape[0] and all(isinstance(c, str) for c in counts)
    h, w = shape[1:]
    for i, c in enumerate(counts):
        decoded = mask_utils.decode({"size": [h, w], "counts": c})
        np.testing.assert_array_equal(decoded.astype(bool), masks[i])
    np.testing.assert_array_equal(areas, masks.sum(axis=(1, 2)))
    assert areas.dtype == np.int64
    np.testing.assert_array_equal(decode_masks(counts, h, w), masks)


def test_empty_batch_and_empty_masks():
    counts, areas = encode_masks(np.zeros((0, 10, 12), bool))
    assert counts == [] and areas.shape == (0,)
    counts, areas = encode_masks(np.zeros((2, 10, 12), bool))
    assert areas.tolist() == [0, 0]
    assert not decode_masks(counts, 10, 12).any()


def test_grouped_encoding_equals_single_call(monkeypatch):
    masks = random_masks(7, 30, 20, seed=3)
    whole, whole_areas = encode_masks(masks)
    monkeypatch.setattr(rle, "MAX_PIXELS_PER_CALL", 30 * 20 * 2)  # groups of 2 masks
    grouped, grouped_areas = encode_masks(masks)
    assert grouped == whole
    np.testing.assert_array_equal(grouped_areas, whole_areas)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(np.zeros((4, 4), bool))
