"""Fine-tuning benchmark: does starting from a pretrained model beat starting from scratch?

    1. pretrain the tiny preset on shapes {square, circle, triangle} (2 workers)
    2. new data: shapes {circle, star, cross}: one class kept, two new
    3. the kept class's AP before any fine-tuning step (the init alone, on the new
       held-out images) against its AP in the pretrained model (on its own held-out images)
    4. the same small budget (--iters, default 300) from the pretrained model
       (`maskrcnn train --init`) and from scratch (`--preset tiny`): segm AP on the
       new held-out images (--val-images, default 200)

Targets: fine-tuned segm AP >= 2x the from-scratch AP; kept class AP at step 0 >=
0.8x its pretrained AP. Writes bench/results/finetune.json after every phase, so a
run cut short still leaves what it reached.

    PYTHONPATH=. .venv/bin/python bench/finetune_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, write_result  # noqa: E402

PRETRAIN_CLASSES, NEW_CLASSES, KEPT = "square,circle,triangle", "circle,star,cross", "circle"


def cli(*args: str, log: Path) -> int:
    """`maskrcnn ARGS` with this interpreter and this checkout, output appended to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    print("finetune:", "maskrcnn", " ".join(args), flush=True)
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def shapes(root: Path, classes: str, seed: int, args, log: Path) -> Path:
    if not (root / "val" / "annotations.json").exists():
        cli("shapes", str(root), "--images", str(args.images), "--val-images",
            str(args.val_images), "--size", str(args.size), "--seed", str(seed),
            "--classes", classes, log=log)  # fmt: skip
    return root


def train(name: str, data: Path, iters: int, args, log: Path, *model: str) -> dict[str, Any]:
    """One `maskrcnn train` run of 2 workers; its summary (with the wall time)."""
    for _attempt in range(3):  # a loaded machine can miss Ray's 30 s node start-up wait
        start = time.perf_counter()
        rc = _train_once(name, data, iters, args, log, *model)
        if rc == 0 or "timed out during startup" not in log.read_text()[-2000:]:
            break
    wall = time.perf_counter() - start
    last = sorted((Path(args.run_dir) / name).glob("checkpoint_0*"))
    out: dict[str, Any] = {"exit_code": rc, "wall_s": round(wall, 1), "iterations": iters}
    if rc == 0 and last:
        m = json.loads((last[-1] / "state.json").read_text())["metrics"]
        out.update({k: round(m[k], 4) for k in ("segm_AP", "segm_AP50", "bbox_AP") if k in m})
        out["images_per_s"] = round(m["images_per_s"], 2)
    return out


def _train_once(name: str, data: Path, iters: int, args, log: Path, *model: str) -> int:
    return cli("train", "--data", str(data / "train"), "--val-data", str(data / "val"), *model,
             "--min-size", str(args.size), "--max-size", str(args.size),
             "--workers", str(args.workers), "--batch-size", str(args.batch_size),
             "--iters", str(iters), "--lr", str(args.lr), "--amp",
             "--checkpoint-every", str(iters), "--keep-checkpoints", "1",
             "--storage", str(args.run_dir), "--name", name, log=log)  # fmt: skip


def class_ap(model: Any, val: Path, name: str) -> float:
    """segm AP of one class on a held-out split (ground truth and detections of that class)."""
    from pipeline.output.evaluate import coco_evaluate, predictions_to_coco_results
    from pipeline.train.evaluator import Evaluator

    ev = Evaluator(str(val), model.cfg.label_names, None)
    results = []
    for images, ids in ev._batches():
        preds = [{k: v.cpu() for k, v in p.items()} for p in model.predict(images)]
        results += predictions_to_coco_results(preds, ids, ev.label_map)
    cat = next(c["id"] for c in ev.data.categories if c["name"] == name)
    gt = dict(ev.data.coco.dataset)
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] == cat]
    mine = [r for r in results if r["category_id"] == cat]
    return round(coco_evaluate(gt, mine, iou_types=("segm",))["segm"]["AP"], 4)


def kept_class_at_step_0(pretrained: Path, old: Path, new: Path, args) -> dict[str, Any]:
    """The kept class's AP: pretrained model on its data; the init of the new run on the new data."""
    import torch

    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from maskrcnn.checkpoint import load
    from pipeline.formats.coco import CocoDataset
    from pipeline.train.init import load_init, read_init
    from pipeline.train.options import TrainOptions, init_record, model_config

    torch.set_num_threads(2)
    before = class_ap(load(str(pretrained)), old / "val", KEPT)
    names = CocoDataset(str(new / "train")).class_names
    opts = TrainOptions(data=str(new / "train"), init=str(pretrained),
                        min_size=args.size, max_size=args.size)  # fmt: skip
    init = read_init(str(pretrained), {})
    cfg = model_config(opts, names, init)
    record = init_record(opts, init, cfg, names)
    torch.manual_seed(0)
    model = MaskRCNN(MaskRCNNConfig.from_dict(cfg))
    load_init(model, init, record["pairs"])
    after = class_ap(model.eval(), new / "val", KEPT)
    return {"class": KEPT, "pretrained_AP": before, "step0_AP": after,
            "ratio": round(after / before, 3) if before > 0 else None,
            "classes": record["classes"]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-iters", type=int, default=600)
    p.add_argument("--iters", type=int, default=300, help="budget of both compared runs")
    p.add_argument("--images", type=int, default=1000, help="training images per dataset")
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="image side (and model input size)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--data-dir", default=str(REPO / "bench/data/finetune"))
    p.add_argument("--run-dir", default=str(REPO / "bench/data/finetune/runs"))
    args = p.parse_args()
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    tag = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {"args": vars(args), "log": str(log)}

    def save() -> None:
        print(json.dumps(result, indent=1), flush=True)
        write_result("finetune", result)

    old = shapes(root / "shapes-old", PRETRAIN_CLASSES, 0, args, log)
    new = shapes(root / "shapes-new", NEW_CLASSES, 1, args, log)
    result["pretrain"] = train(f"pretrain-{tag}", old, args.pretrain_iters, args, log,
                               "--preset", "tiny")  # fmt: skip
    save()
    pretrained = Path(args.run_dir) / f"pretrain-{tag}" / "model.safetensors"
    if not pretrained.exists():
        return 1
    result["kept_class"] = kept_class_at_step_0(pretrained, old, new, args)
    save()
    result["finetune"] = train(f"finetune-{tag}", new, args.iters, args, log,
                               "--init", str(pretrained))  # fmt: skip
    save()
    result["scratch"] = train(f"scratch-{tag}", new, args.iters, args, log, "--preset", "tiny")
    ft, sc = result["finetune"].get("segm_AP"), result["scratch"].get("segm_AP")
    kept = result["kept_class"]["ratio"]
    result["finetune_over_scratch_segm_AP"] = round(ft / sc, 2) if ft and sc else None
    result["targets"] = {"finetune_over_scratch": 2.0, "kept_class_step0_ratio": 0.8}
    result["met"] = bool(ft and sc and ft >= 2 * sc and kept is not None and kept >= 0.8)
    save()
    print(f"wrote {RESULTS / 'finetune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
