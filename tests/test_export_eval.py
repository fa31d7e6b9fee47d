"""`maskrcnn export-coco` and `maskrcnn evaluate`: COCO results and AP of a run or a model."""

from __future__ import annotations

import contextlib
import io
import json
import types

import numpy as np
import pytest
from helpers.cli import run_cli as maskrcnn
from helpers.outputs_fixture import (
    CATEGORIES,
    CLASS_NAMES,
    coco_ground_truth,
    error_row,
    instance,
    ok_row,
    rect_mask,
    rows_from_coco,
    shapes_scene,
    write_output,
    write_table_output,
)
from pycocotools.coco import COCO

from pipeline.output.coco_results import ImageMatcher, predictions_to_coco_results
from pipeline.output.evaluate import coco_evaluate, ground_truth, predict_coco_results
from pipeline.output.results import open_results

H, W = 64, 80


def scenes(n: int = 6) -> list:
    return [(f"images/{i:03d}.png", H, W, shapes_scene(i, H, W)) for i in range(n)]


@pytest.fixture
def gt_and_output(tmp_path):
    """Ground truth (polygons and RLE, sparse ids) and an OUTPUT that predicts it exactly,
    plus one image the annotations lack and one error row."""
    gt = coco_ground_truth(scenes(), polygons=True)
    gt_path = tmp_path / "annotations.json"
    gt_path.write_text(json.dumps(gt))
    rows = rows_from_coco(gt, "s3://bucket/dataset")
    extra = rect_mask(H, W, 5, 5, 20, 20)
    rows.append(ok_row("s3://bucket/other/unknown.png", W, H, [instance(1, "square", 0.8, extra)]))
    rows.append(error_row("s3://bucket/dataset/images/bad.png", "decode: empty file"))
    out = tmp_path / "out"
    write_output(str(out), rows, class_names=CLASS_NAMES)
    return gt, gt_path, out


def test_export_with_annotations_maps_ids_by_file_name_and_name(gt_and_output, tmp_path):
    gt, gt_path, out = gt_and_output
    res_path = tmp_path / "results.json"
    proc = maskrcnn("export-coco", str(out), str(res_path), "--annotations", str(gt_path))
    assert proc.returncode == 0, proc.stderr
    assert "1 image(s) in OUTPUT are not in the annotations" in proc.stderr
    assert "1 error row(s) skipped" in proc.stderr

    coco = ground_truth(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(str(res_path))
    dets = json.loads(res_path.read_text())
    assert len(dets) == len(gt["annotations"])  # the unknown image's detection is left out
    # Every detection lands on its own image with its own (sparse) category id:
    # the multiset of (image, category, box) equals the ground truth's.
    want = sorted((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in gt["annotations"])
    got = sorted((d["image_id"], d["category_id"], tuple(d["bbox"])) for d in dets)
    assert got == want
    assert {c["id"] for c in CATEGORIES} >= {d["category_id"] for d in dets}
    for ann in res.dataset["annotations"]:
        h, w = ann["segmentation"]["size"]
        assert (h, w) == (H, W)


def test_image_matcher_prefers_longest_file_name_suffix():
    images = [
        {"id": 1, "file_name": "train/a/x.png"},
        {"id": 2, "file_name": "train/b/x.png"},
        {"id": 3, "file_name": "./y.png"},
        {"id": 4, "file_name": "deep/dir/z.png"},
    ]
    m = ImageMatcher(images)
    assert m.match("s3://bkt/data/train/a/x.png") == 1
    assert m.match("/local/train/b/x.png") == 2
    assert m.match("gs://b/anything/y.png") == 3
    assert m.match("/elsewhere/z.png") == 4  # unique base name
    assert m.match("/elsewhere/x.png") is None  # base name shared by two images
    assert m.match("/elsewhere/w.png") is None


def test_export_without_annotations_numbers_images_and_writes_sidecar(gt_and_output, tmp_path):
    _, _, out = gt_and_output
    res_path = tmp_path / "res.json"
    proc = maskrcnn("export-coco", str(out), str(res_path))
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "res.ids.json").read_text())
    uris = [img["file_name"] for img in sidecar["images"]]
    assert uris == sorted(uris) and len(uris) == 7  # ok images only
    assert [img["id"] for img in sidecar["images"]] == list(range(1, 8))
    assert {c["id"]: c["name"] for c in sidecar["categories"]} == {
        i: n for i, n in enumerate(CLASS_NAMES) if i > 0
    }
    # The sidecar is a COCO file the results load against; ids and labels round-trip.
    coco = ground_truth(sidecar)
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(str(res_path))
    con = open_results(str(out)).connect()
    want = sorted(
        (uris.index(u) + 1, label)
        for u, label in con.sql("SELECT uri, label FROM instances").fetchall()
    )
    got = sorted((a["image_id"], a["category_id"]) for a in res.dataset["annotations"])
    assert got == want


