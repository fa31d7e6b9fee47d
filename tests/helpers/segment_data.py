"""Segment test data: image files of every kind, their writers, seeded tiny models and
the read-back checks shared by the segment, fault and cluster tests."""

from __future__ import annotations

import io
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.output.schema import SCHEMA, committed_files, read_manifest
from pipeline.segment.driver import SegmentOptions

from .mixed_data import BAD_IMAGE_ERRORS, BAD_IMAGE_SIZES, bad_image_files

# --- inputs -----------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_images(n_plain: int, seed: int = 0, odd: bool = True) -> dict[str, bytes]:
    """name -> file bytes: plain RGB pictures (64..128 px) plus every odd or broken kind."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for i in range(n_plain):
        h, w = (int(v) for v in rng.integers(64, 129, 2))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        rgb[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        files[f"plain/img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"] = (
            _encode(Image.fromarray(rgb), "PNG") if i % 2 else _encode(Image.fromarray(rgb), "JPEG")
        )
    if not odd:
        return files
    files.update({f"odd/{name}": data for name, data in bad_image_files(rng).items()})
    files["odd/notes.txt"] = b"ignored: not an image extension"
    return files


EXPECTED_ERRORS = {f"odd/{name}": reason for name, reason in BAD_IMAGE_ERRORS.items()}
EXPECTED_SIZES = {f"odd/{name}": size for name, size in BAD_IMAGE_SIZES.items()}


def write_local(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write files under root; returns {uri: name} for the images (what INPUT lists)."""
    uris = {}
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if not name.endswith(".txt"):
            uris[str(path)] = name
    return uris


def write_s3(fs, prefix: str, files: dict[str, bytes]) -> dict[str, str]:
    uris = {}
    for name, data in files.items():
        fs.pipe(f"{prefix}/{name}", data)
        if not name.endswith(".txt"):
            uris[f"s3://{prefix}/{name}"] = name
    return uris


# --- model ------------------------------------------------------------------------


def tiny_model(seed: int):
    """The tiny preset, seeded, with boxes and mask logits scaled so that detections are
    tens of pixels wide and masks fill part of them (an untrained model's are near empty)."""
    from maskrcnn import MaskRCNN, MaskRCNNConfig

    cfg = MaskRCNNConfig.preset("tiny", class_names=["__background__", "square", "circle", "tri"])
    torch.manual_seed(seed)
    model = MaskRCNN(cfg).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.bbox_pred.bias.view(-1, 4)[:, 2:] += 10.0
        model.roi_heads.mask_head.logits.weight.mul_(20.0)
    return model


def opts(**kw) -> SegmentOptions:
    base = {
        "batch_size": 1,
        "actors": (1, 1),
        "cpus_per_actor": 1,
        "score_threshold": 0.0,
        "max_detections": 5,
        "rows_per_part": 4,
    }
    base.update(kw)
    return SegmentOptions(**base)


# --- reading back -----------------------------------------------------------------


def read_back(output: str, storage: dict | None = None):
    """(pyarrow table of the committed files, manifest); checks the files' schema."""
    manifest = read_manifest(output, storage)
    files = committed_files(output, storage)
    fs = (
        fsspec.filesystem("s3", **storage)
        if output.startswith("s3://")
        else fsspec.filesystem("file")
    )
    fs.invalidate_cache()  # a listing cached before the commit would hide its files
    tables = []
    for uri in files:
        with fs.open(uri, "rb") as f:
            table = pq.read_table(f)
        assert table.schema.equals(SCHEMA), uri
        tables.append(table)
    import pyarrow as pa

    table = pa.concat_tables(tables)
    counts = manifest["counts"]
    assert counts["images"] == counts["ok"] + counts["error"] == table.num_rows
    if "version" in manifest:  # a Delta table: deltalake and Polars read the same rows
        assert_engines_agree(output, storage, table)
    return table, manifest


def assert_engines_agree(output: str, storage: dict | None, table) -> None:
    """deltalake and Polars read the table at OUTPUT as exactly ``table``'s rows."""
    import polars as pl
    from deltalake import DeltaTable

    from pipeline.output.table import delta_storage_options

    options = delta_storage_options(output, storage)
    by_uri = [("uri", "ascending")]
    ours = table.sort_by(by_uri)
    delta = DeltaTable(output, storage_options=options).to_pyarrow_table().sort_by(by_uri)
    assert delta.cast(ours.schema).equals(ours)
    frame = pl.read_delta(output, storage_options=options).sort("uri")
    assert frame["uri"].to_list() == ours.column("uri").to_pylist()
    assert frame["instances"].list.len().sum() == sum(
        map(len, ours.column("instances").to_pylist())
    )


def assert_only_committed(output: str, storage: dict | None = None) -> None:
    """OUTPUT holds its log and the files the log commits, nothing else (no piece, no
    state of a run, no temporary file)."""
    fs = (
        fsspec.filesystem("s3", **storage)
        if output.startswith("s3://")
        else fsspec.filesystem("file")
    )
    fs.invalidate_cache()
    root = output.split("://", 1)[-1].rstrip("/")
    stored = {p[len(root) + 1 :] for p in fs.find(root)}
    stored = {p for p in stored if not p.startswith("_delta_log/")}
    assert stored == set(read_manifest(output, storage)["files"])


def duckdb_counts(files: list[str], storage: dict | None = None) -> tuple[int, int, int, int]:
    """(rows, distinct uris, error rows, instances) as DuckDB sees the committed files."""
    con = duckdb.connect()
    if files[0].startswith("s3://"):
        con.register_filesystem(fsspec.filesystem("s3", **storage))
    rows = con.execute(
        "SELECT count(*), count(DISTINCT uri), count(*) FILTER (status = 'error'), "
        "sum(len(instances)) FROM read_parquet(?)",
        [files],
    ).fetchone()
    return tuple(int(v) for v in rows)


def assert_exactly_once(table, expected_uris) -> None:
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "a URI is in the output twice"
    assert sorted(uris) == sorted(expected_uris)
