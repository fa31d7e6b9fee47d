"""`maskrcnn render`: PNG overlays with tinted masks, boxes and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import outputs_fixture as outputs
from helpers.cli import run_cli as maskrcnn
from PIL import Image

from pipeline.output.render import MASK_ALPHA, label_colour, overlay_name

H, W = 72, 96


def noise_image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def drawn_zone(box: list[float], height: int, width: int) -> np.ndarray:
    """Where a detection's outline and label may draw: the box grown by 3 px and a
    band above it for the text."""
    x1, y1, x2, y2 = (int(v) for v in box)
    zone = np.zeros((height, width), dtype=bool)
    zone[max(0, y1 - 3) : y2 + 3, max(0, x1 - 3) : x2 + 3] = True
    zone[max(0, y1 - 20) : y1, max(0, x1 - 3) : x1 + 120] = True
    return zone


@pytest.fixture
def scene(tmp_path):
    """Source images on disk and a committed OUTPUT about them."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    cat, dog, rotated = noise_image(0), noise_image(1), noise_image(2)
    Image.fromarray(cat).save(src / "a" / "pic.png")
    Image.fromarray(dog).save(src / "b" / "pic.png")  # same base name, other folder
    # EXIF orientation 6 (rotate 90 clockwise to view): store the un-rotated pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(rotated, k=1).copy()).save(src / "b" / "turned.png", exif=exif)
    square = outputs.rect_mask(H, W, 10, 30, 40, 60)
    disc = outputs.disc_mask(H, W, 70, 45, 12)
    detections = {
        str(src / "a" / "pic.png"): [
            outputs.instance(1, "square", 0.9, square),
            outputs.instance(2, "circle", 0.7, disc),
        ],
        str(src / "b" / "pic.png"): [outputs.instance(2, "circle", 0.95, disc)],
        str(src / "b" / "turned.png"): [outputs.instance(1, "square", 0.8, square)],
    }
    rows = [outputs.ok_row(uri, W, H, dets) for uri, dets in detections.items()]
    rows.append(outputs.error_row(str(src / "b" / "broken.jpg"), "decode: empty file"))
    out = tmp_path / "out"
    outputs.write_output(str(out), rows)
    originals = {
        str(src / "a" / "pic.png"): cat,
        str(src / "b" / "pic.png"): dog,
        str(src / "b" / "turned.png"): rotated,
    }
    return out, detections, originals


