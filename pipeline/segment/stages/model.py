"""The model stage: :class:`Segmenter`, the actor that runs predict on decoded images.

Columns out (one row per image): uri, status, error, width, height, n, boxes (float32
[n, 4] bytes, xyxy in original pixels), scores (float32 [n]), labels (int64 [n]),
mask_probs (float32 [n, M, M]); and the CARRIED columns (stages/rows.py).

torch is imported inside the methods: see stages/decode.py's module doc (1.2 s and about
1.1 GiB where the pipeline is built; a block of unreadable images needs none).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.segment.stages.rows import (
    ImageStatus,
    carried,
    image_statuses,
    reason,
    status_columns,
)
from pipeline.segment.stages.shared import Shared

DETECTION_FIELDS = ("boxes", "scores", "labels", "mask_probs")


class Segmenter:
    """The model actor: loads the model once, runs predict on batches of images.

    Images come resized to the model's float32 input, or as decoded uint8 pixels
    (column ``resized``), which are normalised and resized here, on the device:
    a quarter of the bytes a channel through the object store, and the GPU's work.
    Masks come back as M x M probabilities (paste_masks=False); pasting them
    at full resolution and RLE encoding are CPU work left to the encode stage.

    ``model``: the model's safetensors bytes, or a :class:`Shared` reference to them.
    ``batch_size``: images per predict call; Ray Data hands the actor whole blocks.
    ``tf32``: TensorFloat-32 matmuls and convolutions for fp32 on a CUDA device that
    has them (Ampere and newer), see :func:`set_tf32`.
    """

    def __init__(
        self,
        model: bytes | Shared,
        *,
        score_threshold: float | None,
        max_detections: int | None,
        fast: bool,
        threads: int,
        tf32: bool = False,
        batch_size: int = 4,
    ) -> None:
        import torch

        from pipeline.segment.model_source import model_from_bytes

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = model.get() if isinstance(model, Shared) else model
        self.model = model_from_bytes(data).to(self.device).eval()
        set_tf32(tf32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.kwargs = {
            "score_threshold": score_threshold,
            "max_detections": max_detections,
            "fast": fast,
            "paste_masks": False,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Detections of every row of ``batch`` (a block): its readable images go through
        predict ``batch_size`` at a time, so a block costs one call, not one per batch."""
        images = image_statuses(batch)
        ok = [i for i, image in enumerate(images) if image.ok]
        outputs: list[dict | None] = []
        for s in range(0, len(ok), self.batch_size):
            chunk = ok[s : s + self.batch_size]
            outputs += self._predict(batch, chunk, [images[i] for i in chunk])
        return _detections_table(batch, images, dict(zip(ok, outputs)))

    def _inputs(self, batch: pa.Table, rows: list[int]) -> list:
        """The model inputs of ``rows``: float32 [3, h, w] on the device, normalised and
        resized (here, for rows not resized on CPU)."""
        import torch

        from maskrcnn.transforms import resize_to_model

        blobs, resized = batch.column("image"), batch.column("resized").to_pylist()
        image_h, image_w = batch.column("image_h").to_pylist(), batch.column("image_w").to_pylist()
        inputs = []
        for i in rows:
            dtype = torch.float32 if resized[i] else torch.uint8
            pixels = torch.frombuffer(bytearray(blobs[i].as_py()), dtype=dtype)
            image = pixels.view(3, image_h[i], image_w[i]).to(self.device, non_blocking=True)
            inputs.append(image if resized[i] else resize_to_model(image, self.model.cfg))
        return inputs

    def _predict(
        self, batch: pa.Table, rows: list[int], images: list[ImageStatus]
    ) -> list[dict | None]:
        """predict's output for each of ``rows`` (None where it failed: that image's
        status says why)."""
        inputs = self._inputs(batch, rows)
        sizes = [(image.height, image.width) for image in images]
        try:
            return list(self.model.predict(inputs, original_sizes=sizes, **self.kwargs))
        except Exception:
            pass
        # One image may be what breaks the batch: run them one by one.
        outputs: list[dict | None] = [None] * len(rows)
        for j, image in enumerate(images):
            try:
                outputs[j] = self.model.predict(
                    [inputs[j]], original_sizes=[sizes[j]], **self.kwargs
                )[0]
            except Exception as exc:
                image.fail(reason("model", exc))
        return outputs


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 for CUDA fp32 matmuls and cuDNN convolutions (no effect on CPU).

    TF32 rounds the inputs of each product to 10 mantissa bits (fp32 keeps 23),
    accumulating in fp32: on Ampere and newer, several times the fp32 rate.
    Detections then move like fast mode's, less: scores by ~1e-4..1e-3, a box
    or mask near a threshold may change (measured by bench/gpu_check.py).
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _detections_table(
    batch: pa.Table, images: list[ImageStatus], outputs: dict[int, dict[str, Any] | None]
) -> pa.Table:
    """Pack per-image detections (``outputs``: row -> predict's output, None where it
    failed) as bytes columns, with one device-to-host copy per field."""
    n = batch.num_rows
    counts = [0] * n
    fields: dict[str, list[bytes]] = {key: [b""] * n for key in DETECTION_FIELDS}
    done = [(i, out) for i, out in outputs.items() if out is not None]
    if done:
        import torch

        sizes = [int(out["scores"].shape[0]) for _, out in done]
        for key in fields:
            # Fixed dtypes whatever autocast left (fast mode): the encode stage reads raw bytes.
            dtype = torch.int64 if key == "labels" else torch.float32
            host = torch.cat([out[key] for _, out in done]).to(dtype).cpu()  # one copy per field
            for (i, _), part in zip(done, torch.split(host, sizes)):
                fields[key][i] = part.contiguous().numpy().tobytes()
        for (i, _), size in zip(done, sizes):
            counts[i] = size
    return pa.table(
        {
            **status_columns(batch.column("uri"), images),
            "n": pa.array(counts, pa.int32()),
            **{key: pa.array(values, pa.large_binary()) for key, values in fields.items()},
            **carried(batch),
        }
    )
