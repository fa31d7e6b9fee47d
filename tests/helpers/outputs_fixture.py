"""Build fake-but-valid segment OUTPUTs (and matching COCO ground truth) for tests.

Rows are written in pipeline.output.schema.SCHEMA with pyarrow, masks are encoded with
pycocotools from known shapes. :func:`write_table_output` commits the files to a Delta
table as the segment writer does (one commit per run, carrying its record);
:func:`write_output` writes the previous folder format (``_manifest.json``), which
readers still read. Reusable by any test that reads an OUTPUT.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.output.schema import FORMAT, MANIFEST_NAME, SCHEMA, committed_files
from pipeline.output.table import DataFile, commit_files, file_stats, has_table, load_table
from pipeline.storage import get_fs, join

MODEL_ID = "test-model-0001"


def rect_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """bool [height, width], True on columns x0..x1-1 and rows y0..y1-1."""
    m = np.zeros((height, width), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def disc_mask(height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """bool [height, width], True within radius ``r`` of pixel centre (cx, cy)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def encode_mask(mask: np.ndarray) -> str:
    """COCO compressed RLE counts (str) of a bool [H, W] mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii")


def mask_box(mask: np.ndarray) -> list[float]:
    """x1, y1, x2, y2 (pixel edges, x2/y2 exclusive) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def instance(
    label: int,
    label_name: str,
    score: float,
    mask: np.ndarray,
    box: list[float] | None = None,
) -> dict[str, Any]:
    """One detection in the Parquet instance struct form; ``box`` defaults to the mask's."""
    return {
        "label": label,
        "label_name": label_name,
        "score": score,
        "box": box if box is not None else mask_box(mask),
        "mask_counts": encode_mask(mask),
        "area": int(mask.sum()),
    }


def ok_row(
    uri: str, width: int, height: int, instances: list[dict], model: str = MODEL_ID
) -> dict[str, Any]:
    ordered = sorted(instances, key=lambda d: -d["score"])
    return {
        "uri": uri,
        "status": "ok",
        "error": None,
        "width": width,
        "height": height,
        "instances": ordered,
        "model": model,
    }


def error_row(uri: str, reason: str, model: str = MODEL_ID) -> dict[str, Any]:
    return {
        "uri": uri,
        "status": "error",
        "error": reason,
        "width": None,
        "height": None,
        "instances": None,
        "model": model,
    }


def write_output(
    output: str,
    rows: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    rows_per_file: int = 3,
    commit: bool = True,
    class_names: list[str] | None = None,
    model: str = MODEL_ID,
) -> list[str]:
    """Write ``rows`` as Parquet part files under ``output`` plus, if ``commit``, the manifest.

    Returns the data files' names relative to ``output``.
    """
    fs, base = get_fs(output, options)
    fs.makedirs(base, exist_ok=True)
    files = []
    for i in range(0, max(len(rows), 1), rows_per_file):
        chunk = rows[i : i + rows_per_file]
        if not chunk:
            break
        name = f"part-{i // rows_per_file:05d}.parquet"
        with fs.open(join(base, name), "wb") as f:
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), f)
        files.append(name)
    if commit:
        ok = sum(r["status"] == "ok" for r in rows)
        manifest = {
            "format": FORMAT,
            "run_id": "test-run",
            "model": model,
            "model_uri": "file:///models/test.safetensors",
            "config": {"class_names": class_names or ["__background__"]},
            "input": "file:///images",
            "files": files,
            "counts": {
                "images": len(rows),
                "ok": ok,
                "error": len(rows) - ok,
                "instances": sum(len(r["instances"] or []) for r in rows),
            },
            "started": "2024-01-01T00:00:00Z",
            "finished": "2024-01-01T00:01:00Z",
            "versions": {},
        }
        with fs.open(join(base, MANIFEST_NAME), "w") as f:
            f.write(json.dumps(manifest))
    return files


def write_table_output(
    output: str,
    rows: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    run_id: str = "test-run-1",
    seq: int = 1,
    removes: Sequence[str] = (),
    rows_per_file: int = 3,
    class_names: list[str] | None = None,
    model: str = MODEL_ID,
) -> int:
    """One segment run's commit to the Delta table at ``output``: ``rows`` as Parquet parts
    ``run-<seq>/part-<n>.parquet`` added, the committed files ``removes`` (relative to
    ``output``) removed, and a record like the writer's (``counts`` the table's rows after
    the commit; ``changes`` what it added, replaced and removed). Returns the version of
    this commit (the table properties may take another, after it)."""
    fs, base = get_fs(output, options)
    before = _table_rows(output, options)
    adds = []
    for n, i in enumerate(range(0, len(rows), rows_per_file)):
        name = f"run-{seq:06d}/part-{n:06d}.parquet"
        fs.makedirs(join(base, f"run-{seq:06d}"), exist_ok=True)
        part = pa.Table.from_pylist(rows[i : i + rows_per_file], schema=SCHEMA)
        with fs.open(join(base, name), "wb") as f:
            pq.write_table(part, f, compression="zstd")
        with fs.open(join(base, name), "rb") as f:
            meta = pq.read_metadata(f)
        adds.append(DataFile(name, fs.size(join(base, name)), file_stats(meta), meta.num_rows))
    gone = {uri for name in removes for uri in _column(fs, join(base, name), "uri")}
    record = _run_record(run_id, model, class_names, before, rows, gone)
    removed = [DataFile(name, fs.size(join(base, name)), "", 0) for name in removes]
    version = load_table(output, options).version() + 1 if has_table(output, options) else 0
    commit_files(output, options, adds, removed, record, seq, SCHEMA)
    return version


