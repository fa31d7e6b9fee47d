"""The per-batch steps of segment, as Ray Data map_batches callables over Arrow tables.

Every per-image failure becomes a row with status "error" and a reason
"stage: why" (read, decode, resize, model, encode); no exception leaves a
stage because of one image, so one bad file never fails a job.

Columns between stages (one row per image):

* after :func:`read_and_decode`: uri, status, error, width, height (after EXIF
  orientation), image (float32 [3, h, w] bytes, the model-sized image, when
  ``resized``; else the decoded uint8 [3, h, w] bytes), image_h, image_w, resized;
* after :class:`Segmenter`: uri, status, error, width, height, n, boxes
  (float32 [n, 4] bytes, xyxy in original pixels), scores (float32 [n]),
  labels (int64 [n]), mask_probs (float32 [n, M, M]);
* after :func:`encode_rows`: pipeline.output.schema.SCHEMA.

Each stage also passes on the columns of pipeline.segment.parts.CARRIED (the shard a row
belongs to) when its input has them.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.formats.decode import DecodeError, decode_for_model, decode_image
from pipeline.output.schema import INSTANCE_TYPE, SCHEMA
from pipeline.segment.parts import carried
from pipeline.storage import first_line, get_fs

READ_THREADS = 8
READ_AHEAD = 2 * READ_THREADS  # remote reads in flight per task
# Decoded bytes per table read_and_decode yields: the unit its output blocks grow by.
DECODED_BYTES_PER_TABLE = 1 << 25
READ_ATTEMPTS = 6
# Pixels of full-size masks pasted at once (N * H * W): bounds encode memory.
PASTE_PIXELS = 1 << 26


# A URL's query string (signed-URL parameters) inside an error message.
_URL_QUERY = re.compile(r"(\w+://[^\s'\"?]+)\?[^\s'\"]*")


def _reason(stage: str, exc: BaseException) -> str:
    """``stage: first line of the error``, without URL query strings (signatures)."""
    first = first_line(exc)
    if isinstance(exc, FileNotFoundError):
        first = "no such file"
    elif isinstance(exc, PermissionError):
        first = "access denied"
    first = _URL_QUERY.sub(r"\1", first)
    return f"{stage}: {first[:200]}"


def _image_state(batch: pa.Table) -> tuple[list, list, list, list]:
    """The per-image status, error, width and height of ``batch`` as lists a stage updates."""
    return tuple(batch.column(k).to_pylist() for k in ("status", "error", "width", "height"))


def _image_columns(
    uri: pa.Array | pa.ChunkedArray, status: list, error: list, width: list, height: list
) -> dict:
    """The columns every stage's output starts with: uri, status, error, width, height."""
    return {
        "uri": uri,
        "status": pa.array(status, pa.string()),
        "error": pa.array(error, pa.string()),
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
    }


def read_bytes(uri: str, options: dict[str, Any] | None) -> bytes:
    """The bytes at ``uri``, retrying transient storage errors with backoff."""
    return _reader(options)(uri)


def _reader(options: dict[str, Any] | None) -> Callable[[str], bytes]:
    """uri -> its bytes (retrying as :func:`read_bytes`), with one filesystem per protocol:
    resolving a URI's filesystem costs more than failing to open a local file (measured:
    60 of 105 us per missing-file row)."""
    from pipeline.storage import protocol_of, retrying

    filesystems: dict[str, Any] = {}

    def read(uri: str) -> bytes:
        if "::" in uri:  # a chained URL: fsspec resolves each link
            fs, path = get_fs(uri, options)
        else:
            proto = protocol_of(uri)
            if proto not in filesystems:
                filesystems[proto] = get_fs(uri, options)[0]
            fs = filesystems[proto]
            path = fs._strip_protocol(uri)
        return retrying(fs.cat_file, path, what="read", attempts=READ_ATTEMPTS)

    return read


