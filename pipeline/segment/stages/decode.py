"""The decode stage: image keys -> decoded images, sized for the model.

Columns out (one row per image): uri, status, error, width, height (after EXIF
orientation), image (float32 [3, h, w] bytes, the model-sized image, when ``resized``;
else the decoded uint8 [3, h, w] bytes), image_h, image_w, resized; and the CARRIED
columns (stages/rows.py).

torch and maskrcnn are imported inside the functions that use them: this module is
imported wherever the pipeline is built (the executor actor, pipeline/segment/monitor.py),
where importing torch costs 1.2 s and about 1.1 GiB of resident memory (measured on the
2-core machine), and a block of unreadable images needs neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.formats.decode import DecodeError, decode_for_model, decode_image
from pipeline.segment.stages.read import fetched
from pipeline.segment.stages.rows import ImageStatus, carried, reason, status_columns

# Decoded bytes per table decoded_tables yields: the unit its output blocks grow by.
DECODED_BYTES_PER_TABLE = 1 << 25


def read_and_decode(
    batch: pa.Table,
    *,
    storage_options: dict[str, Any] | None,
    cfg: Any | None,
    resize: str = "always",
) -> pa.Table:
    """uri -> decoded images, shrunk for the model when huge (with ``cfg``). See the module
    doc, and :func:`decoded_tables` (what the pipeline runs) for ``cfg`` and ``resize``."""
    tables = list(decoded_tables(batch, storage_options=storage_options, cfg=cfg, resize=resize))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def decoded_tables(
    batch: pa.Table,
    *,
    storage_options: dict[str, Any] | None,
    cfg: Any | None,
    resize: str = "always",
) -> Iterator[pa.Table]:
    """:func:`read_and_decode` in tables of about DECODED_BYTES_PER_TABLE each (at least one
    row, one table for an empty batch), reading ahead across the whole of ``batch``: a
    decode task takes a block of URIs at once and its memory stays bounded.

    ``cfg``: the model's MaskRCNNConfig, or its ``to_dict()`` (what the pipeline ships, so
    that building it never imports torch); None: decode only, at full size.
    ``resize`` (with ``cfg``): "always" resizes every image to the model's float32
    input here (CPU model actors: the work leaves the actor); "smaller" only those
    whose float32 input is fewer bytes than their decoded uint8 pixels (GPU actors,
    which normalise and resize the rest on the device: what the object store carries
    per image is the smaller of the two).
    """
    if resize not in ("always", "smaller"):
        raise ValueError(f"resize must be 'always' or 'smaller', got {resize!r}")
    if isinstance(cfg, dict):
        from maskrcnn.config import MaskRCNNConfig

        cfg = MaskRCNNConfig.from_dict(cfg)
    uris = batch.column("uri")
    # The URI to read; "uri" is the stored key (the same unless it had secrets).
    sources = batch.column("source") if "source" in batch.column_names else uris
    start, rows = 0, _DecodedRows()
    for data in fetched(sources.to_pylist(), storage_options):
        rows.add(data, cfg, resize)
        if rows.bytes >= DECODED_BYTES_PER_TABLE:
            yield rows.table(batch.slice(start, len(rows.images)))
            start, rows = start + len(rows.images), _DecodedRows()
    if rows.images or start == 0:
        yield rows.table(batch.slice(start, len(rows.images)))


class _DecodedRows:
    """decoded_tables' rows so far, one :meth:`add` per image."""

    def __init__(self) -> None:
        self.images: list[ImageStatus] = []
        self.pixels: list[bytes | None] = []
        self.shapes: list[tuple[int, int]] = []  # (image_h, image_w) of ``pixels``
        self.resized: list[bool] = []
        self.bytes = 0

    def add(self, data: bytes | BaseException, cfg: Any | None, resize: str) -> None:
        image, pixels, shape, resized = ImageStatus(), None, (0, 0), False
        if isinstance(data, BaseException):
            image.fail(reason("read", data))
        else:
            try:
                rgb, (image.height, image.width) = _decode(data, cfg)
            except DecodeError as exc:
                image.fail(str(exc))  # "decode: why" already
            else:
                try:
                    chw, resized = _model_input(rgb, cfg, resize)
                    pixels = chw.numpy().tobytes()
                    shape = (int(chw.shape[1]), int(chw.shape[2]))
                except Exception as exc:
                    image.fail(reason("resize", exc))
                    pixels, shape, resized = None, (0, 0), False
        self.images.append(image)
        self.pixels.append(pixels)
        self.shapes.append(shape)
        self.resized.append(resized)
        self.bytes += len(pixels) if pixels is not None else 0

    def table(self, batch: pa.Table) -> pa.Table:
        """These rows, with ``batch`` (their input rows) for uri and the carried columns."""
        return pa.table(
            {
                **status_columns(batch.column("uri").cast(pa.string()), self.images),
                "image": pa.array(self.pixels, pa.large_binary()),
                "image_h": pa.array([h for h, _ in self.shapes], pa.int32()),
                "image_w": pa.array([w for _, w in self.shapes], pa.int32()),
                "resized": pa.array(self.resized, pa.bool_()),
                **carried(batch),
            }
        )


def _decode(data: bytes, cfg: Any | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 [H, W, 3], (height, width) after EXIF orientation); raises DecodeError.

    With ``cfg`` huge images come back shrunk (still at least the model's size) and the
    size is the original's.
    """
    if cfg is not None:
        return decode_for_model(data, cfg.min_size, cfg.max_size)
    rgb = decode_image(data)
    return rgb, (int(rgb.shape[0]), int(rgb.shape[1]))


def _model_input(rgb: np.ndarray, cfg: Any | None, resize: str):
    """(CHW tensor, resized): uint8 [H, W, 3] ``rgb`` as shipped to the model actor, and
    whether it is the model's float32 input already (see :func:`decoded_tables`)."""
    import torch

    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    if cfg is None:
        return chw.contiguous(), False
    from maskrcnn.transforms import resize_scale, resize_to_model

    if resize == "smaller":
        height, width = int(chw.shape[1]), int(chw.shape[2])
        scale = resize_scale(height, width, cfg.min_size, cfg.max_size)
        # interpolate's output size with recompute_scale_factor: floor(side * scale).
        if 4 * int(height * scale) * int(width * scale) >= height * width:
            return chw.contiguous(), False
    return resize_to_model(chw, cfg).contiguous(), True