def test_evaluate_ground_truth_rows_score_one(gt_and_output, tmp_path):
    _, gt_path, out = gt_and_output
    metrics_path = tmp_path / "m" / "metrics.json"
    proc = maskrcnn(
        "evaluate", "--predictions", str(out), "--annotations", str(gt_path),
        "--output", str(metrics_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in (
        proc.stdout
    )
    report = json.loads(metrics_path.read_text())
    assert report["images"] == 6
    for iou_type in ("bbox", "segm"):
        m = report["metrics"][iou_type]
        assert m["AP"] == pytest.approx(1.0)
        assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)


def _perturbed_rows(gt: dict) -> list[dict]:
    """The ground truth shifted by 1 pixel, one object per image dropped, scores spread."""
    rows = rows_from_coco(gt, "/data")
    rng = np.random.default_rng(0)
    for row in rows:
        kept = row["instances"][1:]
        for det in kept:
            det["score"] = float(rng.uniform(0.3, 1.0))
            x1, y1, x2, y2 = det["box"]
            det["box"] = [x1 + 1, y1 + 1, x2 + 1, y2 + 1]
            from pycocotools import mask as mu

            m = mu.decode({"size": [H, W], "counts": det["mask_counts"].encode()}).astype(bool)
            shifted = np.zeros_like(m)
            shifted[1:, 1:] = m[:-1, :-1]
            det.update(instance(det["label"], det["label_name"], det["score"], shifted, det["box"]))
        row["instances"] = sorted(kept, key=lambda d: -d["score"])
    return rows


def test_evaluate_perturbed_predictions_score_less(tmp_path):
    gt = coco_ground_truth(scenes())
    out = tmp_path / "out"
    write_output(str(out), _perturbed_rows(gt))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    proc = maskrcnn(
        "evaluate", "--predictions", str(out), "--annotations", str(tmp_path / "gt.json"),
        "--output", str(tmp_path / "metrics.json"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for iou_type in ("bbox", "segm"):
        assert 0.05 < metrics[iou_type]["AP"] < 0.9
        assert metrics[iou_type]["AP75"] < metrics[iou_type]["AP50"]


def test_evaluate_and_export_read_the_version_asked(tmp_path):
    gt = coco_ground_truth(scenes(4))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = str(tmp_path / "table")
    exact = rows_from_coco(gt, "/data")  # version 0: every object found
    write_table_output(out, exact, rows_per_file=2, class_names=CLASS_NAMES)
    worse = _perturbed_rows(gt)[2:]  # version 2: the second part's images redone, worse
    write_table_output(
        out, worse, run_id="test-run-2", seq=2, removes=["run-000001/part-000001.parquet"]
    )

    def evaluate(*flags: str) -> dict:
        metrics = tmp_path / "metrics.json"
        proc = maskrcnn(
            "evaluate", "--predictions", out, "--annotations", str(tmp_path / "gt.json"),
            "--output", str(metrics), *flags,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(metrics.read_text())

    latest, first = evaluate(), evaluate("--version", "0")
    assert (latest["version"], first["version"]) == (2, 0)
    assert first["metrics"]["segm"]["AP"] == pytest.approx(1.0)
    assert latest["metrics"]["segm"]["AP"] < 0.9
    detections = sum(len(r["instances"]) for r in exact)
    assert (first["detections"], latest["detections"]) == (detections, detections - 2)

    proc = maskrcnn("export-coco", out, str(tmp_path / "r.json"), "--version", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "r.json").read_text())) == detections
    proc = maskrcnn("export-coco", out, str(tmp_path / "r.json"))
    assert len(json.loads((tmp_path / "r.json").read_text())) == detections - 2

    model = maskrcnn(
        "evaluate", "--model", "m.safetensors", "--annotations", str(tmp_path / "gt.json"),
        "--version", "0",
    )  # fmt: skip
    assert model.returncode == 2 and "not of --model" in model.stderr


def test_coco_evaluate_model_outputs_of_ground_truth_score_one():
    """The training job's path: predictions_to_coco_results -> coco_evaluate, with a GT
    file lacking info, licenses, iscrowd, area and annotation ids."""
    gt = coco_ground_truth(scenes(4))
    for ann in gt["annotations"]:
        for key in ("iscrowd", "area", "id"):
            ann.pop(key)
    coco = ground_truth(gt)
    name_of = {c["id"]: c["name"] for c in gt["categories"]}
    preds, ids = [], []
    for img in gt["images"]:
        anns = coco.imgToAnns[img["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32)  # fmt: skip
        preds.append(
            {
                "boxes": boxes,
                "scores": np.linspace(1.0, 0.5, len(anns), dtype=np.float32),
                "labels": np.array([CLASS_NAMES.index(name_of[a["category_id"]]) for a in anns]),
                "masks": np.stack([coco.annToMask(a).astype(bool) for a in anns]),
            }
        )
        ids.append(img["id"])
    label_to_cat = {CLASS_NAMES.index(c["name"]): c["id"] for c in gt["categories"]}
    results = predictions_to_coco_results(preds, ids, label_to_cat)
    assert len(results) == len(gt["annotations"])
    table = io.StringIO()
    metrics = coco_evaluate(gt, results, summary_out=table)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert table.getvalue().startswith("bbox:\n Average Precision")
    # A label the mapping lacks is dropped, not sent to a wrong category.
    partial = predictions_to_coco_results(preds, ids, {1: 7})
    assert {r["category_id"] for r in partial} == {7}
    # No detections at all is a zero score, not a crash.
    empty = coco_evaluate(gt, [])
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP"] == 0.0


class _OracleModel:
    """Stands in for a trained model: it recognises each image by its decoded pixels and
    answers that image's ground truth, so any mix-up of files, ids or decoding shows."""

    def __init__(self, gt: dict, pixels_by_id: dict[int, np.ndarray]):
        import torch

        coco = ground_truth(gt)
        name_of = {c["id"]: c["name"] for c in gt["categories"]}
        self.answers = {}
        for image_id, rgb in pixels_by_id.items():
            anns = coco.imgToAnns[image_id]
            self.answers[rgb.tobytes()] = {
                "boxes": torch.tensor(
                    [
                        [
                            a["bbox"][0],
                            a["bbox"][1],
                            a["bbox"][0] + a["bbox"][2],
                            a["bbox"][1] + a["bbox"][3],
                        ]
                        for a in anns
                    ]
                ),  # fmt: skip
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor(
                    [CLASS_NAMES.index(name_of[a["category_id"]]) for a in anns]
                ),
                "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)),
            }
        self.device = torch.device("cpu")
        self.cfg = types.SimpleNamespace(label_names=list(CLASS_NAMES))

    def predict(self, images, score_threshold=None, max_detections=None):
        return [self.answers[im.permute(1, 2, 0).contiguous().numpy().tobytes()] for im in images]


def test_predict_coco_results_reads_each_image_under_its_id(tmp_path, s3_server, s3_bucket):
    from PIL import Image

    from pipeline.storage import get_fs

    gt = coco_ground_truth(scenes(5))
    opts = s3_server["storage_options"]
    root = f"s3://{s3_bucket}/ds"
    fs, _ = get_fs(root, opts)
    rng = np.random.default_rng(1)
    pixels = {}
    for img in gt["images"]:
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket}/ds/{img['file_name']}", buf.getvalue())
        pixels[img["id"]] = rgb
    # One listed image is missing from storage: it is reported, not fatal.
    gt["images"].append({"id": 999, "file_name": "images/missing.png", "height": H, "width": W})
    model = _OracleModel(gt, pixels)
    results, done, problems = predict_coco_results(model, gt, root, opts, batch_size=2)
    assert sorted(done) == sorted(pixels)
    assert len(problems) == 1 and "missing.png" in problems[0]
    metrics = coco_evaluate(gt, results, image_ids=done)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["export-coco", "{out}", "{tmp}/r.json"],
        ["evaluate", "--predictions", "{out}", "--annotations", "{gt}", "--output", "{tmp}/m.json"],
    ],
    ids=["export-coco", "evaluate"],
)
def test_unfinished_output_is_refused(tmp_path, argv):
    gt = coco_ground_truth(scenes(2))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    write_output(str(out), rows_from_coco(gt, "/d"), commit=False)
    args = [a.format(out=out, tmp=tmp_path, gt=tmp_path / "gt.json") for a in argv]
    proc = maskrcnn(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskrcnn {argv[0]}: error:")
    assert "did not finish" in lines[0]
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "m.json").exists()


def test_evaluate_refuses_mismatched_annotations(gt_and_output, tmp_path):
    _, _, out = gt_and_output
    other = {"images": [{"id": 1, "file_name": "nothing-like-it.png", "height": 5, "width": 5}],
             "annotations": [], "categories": CATEGORIES}  # fmt: skip
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = maskrcnn(
        "evaluate", "--predictions", str(out), "--annotations", str(tmp_path / "other.json"),
        "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no image of OUTPUT matches an image of the annotations" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = maskrcnn("export-coco", str(out), str(tmp_path / "r.json"), "--annotations", str(bad))
    assert proc.returncode == 2 and "is not valid JSON" in proc.stderr


def test_coco_loadres_accepts_ground_truth_object(gt_and_output):
    """coco_evaluate also takes a pycocotools COCO (as the training job may hold one)."""
    gt, gt_path, out = gt_and_output
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
    from pipeline.output.coco_results import output_coco_results

    dets = list(output_coco_results(open_results(str(out)), gt))
    metrics = coco_evaluate(coco, dets)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def shapes_and_model(tmp_path_factory):
    """A 3-image shapes dataset and an untrained tiny checkpoint (seeded)."""
    import torch

    from maskrcnn.checkpoint import save
    from maskrcnn.config import MaskRCNNConfig
    from maskrcnn.model import MaskRCNN
    from pipeline.formats.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("model_eval")
    make_shapes_dataset(str(root / "ds"), images=3, size=64, seed=0)
    torch.manual_seed(0)
    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES)
    save(MaskRCNN(cfg).eval(), str(root / "tiny.safetensors"))
    return root


def test_evaluate_model_checkpoint_matches_library_path(shapes_and_model, tmp_path):
    """The CLI finds the images beside the annotations, runs the checkpoint in batches and
    scores exactly what predicting each image on its own and coco_evaluate give."""
    import torch

    from maskrcnn.checkpoint import load
    from pipeline.formats.decode import decode_image

    root = shapes_and_model
    ann = root / "ds" / "train" / "annotations.json"
    proc = maskrcnn(
        "evaluate", "--model", str(root / "tiny.safetensors"), "--annotations", str(ann),
        "--score-threshold", "0.0", "--batch-size", "2", "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "segm:\n Average Precision" in proc.stdout
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["images"] == 3 and report["model_uri"] == str(root / "tiny.safetensors")

    gt = json.loads(ann.read_text())
    model = load(str(root / "tiny.safetensors"))
    preds, ids = [], []
    for img in gt["images"]:
        rgb = decode_image((ann.parent / img["file_name"]).read_bytes())
        with torch.inference_mode():
            preds += model.predict(
                [torch.from_numpy(rgb).permute(2, 0, 1)], score_threshold=0.0, max_detections=100
            )
        ids.append(img["id"])
    label_to_cat = {CLASS_NAMES.index(c["name"]): c["id"] for c in gt["categories"]}
    expected = predictions_to_coco_results(preds, ids, label_to_cat)
    assert report["detections"] == len(expected) > 0
    want = coco_evaluate(gt, expected)
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AR100"):
            assert report["metrics"][iou_type][key] == pytest.approx(want[iou_type][key], abs=1e-3)
    # Per class too, with each class's ground truth in the images evaluated.
    rows = report["per_class"]
    assert [r["name"] for r in rows] == [c["name"] for c in gt["categories"]]
    assert sum(r["instances"] for r in rows) == len(gt["annotations"])
    assert all(set(r["segm"]) == {"AP", "AP50", "AP75"} for r in rows)


def test_evaluate_model_with_other_class_names_is_refused(shapes_and_model, tmp_path):
    from maskrcnn.checkpoint import save
    from maskrcnn.config import MaskRCNNConfig
    from maskrcnn.model import MaskRCNN

    root = shapes_and_model
    cfg = MaskRCNNConfig.preset("tiny", class_names=["__background__", "cat", "dog"])
    save(MaskRCNN(cfg).eval(), str(tmp_path / "pets.safetensors"))
    proc = maskrcnn(
        "evaluate", "--model", str(tmp_path / "pets.safetensors"),
        "--annotations", str(root / "ds" / "train" / "annotations.json"),
        "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "none of the model's class names ['cat', 'dog']" in lines[0]
    assert not (tmp_path / "m.json").exists()


# --- per class, and OUTPUTs that cover part of the annotations (issue 26) ------------------
def _evaluate(out, gt_path, tmp_path):
    proc = maskrcnn(
        "evaluate", "--predictions", str(out), "--annotations", str(gt_path),
        "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    return proc, (json.loads((tmp_path / "m.json").read_text()) if proc.returncode == 0 else None)


def test_evaluate_reports_ap_per_class_with_its_ground_truth_count(tmp_path):
    """Every circle left out of an exact OUTPUT: circle scores 0, the others 1, in the
    printed table and in the JSON, beside each class's ground-truth instances."""
    gt = coco_ground_truth(scenes())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rows = rows_from_coco(gt, "/data")
    for row in rows:
        row["instances"] = [d for d in row["instances"] if d["label_name"] != "circle"]
    write_output(str(tmp_path / "out"), rows)
    proc, report = _evaluate(tmp_path / "out", tmp_path / "gt.json", tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {c["id"]: c["name"] for c in gt["categories"]}
    want = {}
    for ann in gt["annotations"]:
        want[names[ann["category_id"]]] = want.get(names[ann["category_id"]], 0) + 1
    by_name = {r["name"]: r for r in report["per_class"]}
    assert {n: r["instances"] for n, r in by_name.items() if r["instances"]} == want
    for kind in ("bbox", "segm"):
        assert by_name["circle"][kind] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        for name in ("square", "triangle"):
            assert by_name[name][kind] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("class "))
    kinds = " ".join(f"{k} {n}" for k in ("bbox", "segm") for n in ("AP", "AP50", "AP75"))
    assert lines[head].split() == ["class", "gt", *kinds.split()]
    circle = next(line for line in lines[head:] if line.startswith("circle "))
    assert circle.split() == ["circle", str(want["circle"])] + ["0.000"] * 6


def test_evaluate_warns_when_output_covers_part_of_the_annotations(tmp_path):
    gt = coco_ground_truth(scenes())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    shared = [img["file_name"] for img in gt["images"][:3]]
    rows = [r for r in rows_from_coco(gt, "/data") if r["uri"].split("/data/", 1)[1] in shared]
    extra = rect_mask(H, W, 5, 5, 20, 20)
    rows += [
        ok_row(f"/other/x{i}.png", W, H, [instance(1, "square", 0.8, extra)]) for i in range(4)
    ]
    write_output(str(tmp_path / "out"), rows)
    proc, report = _evaluate(tmp_path / "out", tmp_path / "gt.json", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (warning,) = [line for line in proc.stderr.splitlines() if "AP is over" in line]
    assert "AP is over the 3 images OUTPUT and the annotations share" in warning
    missing = ", ".join(img["file_name"] for img in gt["images"][3:6])
    assert f"3 of the annotations' 6 images are not in OUTPUT (e.g. {missing})" in warning
    assert "4 of OUTPUT's images are not in the annotations (e.g. /other/x0.png, " in warning
    assert report["images"] == 3 and report["metrics"]["segm"]["AP"] == pytest.approx(1.0)


def test_evaluate_with_no_image_in_common_says_how_names_match(gt_and_output, tmp_path):
    _, _, out = gt_and_output
    other = {"images": [{"id": 1, "file_name": "elsewhere/z.png", "height": 5, "width": 5}],
             "annotations": [], "categories": CATEGORIES}  # fmt: skip
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc, _ = _evaluate(out, tmp_path / "other.json", tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "the annotations e.g. elsewhere/z.png" in line
    assert "matches the file_name equal to the end of its path" in line