def test_overlays_tint_masks_and_leave_the_rest(scene, tmp_path):
    out, detections, originals = scene
    dest = tmp_path / "png"
    proc = maskrcnn("render", str(out), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 error row(s)" in proc.stderr
    written = sorted(dest.iterdir())
    assert len(written) == 3
    assert {p.name for p in written} == {overlay_name(u) for u in detections}
    for uri, dets in detections.items():
        assert f"-> {dest / overlay_name(uri)}" in proc.stdout
        overlay = np.asarray(Image.open(dest / overlay_name(uri)).convert("RGB"))
        original = originals[uri]
        assert overlay.shape == original.shape
        drawn = np.zeros((H, W), dtype=bool)
        for det in dets:
            drawn |= drawn_zone(det["box"], H, W)
        # Outside every mask, outline and label: the source pixels, exactly.
        assert np.array_equal(overlay[~drawn], original[~drawn])
        for det in dets:
            from pycocotools import mask as mu

            mask = mu.decode({"size": [H, W], "counts": det["mask_counts"].encode()}).astype(bool)
            inner = _eroded(mask, 3)
            colour = np.array(label_colour(det["label"]), dtype=np.float32)
            want = np.rint((1 - MASK_ALPHA) * original[inner] + MASK_ALPHA * colour)
            assert np.abs(overlay[inner].astype(int) - want.astype(int)).max() <= 1
            # The box outline is drawn in the class colour on the box's left edge.
            x1, y1, _, y2 = (int(v) for v in det["box"])
            assert tuple(overlay[(y1 + y2) // 2, x1]) == label_colour(det["label"])


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        out[1:, :] &= out[:-1, :].copy()
        out[:-1, :] &= out[1:, :].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def test_where_and_limit_select_images(scene, tmp_path):
    out, _, _ = scene
    dest = tmp_path / "sel"
    proc = maskrcnn(
        "render", str(out), str(dest), "--where", "uri LIKE '%/b/%' AND len(instances) = 1",
        "--limit", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = [p.name for p in dest.iterdir()]
    assert len(names) == 1 and names[0].startswith("pic-")  # b/pic.png sorts before b/turned.png
    assert "wrote 1 overlay(s)" in proc.stdout


def test_a_table_renders_its_latest_version_unless_asked(scene, tmp_path):
    _, detections, _ = scene
    table = str(tmp_path / "table")
    outputs.write_table_output(
        table, [outputs.ok_row(u, W, H, d) for u, d in detections.items()], rows_per_file=2
    )
    outputs.write_table_output(table, [], seq=2, removes=["run-000001/part-000001.parquet"])
    latest = maskrcnn("render", table, str(tmp_path / "latest"))
    first = maskrcnn("render", table, str(tmp_path / "first"), "--version", "0")
    assert latest.returncode == first.returncode == 0, latest.stderr + first.stderr
    uris = list(detections)  # a/pic.png, b/pic.png, then b/turned.png in the removed part
    assert {p.name for p in (tmp_path / "latest").iterdir()} == {overlay_name(u) for u in uris[:2]}
    assert {p.name for p in (tmp_path / "first").iterdir()} == {overlay_name(u) for u in uris}


def test_bad_where_and_unfinished_output_are_one_line_errors(scene, tmp_path):
    out, _, _ = scene
    proc = maskrcnn("render", str(out), str(tmp_path / "x"), "--where", "no_such_column > 1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "query failed" in lines[0] and "no_such_column" in lines[0]
    # An attempt to write through --where is refused and writes nothing.
    leak = tmp_path / "leak.csv"
    proc = maskrcnn(
        "render", str(out), str(tmp_path / "y"),
        "--where", f"true; COPY (SELECT 1) TO '{leak}'",
    )  # fmt: skip
    assert proc.returncode == 2 and not leak.exists()

    unfinished = tmp_path / "unfinished"
    outputs.write_output(str(unfinished), [outputs.ok_row("/nope.png", W, H, [])], commit=False)
    proc = maskrcnn("render", str(unfinished), str(tmp_path / "z"))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]]
        and "did not finish" in proc.stderr
    )
    assert not (tmp_path / "z").exists() or not any((tmp_path / "z").iterdir())


def test_changed_or_missing_source_is_skipped_with_a_warning(tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray(noise_image(3, 40, 50)).save(src)  # not the size the run recorded
    rows = [
        outputs.ok_row(
            str(src),
            W,
            H,
            [outputs.instance(1, "square", 0.9, outputs.rect_mask(H, W, 1, 1, 5, 5))],
        ),
        outputs.ok_row(str(tmp_path / "gone.png"), W, H, []),
    ]
    outputs.write_output(str(tmp_path / "out"), rows)
    proc = maskrcnn("render", str(tmp_path / "out"), str(tmp_path / "png"))
    assert proc.returncode == 1
    assert "the image is now 50x40, the run saw 96x72" in proc.stderr
    assert "gone.png" in proc.stderr
    assert "2 image(s) failed" in proc.stdout
    assert not list((tmp_path / "png").iterdir())


def test_overlay_names_are_safe_and_unique():
    names = {
        overlay_name(u)
        for u in [
            "s3://b/x/cat.jpg",
            "s3://b/y/cat.jpg",
            "/data/../etc/passwd",
            "https://h/p/a b?sig=1",
            "s3://b/weird/\u00e9t\u00e9 #1.JPG",
        ]
    }
    assert len(names) == 5
    for n in names:
        assert n.endswith(".png") and "/" not in n and ".." not in n.replace(".png", "")
        assert Path(n).name == n and all(c.isalnum() or c in "._-" for c in n)
