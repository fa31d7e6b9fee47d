"""COCO evaluation of the model being trained, on rank 0 (``--val-data``, ``--eval-every``).

The metrics (bbox and segm AP, AP50, ...) go into the report of that
iteration and so into the checkpoint's state.json.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pipeline.formats.coco import CocoDataset
from pipeline.output.evaluate import (
    coco_evaluate,
    label_to_category_ids,
    predictions_to_coco_results,
)


class Evaluator:
    """COCO bbox/segm AP of a model on a validation set (run on rank 0 only).

    Decoded images are kept in memory after the first pass when the whole set
    fits in ``cache_bytes`` (small validation sets are evaluated often).
    """

    def __init__(
        self,
        val_uri: str,
        class_names: Sequence[str],
        storage_options: dict[str, Any] | None,
        batch_size: int = 8,
        cache_bytes: int = 512 << 20,
    ) -> None:
        self.data = CocoDataset(val_uri, storage_options=storage_options, train=False)
        self.label_map = label_to_category_ids(class_names, self.data.categories)
        self.batch_size = batch_size
        pixels = sum(3 * im["width"] * im["height"] for im in self.data.coco.dataset["images"])
        self._cache: list | None = [] if pixels <= cache_bytes else None
        self._cached = False

    def _batches(self):
        if self._cached:
            yield from self._cache
            return
        batch_images, batch_ids = [], []
        for image, target in self.data:  # unloadable images are skipped (and logged) here
            batch_images.append(image)
            batch_ids.append(target["image_id"])
            if len(batch_images) == self.batch_size:
                if self._cache is not None:
                    self._cache.append((batch_images, batch_ids))
                yield batch_images, batch_ids
                batch_images, batch_ids = [], []
        if batch_images:
            if self._cache is not None:
                self._cache.append((batch_images, batch_ids))
            yield batch_images, batch_ids
        self._cached = self._cache is not None

    def __call__(self, model: Any, fast: bool) -> dict[str, float]:
        """Metrics ``{bbox_AP, bbox_AP50, ..., segm_AP, ...}`` of ``model`` (a MaskRCNN)."""
        start = time.perf_counter()
        results, ids = [], []
        for images, image_ids in self._batches():
            preds = model.predict(images, fast=fast)
            preds = [{k: v.cpu() for k, v in p.items()} for p in preds]
            results += predictions_to_coco_results(preds, image_ids, self.label_map)
            ids += image_ids
        metrics = coco_evaluate(self.data.coco, results, image_ids=ids)
        flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}
        flat["eval_images"] = len(ids)
        flat["eval_seconds"] = round(time.perf_counter() - start, 2)
        return flat
