"""Fast mode's cost in COCO AP: fp32 against fast=True on a trained model, same images.

Trains the tiny preset on shapes with the demo's recipe (1,000 128 px training
images, 1,000 iterations, 2 workers of batch 4, bf16 autocast, lr 0.02 after a
100-iteration warm-up; see jobs/demo.py) unless given ``--model``, then
evaluates that model twice, fp32 and fast mode, on the same 200 held-out
images with pycocotools (pipeline/output/evaluate.py), and records bbox and
segm AP of each and their difference in points (target: |difference| <= 0.3).

    PYTHONPATH=. .venv/bin/python bench/fast_ap_bench.py [--model PATH] [--workdir DIR]

Merges a "fast_mode_ap" section into bench/results/model.json (the other keys,
bench/model_bench.py's, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, device_name  # noqa: E402

TARGET_POINTS = 0.3


def _cli(*argv: str) -> None:
    """Run `maskrcnn ARGV` from this checkout in a subprocess; raise when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("$ maskrcnn " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "jobs.cli", *argv], check=True, env=env)


def train(work: Path, val_images: int, iters: int) -> Path:
    """The demo's recipe, trained into ``work``; returns the model's path."""
    data = work / "shapes"
    if not (data / "val" / "annotations.json").is_file():
        _cli("shapes", str(data), "--images", "1000", "--size", "128", "--seed", "0",
             "--val-images", str(val_images))  # fmt: skip
    model = work / "runs" / "fast-ap" / "model.safetensors"
    if not model.is_file():
        _cli(
            "train", "--data", str(data / "train"), "--preset", "tiny", "--workers", "2",
            "--batch-size", "4", "--amp", "--iters", str(iters), "--lr", "0.02",
            "--warmup-iters", "100", "--storage", str(work / "runs"), "--name", "fast-ap",
            "--checkpoint-every", str(max(25, iters // 4)), "--keep-checkpoints", "1",
            "--log-every", str(max(1, iters // 20)),
        )  # fmt: skip
    return model


class _Fast:
    """The model as predict_coco_results sees it, with fast=True on every predict."""

    def __init__(self, model):
        self.model, self.cfg, self.device = model, model.cfg, model.device

    def predict(self, images, **kw):
        return self.model.predict(images, fast=True, **kw)


def evaluate(model_path: Path, data: Path, val_images: int) -> dict:
    """bbox and segm AP (0..1) of fp32 and fast mode on the held-out images."""
    from maskrcnn.checkpoint import load
    from pipeline.output.evaluate import coco_evaluate, predict_coco_results

    model = load(str(model_path)).eval()
    annotations = json.loads((data / "val" / "annotations.json").read_text())
    root = str(data / "val")  # file_name is images/NNNNNN.png
    found = {}
    for mode, runner in (("fp32", model), ("fast", _Fast(model))):
        start = time.perf_counter()
        results, ids, problems = predict_coco_results(runner, annotations, root, limit=val_images)
        if problems:
            raise RuntimeError(f"{len(problems)} images unusable, first: {problems[0]}")
        metrics = coco_evaluate(annotations, results, image_ids=ids)
        found[mode] = {
            "images": len(ids),
            "detections": len(results),
            "seconds": time.perf_counter() - start,
            **{f"{kind}_AP": metrics[kind]["AP"] for kind in ("bbox", "segm")},
            **{f"{kind}_AP50": metrics[kind]["AP50"] for kind in ("bbox", "segm")},
        }
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="a trained tiny-on-shapes checkpoint (default: train one)")
    p.add_argument("--workdir", default=str(REPO / "bench/data/fast-ap"))
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--iters", type=int, default=1000, help="training iterations (default 1000)")
    args = p.parse_args()
    work = Path(args.workdir)
    start = time.monotonic()
    reused = bool(args.model) or (work / "runs" / "fast-ap" / "model.safetensors").is_file()
    model = Path(args.model) if args.model else train(work, args.val_images, args.iters)
    trained_s = None if reused else time.monotonic() - start  # None: an earlier run trained it
    data = work / "shapes"
    if not (data / "val" / "annotations.json").is_file():
        _cli("shapes", str(data), "--images", "1000", "--size", "128", "--seed", "0",
             "--val-images", str(args.val_images))  # fmt: skip
    found = evaluate(model, data, args.val_images)
    diff = {
        kind: 100 * (found["fast"][f"{kind}_AP"] - found["fp32"][f"{kind}_AP"])
        for kind in ("bbox", "segm")
    }
    section = {
        "device": device_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(model),
        "recipe": None if args.model else f"demo recipe, {args.iters} iterations",
        "train_seconds": trained_s,
        "eval_images": found["fp32"]["images"],
        "fp32": found["fp32"],
        "fast": found["fast"],
        "ap_difference_points": diff,
        "target_abs_points": TARGET_POINTS,
        "meets_target": all(abs(d) <= TARGET_POINTS for d in diff.values()),
        "command": "PYTHONPATH=. python bench/fast_ap_bench.py",
    }
    path = RESULTS / "model.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**previous, "fast_mode_ap": section}, indent=2) + "\n")
    print(json.dumps(section, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
