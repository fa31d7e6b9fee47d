"""pipeline.formats.coco: the COCO reader on small fixtures written here (local, memory://, s3://)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.formats.coco import CocoDataset

H, W = 32, 40  # not square, so a transposed mask or image shows
CATEGORIES = [  # sparse ids, listed out of order: labels follow sorted ids 3, 7, 42
    {"id": 42, "name": "kite"},
    {"id": 7, "name": "cat"},
    {"id": 3, "name": "ant"},
]


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _poly(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    # Integer pixel corners: pycocotools fills exactly rows y0..y1-1, cols x0..x1-1.
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs starting with zeros)."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": [H, W], "counts": runs}


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id: int, image_id: int, category_id: int, segmentation, **fields) -> dict:
    """A COCO annotation; ``fields`` adds bbox, area, iscrowd where the case has them."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        **fields,
    }


def _png(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **save)
    return buf.getvalue()


def build_fixture() -> tuple[dict[str, bytes], dict]:
    """Files (relative path -> bytes) of a small dataset and the expectations to check."""
    rng = np.random.default_rng(0)
    pixels = {n: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for n in ("a", "b", "e")}
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    # Stored on its side (W x H) with EXIF orientation 6: upright it is H x W.
    rotated = np.ascontiguousarray(np.rot90(pixels["e"], k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "imgs/a.png": _png(pixels["a"]),
        "imgs/b.png": _png(pixels["b"]),
        "imgs/sub/grey.png": _png(grey),  # mode L
        "imgs/e.png": _png(rotated, exif=exif),
        "imgs/broken.png": b"\x89PNG\r\n\x1a\n this is not an image",
        # imgs/missing.png is listed but never written
    }
    m_poly = _rect(2, 10, 3, 15)
    m_two = np.maximum(_rect(12, 16, 1, 5), _rect(20, 30, 30, 38))
    m_unc = _rect(5, 25, 20, 24)
    m_cmp = _rect(0, 4, 30, 40)  # touches the image edge
    m_crowd = _rect(26, 32, 0, 10)
    images = [
        {"id": 1, "file_name": "imgs/a.png", "width": W, "height": H},
        {"id": 2, "file_name": "imgs/b.png", "width": W, "height": H},  # no objects
        {"id": 3, "file_name": "imgs/missing.png", "width": W, "height": H},
        {"id": 4, "file_name": "imgs/broken.png", "width": W, "height": H},
        {"id": 5, "file_name": "./imgs/sub/grey.png", "width": W, "height": H},
        {"id": 6, "file_name": "imgs/e.png", "width": W, "height": H},
    ]
    anns = [
        _ann(10, 1, 42, [_poly(2, 10, 3, 15)], bbox=[3, 2, 12, 8], area=96, iscrowd=0),
        _ann(11, 1, 3, [_poly(12, 16, 1, 5), _poly(20, 30, 30, 38)], iscrowd=0),
        _ann(12, 1, 7, _uncompressed(m_unc), bbox=[19.5, 4.5, 5, 21], iscrowd=0),
        _ann(13, 1, 3, _compressed(m_crowd), iscrowd=1),
        # bad ones: each kind once
        _ann(14, 1, 7, [_poly(2, 4, 2, 4)], bbox=[2, 2, 0, 2], iscrowd=0),
        _ann(15, 1, 7, [], iscrowd=0),
        _ann(16, 1, 99, [_poly(2, 4, 2, 4)]),
        # annotations of the missing and broken images
        _ann(17, 3, 7, [_poly(2, 4, 2, 4)]),
        _ann(18, 4, 7, [_poly(2, 4, 2, 4)]),
        _ann(19, 6, 42, _compressed(m_cmp)),
        _ann(20, 5, 7, _uncompressed(m_poly)),
    ]
    files["annotations.json"] = json.dumps(
        {"images": images, "annotations": anns, "categories": CATEGORIES}
    ).encode()
    expected = {
        # image_id -> (pixels HWC, [(category id, mask)] non-crowd, in file order)
        1: (pixels["a"], [(42, m_poly), (3, m_two), (7, m_unc)]),
        2: (pixels["b"], []),
        5: (np.repeat(grey[:, :, None], 3, axis=2), [(7, m_poly)]),
        6: (pixels["e"], [(42, m_cmp)]),
    }
    return files, expected


def write_local(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.fixture
def fixture_dir(tmp_path):
    files, expected = build_fixture()
    write_local(tmp_path, files)
    return tmp_path, expected


def check_samples(ds: CocoDataset, expected: dict) -> None:
    """Every loadable sample equals what was drawn; the broken image loads as None."""
    loaded = {}
    for i in range(len(ds)):
        sample = ds[i]
        if sample is None:
            continue
        image, target = sample
        loaded[target["image_id"]] = (image, target)
    assert sorted(loaded) == sorted(expected)
    for image_id, (pixels, objects) in expected.items():
        image, target = loaded[image_id]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, H, W)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels)
        assert target["masks"].dtype == torch.uint8
        assert tuple(target["masks"].shape) == (len(objects), H, W)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        got_ids = [ds.label_to_category_id[int(v)] for v in target["labels"]]
        assert got_ids == [cat for cat, _ in objects]
        for k, (_, mask) in enumerate(objects):
            np.testing.assert_array_equal(target["masks"][k].numpy(), mask)
            ys, xs = np.nonzero(mask)  # box = the mask's extent, x2/y2 one past the last pixel
            assert target["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_reads_polygons_rles_crowd_and_counts_bad_ones(fixture_dir, caplog):
    root, expected = fixture_dir
    with caplog.at_level(logging.WARNING, logger="pipeline.formats.coco"):
        ds = CocoDataset(str(root))
    (line,) = [r.getMessage() for r in caplog.records]  # one line for the whole JSON
    assert line.endswith(
        "annotations.json: skipped 3 annotations (degenerate box: 1, empty segmentation: 1, "
        "unknown category id: 1) and 1 images (missing file: 1)"
    )
    assert len(ds) == 5  # the broken file is found only when loaded
    assert ds.class_names == ["__background__", "ant", "cat", "kite"]
    assert ds.num_classes == 4
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 42}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.formats.coco"):
        check_samples(ds, expected)
        assert ds[ds.image_ids.index(4)] is None  # remembered: no second warning
    (line,) = [r.getMessage() for r in caplog.records]
    assert "imgs/broken.png: undecodable" in line
    assert ds.skip_summary().endswith("and 2 images (missing file: 1, undecodable: 1)")

    # The crowd object is left out of the targets but is in the evaluation ground truth.
    gt = ds.coco
    crowd = gt.loadAnns(gt.getAnnIds(imgIds=[1], iscrowd=True))
    assert [a["iscrowd"] for a in crowd] == [1] and crowd[0]["category_id"] == 3
    np.testing.assert_array_equal(gt.annToMask(crowd[0]), _rect(26, 32, 0, 10))
    assert sorted(gt.getImgIds()) == [1, 2, 4, 5, 6]
    assert len(gt.getAnnIds(iscrowd=False)) == 6  # 3 + 1 + 1 good ones + the broken image's


