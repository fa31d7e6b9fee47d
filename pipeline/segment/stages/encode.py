"""The encode stage: detections -> rows in pipeline.output.schema.SCHEMA (CPU).

Masks are pasted at full size and RLE encoded, in groups so that a big image with many
detections stays bounded; instances are packed into Arrow without a per-detection loop.
The CARRIED columns (stages/rows.py) follow the schema's.

torch and the mask code are imported at the first readable row: a fresh worker (Ray
starts them as it likes) pays 1.2 s of CPU for those imports, which a block of
unreadable images does not need (and see stages/decode.py's module doc).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.output.schema import INSTANCE_TYPE, SCHEMA
from pipeline.segment.stages.rows import (
    ImageStatus,
    carried,
    image_statuses,
    reason,
    status_columns,
)

# Pixels of full-size masks pasted at once (N * H * W): bounds encode memory.
PASTE_PIXELS = 1 << 26

# One image's instances: labels, scores, boxes [k, 4], RLE strings, areas.
Instances = tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray]


def encode_rows(
    batch: pa.Table, *, class_names: list[str], model_id: str, mask_threshold: float
) -> pa.Table:
    """Detections -> rows in SCHEMA (+ CARRIED): see the module doc."""
    images = image_statuses(batch)
    per_row: list[Instances | None] = [None] * batch.num_rows
    for i, image in enumerate(images):
        if image.ok:
            try:
                per_row[i] = _encoded(batch, i, image, mask_threshold)
            except Exception as exc:
                image.fail(reason("encode", exc))
    rows = pa.table(
        {
            **status_columns(batch.column("uri"), images),
            "instances": _instances_array(per_row, class_names),
            "model": pa.array([model_id] * batch.num_rows, pa.string()),
        },
        schema=SCHEMA,
    )
    for name, column in carried(batch).items():  # the shard a row belongs to
        rows = rows.append_column(name, column)
    return rows


def _encoded(batch: pa.Table, i: int, image: ImageStatus, mask_threshold: float) -> Instances:
    """Row ``i``'s detections with their masks pasted at the image's size and encoded."""
    import torch

    from maskrcnn.masks import paste_masks
    from pipeline.formats.rle import encode_masks

    k = batch.column("n")[i].as_py()
    boxes = np.frombuffer(batch.column("boxes")[i].as_py(), np.float32).reshape(k, 4)
    scores = np.frombuffer(batch.column("scores")[i].as_py(), np.float32)
    labels = np.frombuffer(batch.column("labels")[i].as_py(), np.int64)
    probs = np.frombuffer(batch.column("mask_probs")[i].as_py(), np.float32)
    side = int(round((probs.size // max(k, 1)) ** 0.5))
    probs_t = torch.from_numpy(probs.reshape(k, side, side).copy())
    boxes_t = torch.from_numpy(boxes.copy())
    height, width = image.height, image.width
    group = max(1, PASTE_PIXELS // max(1, height * width))
    rle: list[str] = []
    areas = []
    for s in range(0, max(k, 1), group):
        masks = paste_masks(
            probs_t[s : s + group], boxes_t[s : s + group], height, width, mask_threshold
        )
        group_rle, group_areas = encode_masks(masks.numpy())
        rle += group_rle
        areas.append(group_areas)
    return labels, scores, boxes, rle, np.concatenate(areas)


def _instances_array(per_row: list[tuple | None], class_names: list[str]) -> pa.Array:
    """list<INSTANCE_TYPE> from per-row (labels, scores, boxes, rle, areas), no per-detection loop."""
    sizes = [0 if r is None else len(r[0]) for r in per_row]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    present = [r for r in per_row if r is not None and len(r[0])]

    def cat(j: int, dtype, width: int = 1) -> np.ndarray:
        if not present:
            return np.zeros((0, width) if width > 1 else 0, dtype)
        return np.concatenate([r[j] for r in present]).astype(dtype)

    labels = cat(0, np.int64)
    names = np.asarray(list(class_names) + ["?"], dtype=object)
    label_names = names[np.where((labels >= 0) & (labels < len(class_names)), labels, -1)]
    boxes = cat(2, np.float32, 4).reshape(-1)
    rle = [s for r in present for s in r[3]]
    struct = pa.StructArray.from_arrays(
        [
            pa.array(labels.astype(np.int32), pa.int32()),
            pa.array(label_names.tolist(), pa.string()),
            pa.array(cat(1, np.float32), pa.float32()),
            pa.ListArray.from_arrays(
                pa.array(np.arange(0, len(boxes) + 1, 4, dtype=np.int32)),
                pa.array(boxes, pa.float32()),
            ),
            pa.array(rle, pa.string()),
            pa.array(cat(4, np.int64), pa.int64()),
        ],
        fields=list(INSTANCE_TYPE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct).cast(
        pa.list_(INSTANCE_TYPE)
    )
