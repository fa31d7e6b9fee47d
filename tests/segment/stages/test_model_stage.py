"""pipeline/segment/stages/model.py: the model actor, batch_size images a predict call."""

from __future__ import annotations

import pyarrow as pa
import pytest

from maskrcnn.checkpoint import state_dict_bytes
from pipeline.segment.stages.decode import read_and_decode
from pipeline.segment.stages.model import Segmenter


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