def _fetched(uris: list[str], options: dict[str, Any] | None) -> Iterator[bytes | BaseException]:
    """Each URI's bytes, or the exception reading it raised, in order.

    Remote URIs are read on READ_THREADS threads, at most READ_AHEAD ahead of the caller
    (bytes waiting for decode stay bounded); local files in the calling thread, where
    handing each read to a thread costs more than the read (measured: 110 against 43 us
    per missing file)."""
    from pipeline.storage import protocol_of

    read = _reader(options)

    def fetch(uri: str) -> bytes | BaseException:
        try:
            return read(uri)
        except Exception as exc:
            return exc

    if not uris or protocol_of(uris[0]) in ("file", "local"):
        yield from map(fetch, uris)
        return
    pool, window = _read_pool(), collections.deque()
    for uri in uris:
        if len(window) == READ_AHEAD:
            yield window.popleft().result()
        window.append(pool.submit(fetch, uri))
    while window:
        yield window.popleft().result()


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    """One pool per worker process: starting threads for every batch cost more than
    reading a small image (measured: 190 us of 230 per missing-file row)."""
    return ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="segment-read")


def _decode(data: bytes, cfg: Any | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 [H, W, 3], (height, width) after EXIF orientation); raises DecodeError.

    With ``cfg`` huge images come back shrunk (still at least the model's size) and the
    size is the original's.
    """
    if cfg is not None:
        return decode_for_model(data, cfg.min_size, cfg.max_size)
    rgb = decode_image(data)
    return rgb, (int(rgb.shape[0]), int(rgb.shape[1]))


def read_and_decode(
    batch: pa.Table,
    *,
    storage_options: dict[str, Any] | None,
    cfg: Any | None,
    resize: str = "always",
) -> pa.Table:
    """uri -> decoded images, shrunk for the model when huge (with ``cfg``). See the module
    doc, and :func:`decoded_tables` (what the pipeline runs) for ``resize``."""
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

    ``resize`` (with ``cfg``): "always" resizes every image to the model's float32
    input here (CPU model actors: the work leaves the actor); "smaller" only those
    whose float32 input is fewer bytes than their decoded uint8 pixels (GPU actors,
    which normalise and resize the rest on the device: what the object store carries
    per image is the smaller of the two).
    """
    if resize not in ("always", "smaller"):
        raise ValueError(f"resize must be 'always' or 'smaller', got {resize!r}")
    uris = batch.column("uri")
    # The URI to read; "uri" is the stored key (the same unless it had secrets).
    sources = batch.column("source") if "source" in batch.column_names else uris
    start, rows = 0, _DecodedRows()
    for data in _fetched(sources.to_pylist(), storage_options):
        rows.add(data, cfg, resize)
        if rows.bytes >= DECODED_BYTES_PER_TABLE:
            yield rows.table(batch.slice(start, len(rows.status)))
            start, rows = start + len(rows.status), _DecodedRows()
    if rows.status or start == 0:
        yield rows.table(batch.slice(start, len(rows.status)))


class _DecodedRows:
    """The columns of read_and_decode's rows so far, one :meth:`add` per image."""

    def __init__(self) -> None:
        self.status: list[str] = []
        self.error: list[str | None] = []
        self.width: list[int | None] = []
        self.height: list[int | None] = []
        self.images: list[bytes | None] = []
        self.image_h: list[int] = []
        self.image_w: list[int] = []
        self.resized: list[bool] = []
        self.bytes = 0

    def add(self, data: bytes | BaseException, cfg: Any | None, resize: str) -> None:
        status, error, size, image, shape, resized = "ok", None, (None, None), None, (0, 0), False
        if isinstance(data, BaseException):
            status, error = "error", _reason("read", data)
        else:
            try:
                rgb, size = _decode(data, cfg)
            except DecodeError as exc:
                status, error = "error", str(exc)
            else:
                try:
                    chw, resized = _model_input(rgb, cfg, resize)
                    image = chw.numpy().tobytes()
                    shape = (int(chw.shape[1]), int(chw.shape[2]))
                except Exception as exc:
                    status, error = "error", _reason("resize", exc)
                    size, resized = (None, None), False
        self.status.append(status)
        self.error.append(error)
        self.height.append(size[0])
        self.width.append(size[1])
        self.images.append(image)
        self.image_h.append(shape[0])
        self.image_w.append(shape[1])
        self.resized.append(resized)
        self.bytes += len(image) if image is not None else 0

    def table(self, batch: pa.Table) -> pa.Table:
        """These rows, with ``batch`` (their input rows) for uri and the carried columns."""
        uri = batch.column("uri")
        return pa.table(
            {
                **_image_columns(
                    uri.cast(pa.string()), self.status, self.error, self.width, self.height
                ),
                "image": pa.array(self.images, pa.large_binary()),
                "image_h": pa.array(self.image_h, pa.int32()),
                "image_w": pa.array(self.image_w, pa.int32()),
                "resized": pa.array(self.resized, pa.bool_()),
                **carried(batch),
            }
        )


def _model_input(rgb: np.ndarray, cfg: Any | None, resize: str):
    """(CHW tensor, resized): uint8 [H, W, 3] ``rgb`` as shipped to the model actor, and
    whether it is the model's float32 input already (see :func:`read_and_decode`)."""
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


class Segmenter:
    """The model actor: loads the model once, runs predict on batches of images.

    Images come resized to the model's float32 input, or as decoded uint8 pixels
    (column ``resized``), which are normalised and resized here, on the device:
    a quarter of the bytes a channel through the object store, and the GPU's work.
    Masks come back as M x M probabilities (paste_masks=False); pasting them
    at full resolution and RLE encoding are CPU work left to :func:`encode_rows`.

    ``model_ref``: [an object ref to, or the bytes of, the model's safetensors].
    ``batch_size``: images per predict call; Ray Data hands the actor whole blocks.
    ``tf32``: TensorFloat-32 matmuls and convolutions for fp32 on a CUDA device that
    has them (Ampere and newer), see :func:`set_tf32`.
    """

    def __init__(
        self,
        model_ref: list,
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
        data = model_ref[0]
        if not isinstance(data, bytes | bytearray | memoryview):
            import ray

            data = ray.get(data)
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

    def _inputs(self, batch: pa.Table, ok: list[int]) -> list:
        """The model inputs of rows ``ok``: float32 [3, h, w] on the device, normalised
        and resized (here, for rows not resized on CPU)."""
        import torch

        from maskrcnn.transforms import resize_to_model

        blobs, resized = batch.column("image"), batch.column("resized").to_pylist()
        image_h, image_w = batch.column("image_h").to_pylist(), batch.column("image_w").to_pylist()
        images = []
        for i in ok:
            dtype = torch.float32 if resized[i] else torch.uint8
            pixels = torch.frombuffer(bytearray(blobs[i].as_py()), dtype=dtype)
            image = pixels.view(3, image_h[i], image_w[i]).to(self.device, non_blocking=True)
            images.append(image if resized[i] else resize_to_model(image, self.model.cfg))
        return images

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Detections of every row of ``batch`` (a block): its readable images go through
        predict ``batch_size`` at a time, so a block costs one call, not one per batch."""
        status, error, width, height = _image_state(batch)
        ok = [i for i in range(batch.num_rows) if status[i] == "ok"]
        outputs: list[dict | None] = []
        for s in range(0, len(ok), self.batch_size):
            chunk = ok[s : s + self.batch_size]
            outputs += self._predict(batch, chunk, status, error, width, height)
        return _detections_table(batch, status, error, width, height, ok, outputs)

    def _predict(self, batch, rows, status, error, width, height) -> list[dict | None]:
        """predict's output for each of ``rows`` (None where it failed: that row's status
        and error say why)."""
        images = self._inputs(batch, rows)
        sizes = [(height[i], width[i]) for i in rows]
        try:
            return list(self.model.predict(images, original_sizes=sizes, **self.kwargs))
        except Exception:
            pass
        # One image may be what breaks the batch: run them one by one.
        outputs: list[dict | None] = [None] * len(rows)
        for j, i in enumerate(rows):
            try:
                outputs[j] = self.model.predict(
                    [images[j]], original_sizes=[sizes[j]], **self.kwargs
                )[0]
            except Exception as exc:
                status[i], error[i] = "error", _reason("model", exc)
                width[i] = height[i] = None
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


def _detections_table(batch, status, error, width, height, ok, outputs) -> pa.Table:
    """Pack per-image detections as bytes columns, with one device-to-host copy per field."""
    n = batch.num_rows
    counts = [0] * n
    fields = {"boxes": [b""] * n, "scores": [b""] * n, "labels": [b""] * n, "mask_probs": [b""] * n}
    done = [(i, out) for i, out in zip(ok, outputs) if out is not None]
    if done:
        import torch

        sizes = [int(out["scores"].shape[0]) for _, out in done]
        for key in fields:
            # Fixed dtypes whatever autocast left (fast mode): encode_rows reads raw bytes.
            dtype = torch.int64 if key == "labels" else torch.float32
            host = torch.cat([out[key] for _, out in done]).to(dtype).cpu()  # one copy per field
            for (i, _), part in zip(done, torch.split(host, sizes)):
                fields[key][i] = part.contiguous().numpy().tobytes()
        for (i, _), size in zip(done, sizes):
            counts[i] = size
    return pa.table(
        {
            **_image_columns(batch.column("uri"), status, error, width, height),
            "n": pa.array(counts, pa.int32()),
            **{key: pa.array(values, pa.large_binary()) for key, values in fields.items()},
            **carried(batch),
        }
    )


def encode_rows(
    batch: pa.Table, *, class_names: list[str], model_id: str, mask_threshold: float
) -> pa.Table:
    """Detections -> rows in SCHEMA: masks pasted at full size and RLE encoded (CPU).

    torch and the mask code are imported at the first readable row: a fresh worker
    (Ray starts them as it likes) pays seconds of CPU for those imports, which a block
    of unreadable images does not need."""
    n_rows = batch.num_rows
    status, error, width, height = _image_state(batch)
    counts = batch.column("n").to_pylist()
    cols = {k: batch.column(k) for k in ("boxes", "scores", "labels", "mask_probs")}
    per_row: list[tuple | None] = [None] * n_rows
    readable = [i for i in range(n_rows) if status[i] == "ok"]
    if readable:
        import torch

        from maskrcnn.masks import paste_masks
        from pipeline.formats.rle import encode_masks
    for i in readable:
        k = counts[i]
        try:
            boxes = np.frombuffer(cols["boxes"][i].as_py(), np.float32).reshape(k, 4)
            scores = np.frombuffer(cols["scores"][i].as_py(), np.float32)
            labels = np.frombuffer(cols["labels"][i].as_py(), np.int64)
            probs = np.frombuffer(cols["mask_probs"][i].as_py(), np.float32)
            side = int(round((probs.size // max(k, 1)) ** 0.5))
            probs_t = torch.from_numpy(probs.reshape(k, side, side).copy())
            boxes_t = torch.from_numpy(boxes.copy())
            # Full-size masks in groups, so a big image with many detections stays bounded.
            group = max(1, PASTE_PIXELS // max(1, height[i] * width[i]))
            rle: list[str] = []
            areas = []
            for s in range(0, max(k, 1), group):
                masks = paste_masks(
                    probs_t[s : s + group],
                    boxes_t[s : s + group],
                    height[i],
                    width[i],
                    mask_threshold,
                )
                group_rle, group_areas = encode_masks(masks.numpy())
                rle += group_rle
                areas.append(group_areas)
            per_row[i] = (labels, scores, boxes, rle, np.concatenate(areas))
        except Exception as exc:
            status[i], error[i] = "error", _reason("encode", exc)
            width[i] = height[i] = None
    instances = _instances_array(per_row, class_names)
    rows = pa.table(
        {
            **_image_columns(batch.column("uri"), status, error, width, height),
            "instances": instances,
            "model": pa.array([model_id] * n_rows, pa.string()),
        },
        schema=SCHEMA,
    )
    for name, column in carried(batch).items():  # the shard a row belongs to
        rows = rows.append_column(name, column)
    return rows


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
            pa.FixedSizeListArray.from_arrays(pa.array(boxes, pa.float32()), 4),
            pa.array(rle, pa.string()),
            pa.array(cat(4, np.int64), pa.int64()),
        ],
        fields=list(INSTANCE_TYPE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct).cast(
        pa.list_(INSTANCE_TYPE)
    )