def _run_record(
    run_id: str,
    model: str,
    class_names: list[str] | None,
    before: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    gone: set[str],
) -> dict[str, Any]:
    """The writer's record of a run that adds ``rows`` to a table of ``before`` rows and
    removes the files holding the images ``gone``."""
    kept = [r for r in before if r["uri"] not in gone]
    new = {r["uri"] for r in rows}
    after = kept + rows
    ok = sum(r["status"] == "ok" for r in after)
    record = {
        "format": FORMAT,
        "operation": "segment",
        "run_id": run_id,
        "model": model,
        "model_uri": "file:///models/test.safetensors",
        "config": {"class_names": class_names or ["__background__"]},
        "input": "file:///images",
        "options": {},
        "counts": {
            "images": len(after),
            "ok": ok,
            "error": len(after) - ok,
            "instances": sum(len(r["instances"] or []) for r in after),
        },
        "changes": {
            "added": len(new - {r["uri"] for r in before}),
            "replaced": len(new & gone),
            "removed": len(gone - new),
            "errors": sum(r["status"] == "error" for r in rows),
        },
        "started": "2024-01-01T00:00:00Z",
        "finished": "2024-01-01T00:01:00Z",
        "versions": {},
    }
    return record


def _table_rows(output: str, options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The ``uri``, ``status`` and ``instances`` of every row of the table's latest version."""
    if not has_table(output, options):
        return []
    fs, _ = get_fs(output, options)
    rows = []
    for uri in committed_files(output, options):
        with fs.open(get_fs(uri, options)[1], "rb") as f:
            rows += pq.read_table(f, columns=["uri", "status", "instances"]).to_pylist()
    return rows


def _column(fs: Any, path: str, name: str) -> list[Any]:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=[name])[name].to_pylist()


# --- ground truth in COCO format, and rows that predict it exactly -------------------------

# Sparse, unordered category ids on purpose: exports must map by name, not position.
CATEGORIES = [
    {"id": 7, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 12, "name": "triangle", "supercategory": "shape"},
]
CLASS_NAMES = ["__background__", "square", "circle", "triangle"]


def triangle_mask(height: int, width: int, x0: int, y0: int, size: int) -> np.ndarray:
    """bool [height, width]: a right triangle with legs along the top and left edges."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx >= x0) & (yy >= y0) & ((xx - x0) + (yy - y0) < size)


def shapes_scene(seed: int, height: int = 64, width: int = 80) -> list[tuple[str, np.ndarray]]:
    """Two or three non-overlapping objects as (class name, bool mask) for one image."""
    rng = np.random.default_rng(seed)
    objects = []
    for slot in range(int(rng.integers(2, 4))):
        x0 = 2 + slot * 26
        y0 = int(rng.integers(2, height - 26))
        size = int(rng.integers(10, 22))
        kind = CLASS_NAMES[1 + int(rng.integers(0, 3))]
        if kind == "square":
            m = rect_mask(height, width, x0, y0, x0 + size, y0 + size)
        elif kind == "circle":
            m = disc_mask(height, width, x0 + size / 2, y0 + size / 2, size / 2)
        else:
            m = triangle_mask(height, width, x0, y0, size)
        objects.append((kind, m))
    return objects


def coco_ground_truth(
    scenes: Iterable[tuple[str, int, int, list[tuple[str, np.ndarray]]]],
    first_image_id: int = 101,
    polygons: bool = False,
) -> dict[str, Any]:
    """A COCO dataset dict (no info/licenses, as some files lack them) from
    (file_name, height, width, [(class name, mask), ...]) scenes. Image ids are
    sparse (step 5). With ``polygons`` the masks of rectangles are given as
    polygons, the rest as compressed RLE."""
    by_name = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for i, (file_name, h, w, objects) in enumerate(scenes):
        image_id = first_image_id + 5 * i
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for name, m in objects:
            x1, y1, x2, y2 = mask_box(m)
            if polygons and name == "square":
                seg: Any = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            else:
                seg = {"size": [h, w], "counts": encode_mask(m)}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": by_name[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(m.sum()),
                    "iscrowd": 0,
                    "segmentation": seg,
                }
            )
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def rows_from_coco(gt: dict[str, Any], uri_prefix: str, score: float = 1.0) -> list[dict[str, Any]]:
    """OUTPUT rows whose detections are exactly the non-crowd objects of COCO ``gt``
    (masks decoded by pycocotools, polygons included), all at ``score``."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    names = {c["id"]: c["name"] for c in gt["categories"]}
    rows = []
    for img in gt["images"]:
        insts = []
        for ann in coco.imgToAnns.get(img["id"], []):
            if ann.get("iscrowd"):
                continue
            name = names[ann["category_id"]]
            m = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            box = [x, y, x + w, y + h]
            insts.append(instance(CLASS_NAMES.index(name), name, score, m, box))
        rows.append(ok_row(join(uri_prefix, img["file_name"]), img["width"], img["height"], insts))
    return rows
