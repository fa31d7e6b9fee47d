"""`maskrcnn demo` end to end at a small size (its own process, its own embedded Ray):
every step leaves its output, and a second run reuses them instead of redoing them."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers.proc import run_maskrcnn

from pipeline.output.schema import committed_files, read_manifest

# Its own process and Ray: the demo starts an embedded instance as a user's first run does.
pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["--train-images", "12", "--val-images", "6", "--train-iters", "6", "--images", "8"]
SMALL += ["--size", "64"]


def _demo(workdir, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    result = run_maskrcnn(["demo", "--workdir", str(workdir), *SMALL], cwd=REPO, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, time.monotonic() - started


def test_demo_makes_everything_then_reuses_it(tmp_path):
    work = tmp_path / "demo"
    first, first_seconds = _demo(work, timeout=480)

    # Steps in order, each with visible progress.
    headers = [line for line in first.splitlines() if line.startswith("=== [")]
    assert [h.split("]")[0] for h in headers] == [f"=== [{i}/7" for i in range(1, 8)]
    assert "train: iter" in first  # training progress reaches the console
    # No warning floods the console (Ray Train's cleaner needs the dashboard's state API).
    assert "Failed to query Ray Train Controller" not in first

    # Dataset, model, evaluation, Parquet output, overlays.
    for split, n in (("train", 12), ("val", 6)):
        coco = json.loads((work / "shapes" / split / "annotations.json").read_text())
        assert len(coco["images"]) == n
    (model,) = (work / "runs").glob("*/model.safetensors")
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"bbox", "segm"}
    assert all(0.0 <= m["AP"] <= m["AP50"] <= 1.0 for m in metrics["metrics"].values())
    # Learning happened, and the evaluation sees it. Six iterations on 12 images teach little:
    # this run measured bbox AP50 0.0116 (AP 0.0022) and segm AP50 0.0045 (AP 0.0004), the
    # same to the last digit in two runs, where an untrained tiny model scores exactly 0.0 on
    # these 6 images (two random inits, 600 detections each). (The full demo reaches bbox AP
    # 0.70, segm AP 0.73; 60 iterations here measured bbox AP50 0.078, segm AP50 0.050.)
    # Floors at about a third of the measured values: a model that did not learn, or whose
    # boxes or masks come out wrong, scores 0.
    assert metrics["metrics"]["bbox"]["AP50"] >= 0.004, metrics["metrics"]
    assert metrics["metrics"]["segm"]["AP50"] >= 0.0015, metrics["metrics"]
    out = str(work / "segments")
    manifest = read_manifest(out)
    inputs = sorted(str(p) for p in (work / "fresh" / "train" / "images").iterdir())
    uris = [u for f in committed_files(out) for u in pq.read_table(f).column("uri").to_pylist()]
    assert sorted(uris) == inputs and len(inputs) == 8
    assert manifest["counts"]["images"] == 8
    overlays = list((work / "overlays").glob("*.png"))
    assert 1 <= len(overlays) <= 6
    ap_line = next(line for line in first.splitlines() if "maskrcnn demo finished" in line)
    assert f"segm AP {metrics['metrics']['segm']['AP']:.3f}" in ap_line
    assert str(work / "segments") in first.split("maskrcnn demo finished", 1)[1]

    # A second run reuses every expensive product: same files, same run.
    model_mtime = model.stat().st_mtime_ns
    images_mtime = (work / "fresh" / "train" / "images").stat().st_mtime_ns
    second, second_seconds = _demo(work, timeout=240)
    assert second.count("reusing ") >= 4, second[-3000:]
    assert "train: iter" not in second
    assert "nothing to do" in second
    assert model.stat().st_mtime_ns == model_mtime
    assert (work / "fresh" / "train" / "images").stat().st_mtime_ns == images_mtime
    assert read_manifest(out)["run_id"] == manifest["run_id"]
    assert second_seconds < first_seconds / 2