def test_iteration_and_collate_skip_the_undecodable_image(fixture_dir):
    root, expected = fixture_dir
    ds = CocoDataset(str(root / "annotations.json"), image_root=str(root))
    assert sorted(t["image_id"] for _, t in ds) == sorted(expected)
    # Worker processes get pickled copies: each skips the broken file on its own.
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=CocoDataset.collate
    )
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images += batch_images
        targets += batch_targets
    assert sorted(t["image_id"] for t in targets) == sorted(expected)
    assert len(images) == len(targets)
    assert ds.skipped_images["undecodable"] == 1  # from the iteration in this process


def test_gt_as_predictions_scores_ap_one(fixture_dir):
    from pycocotools.cocoeval import COCOeval

    root, _ = fixture_dir
    ds = CocoDataset(str(root), train=False)
    gt = ds.coco
    dets = [{**a, "score": 1.0} for a in gt.loadAnns(gt.getAnnIds(iscrowd=False))]
    for a in dets:
        a.pop("id")
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_shards_are_disjoint_and_complete(fixture_dir):
    root, _ = fixture_dir
    ds = CocoDataset(str(root))
    for world in (1, 2, 3, 7):
        shards = [ds.shard(r, world).image_ids for r in range(world)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == sorted(ds.image_ids) and len(set(flat)) == len(flat)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank"):
        ds.shard(2, 2)


def test_memory_filesystem():
    import fsspec

    files, expected = build_fixture()
    mem = fsspec.filesystem("memory")
    mem.pipe({f"/coco-test/{k}": v for k, v in files.items()})
    try:
        ds = CocoDataset("memory://coco-test")
        check_samples(ds, expected)
    finally:
        mem.rm("/coco-test", recursive=True)


def test_reads_from_s3(s3_server, s3_bucket):
    import s3fs

    files, expected = build_fixture()
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    # Annotations and images under different prefixes: image_root given explicitly.
    fs.pipe_file(f"{s3_bucket}/meta/train.json", files.pop("annotations.json"))
    fs.pipe({f"{s3_bucket}/data/{k}": v for k, v in files.items()})
    ds = CocoDataset(
        f"s3://{s3_bucket}/meta/train.json",
        image_root=f"s3://{s3_bucket}/data",
        storage_options=s3_server["storage_options"],
    )
    assert ds.skipped_images == {"missing file": 1}
    check_samples(ds, expected)


def _write_json(root: Path, images: list, anns: list) -> str:
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return str(path)


def test_no_usable_image_is_a_clear_error(tmp_path):
    images = [{"id": 1, "file_name": "x.png", "width": W, "height": H}]
    uri = _write_json(tmp_path, images, [])
    with pytest.raises(ValueError, match=r"annotations\.json: no usable images .*missing file: 1"):
        CocoDataset(uri)


def test_no_usable_annotation_fails_for_training_only(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(np.zeros((H, W, 3), np.uint8)))
    images = [{"id": 1, "file_name": "x.png", "width": W, "height": H}]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "segmentation": [_poly(1, 5, 1, 5)]}]
    uri = _write_json(tmp_path, images, anns)
    with pytest.raises(ValueError, match="no usable .*unknown category id: 1"):
        CocoDataset(uri)
    ds = CocoDataset(uri, train=False)
    image, target = ds[0]
    assert tuple(target["masks"].shape) == (0, H, W) and tuple(target["boxes"].shape) == (0, 4)


def test_malformed_rles_are_skipped_not_decoded(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(np.zeros((H, W, 3), np.uint8)))
    good = _compressed(_rect(1, 5, 1, 5))
    short = {"size": [H, W], "counts": good["counts"][:-1]}  # runs no longer fill the image
    images = [{"id": 1, "file_name": "x.png", "width": W, "height": H}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": good},
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": short},
        {"id": 3, "image_id": 1, "category_id": 7, "segmentation": {"size": [H, W], "counts": [5]}},
        {"id": 4, "image_id": 1, "category_id": 7, "segmentation": {**good, "size": [W, H]}},
        {"id": 5, "image_id": 9, "category_id": 7, "segmentation": good},
    ]
    ds = CocoDataset(_write_json(tmp_path, images, anns))
    assert ds.skipped_annotations == {
        "invalid segmentation": 2,
        "segmentation size mismatch": 1,
        "unknown image id": 1,
    }
    np.testing.assert_array_equal(ds[0][1]["masks"][0].numpy(), _rect(1, 5, 1, 5))


def test_missing_annotations_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json: annotations file not found"):
        CocoDataset(str(tmp_path / "nothere.json"))
