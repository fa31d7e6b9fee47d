"""pipeline.formats.shapes and `maskrcnn shapes`: deterministic synthetic COCO data with exact masks."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from helpers.cli import run_cli as maskrcnn
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.formats.coco import CocoDataset
from pipeline.formats.shapes import MIN_VISIBLE_PIXELS, make_shapes_dataset


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), images=120, size=96, seed=5, val_images=20)
    return root


def test_same_arguments_same_bytes(shapes_dir, tmp_path):
    make_shapes_dataset(str(tmp_path / "again"), images=120, size=96, seed=5, val_images=20)
    first, again = digests(shapes_dir), digests(tmp_path / "again")
    assert len(first) == 120 + 20 + 2  # PNGs and two annotations.json
    assert first == again

    make_shapes_dataset(str(tmp_path / "other"), images=120, size=96, seed=6)
    other = digests(tmp_path / "other")
    assert other["train/annotations.json"] != first["train/annotations.json"]
    # The val split is another stream of the same seed, not a copy of train's first images.
    train_pngs = {v for k, v in first.items() if k.startswith("train/images/")}
    assert not train_pngs & {v for k, v in first.items() if k.startswith("val/images/")}


def load_split(root: Path, split: str):
    coco = COCO(str(root / split / "annotations.json"))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(root / split / info["file_name"]).convert("RGB"))
        yield info, pixels, coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))


def test_masks_are_exactly_the_visible_pixels_of_each_colour(shapes_dir):
    """Checked against the PNG: each mask is one colour, all of it; the rest is background."""
    counts, occluded = [], 0
    for info, pixels, anns in load_split(shapes_dir, "train"):
        assert pixels.shape == (info["height"], info["width"], 3) == (96, 96, 3)
        assert all(a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str) for a in anns)
        counts.append(len(anns))
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for ann in anns:
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            colours = np.unique(pixels[mask], axis=0)
            assert len(colours) == 1  # one object, one colour
            same_colour = (pixels == colours[0]).all(axis=2)
            np.testing.assert_array_equal(mask, same_colour)
            assert not (covered & mask).any()  # visible pixels belong to one object
            covered |= mask
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() >= MIN_VISIBLE_PIXELS
            assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            occluded += ann["area"] < ann["bbox"][2] * ann["bbox"][3] and ann["category_id"] == 1
        background = np.unique(pixels[~covered], axis=0)
        assert len(background) <= 1  # everything not annotated is the one background colour

        # The top shape is never occluded: its mask has its category's shape.
        top = anns[-1]
        w, h = top["bbox"][2], top["bbox"][3]
        fill = top["area"] / (w * h)
        expected_fill = {1: 1.0, 2: np.pi / 4, 3: 0.5}[top["category_id"]]
        assert fill == pytest.approx(expected_fill, abs=0.08), top
    assert set(counts) == {1, 2, 3, 4}
    assert occluded > 0  # squares drawn over by later shapes keep only their visible part


def test_coco_dataset_reads_the_output(shapes_dir):
    ds = CocoDataset(str(shapes_dir / "val"), train=False)
    assert len(ds) == 20
    assert ds.class_names == ["__background__", "square", "circle", "triangle"]
    for (info, pixels, anns), i in zip(load_split(shapes_dir, "val"), range(len(ds))):
        image, target = ds[i]
        assert target["image_id"] == info["id"]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        for k, ann in enumerate(anns):
            np.testing.assert_array_equal(
                target["masks"][k].numpy(), mask_utils.decode(ann["segmentation"])
            )
            x, y, w, h = ann["bbox"]
            assert target["boxes"][k].tolist() == [x, y, x + w, y + h]


def test_writes_to_s3_and_reads_back(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/shapes"
    opts = s3_server["storage_options"]
    summary = make_shapes_dataset(uri, images=6, size=64, seed=1, options=opts)
    ds = CocoDataset(uri + "/train", storage_options=opts)
    assert len(ds) == 6
    assert sum(len(ds.target(i)["labels"]) for i in range(6)) == summary["train"]["objects"]
    image, _ = ds[5]
    assert tuple(image.shape) == (3, 64, 64)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return maskrcnn("shapes", *args, cwd=REPO)


def test_cli_writes_dataset_and_summary(tmp_path):
    out = tmp_path / "ds"
    proc = run_cli(str(out), "--images", "7", "--size", "64", "--seed", "2", "--val-images", "3")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith("shapes: wrote 7 train images") and "+ 3 val images" in line
    for split, n in (("train", 7), ("val", 3)):
        data = json.loads((out / split / "annotations.json").read_text())
        assert len(data["images"]) == n == len(list((out / split / "images").glob("*.png")))
        assert [c["name"] for c in data["categories"]] == ["square", "circle", "triangle"]
    objects = len(json.loads((out / "train" / "annotations.json").read_text())["annotations"])
    assert f"7 train images ({objects} objects:" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "0"], "--images must be at least 1, got 0"),
        (["--images", "3", "--size", "-8"], "--size must be at least 32 pixels, got -8"),
        (["--images", "3", "--val-images", "-1"], "--val-images must be 0 or more, got -1"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    proc = run_cli(str(tmp_path / "ds"), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"maskrcnn shapes: error: {message}"
    assert not (tmp_path / "ds").exists()


def test_cli_writes_to_s3(s3_server, s3_bucket):
    import s3fs

    # The endpoint and credentials come from the environment the fixture set.
    proc = run_cli(f"s3://{s3_bucket}/ds", "--images", "3", "--size", "48", "--val-images", "2")
    assert proc.returncode == 0, proc.stderr
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    assert sorted(p.split("/", 1)[1] for p in fs.find(s3_bucket)) == [
        "ds/train/annotations.json",
        *(f"ds/train/images/00000{i}.png" for i in (1, 2, 3)),
        "ds/val/annotations.json",
        *(f"ds/val/images/00000{i}.png" for i in (1, 2)),
    ]


def test_the_cli_lists_the_generators_shape_kinds():
    """jobs/shapes.py spells SHAPE_KINDS out (its --help imports no pipeline module)."""
    from jobs import shapes as cli
    from pipeline.formats import shapes

    assert cli.SHAPE_KINDS == shapes.SHAPE_KINDS
