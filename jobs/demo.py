"""`maskrcnn demo [--workdir DIR]`: the whole loop on one machine, on an embedded Ray.

    shapes dataset -> train (tiny preset, Ray Train, 2 workers) -> evaluate (COCO AP)
      -> segment fresh images (Ray Data) -> SQL queries -> PNG overlays -> where it all is

Each step runs the real command in-process (the same code as `maskrcnn <step>`)
and prints the command line, so what the demo does can be repeated by hand. A
second run reuses what the first made when that is still correct: a dataset
whose settings did not change, a trained model of the same settings (an
interrupted training run continues from its last checkpoint), a finished
segment output of the same model and images, their evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.args import positive_int

HELP = "run the whole loop locally: shapes data, train, evaluate, segment, query, render"

QUERIES = [
    (
        "images by status",
        "SELECT status, count(*) AS images FROM images GROUP BY 1 ORDER BY 1",
    ),
    (
        "objects per class",
        "SELECT label_name, count(*) AS objects, round(avg(score), 3) AS mean_score, "
        "round(avg(area), 1) AS mean_area_px FROM instances WHERE score >= 0.5 "
        "GROUP BY 1 ORDER BY objects DESC",
    ),
    (
        "the most crowded images",
        "SELECT regexp_extract(uri, '[^/]*$') AS image, count(*) AS objects, "
        "string_agg(label_name, ', ' ORDER BY score DESC) AS classes FROM instances "
        "WHERE score >= 0.5 GROUP BY uri ORDER BY objects DESC, uri LIMIT 5",
    ),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", default="demo", metavar="DIR", help="where everything goes (default ./demo)"
    )
    p.add_argument(
        "--train-images", type=positive_int, default=1000, help="training images (default 1000)"
    )
    p.add_argument(
        "--val-images", type=positive_int, default=50, help="images evaluated (default 50)"
    )
    p.add_argument(
        "--train-iters", type=positive_int, default=1000, help="training iterations (default 1000)"
    )
    p.add_argument(
        "--images", type=positive_int, default=100, help="fresh images to segment (default 100)"
    )
    p.add_argument(
        "--size", type=positive_int, default=128, help="image side in pixels (default 128)"
    )


class _Steps:
    """Numbered, timed step headers, so progress is visible in a plain log."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.monotonic()

    def __call__(self, title: str) -> None:
        self.n += 1
        elapsed = time.monotonic() - self.start
        print(f"\n=== [{self.n}/{self.total}] {title}  (demo time {elapsed:.0f}s)", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _command(argv: list[str]) -> int:
    """Run `maskrcnn ARGV` in this process, printing the command line first."""
    from jobs.cli import main

    print("$ maskrcnn " + shlex.join(argv), flush=True)
    code = main(argv)
    sys.stdout.flush()
    return code


def _settings_path(folder: Path) -> Path:
    return folder / "demo-settings.json"


def _dataset(folder: Path, settings: dict, splits: list[str]) -> bool:
    """Make the shapes dataset in ``folder`` unless it holds one of these settings;
    returns True when it was (re)made."""
    stamp = _settings_path(folder)
    have = all((folder / s / "annotations.json").is_file() for s in splits)
    if have and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"reusing {folder} (same settings: {settings})")
        return False
    stamp.unlink(missing_ok=True)  # a half-made dataset never looks finished
    argv = ["shapes", str(folder), "--images", str(settings["images"])]
    argv += ["--size", str(settings["size"]), "--seed", str(settings["seed"])]
    if settings.get("val_images"):
        argv += ["--val-images", str(settings["val_images"])]
    if _command(argv) != 0:
        raise RuntimeError("making the shapes dataset failed (see above)")
    stamp.write_text(json.dumps(settings))
    return True


def _train_argv(data: Path, runs: Path, name: str, iters: int) -> list[str]:
    # The recipe of bench/train_bench.py's quality run (segm AP 0.75 after 1,400 iterations),
    # shortened: a global batch of 8 in bf16 autocast, lr 0.02 after a linear warm-up.
    return [
        "train", "--data", str(data / "train"), "--preset", "tiny",
        "--workers", "2", "--batch-size", "4", "--amp", "--iters", str(iters), "--lr", "0.02",
        "--warmup-iters", str(min(100, max(1, iters // 5))),
        "--storage", str(runs), "--name", name,
        "--checkpoint-every", str(max(25, iters // 4)), "--keep-checkpoints", "1",
        "--log-every", str(max(1, iters // 20)),
    ]  # fmt: skip


def _segment_must_overwrite(out: Path, model: str, fresh_remade: bool) -> bool:
    """Whether OUTPUT holds a run of another model or of images that were remade."""
    if not out.exists():
        return False
    if fresh_remade:
        return True
    if (out / "_delta_log").is_dir():
        from pipeline.output.schema import read_manifest

        return read_manifest(str(out)).get("model") != model
    path = out / "_run" / "run.json"
    if path.is_file():
        return json.loads(path.read_text()).get("model") != model
    return False


def _metrics_current(metrics: Path, model_path: Path) -> dict | None:
    """The saved evaluation of this very model file, if there is one."""
    if not metrics.is_file() or metrics.stat().st_mtime < model_path.stat().st_mtime:
        return None
    report = json.loads(metrics.read_text())
    return report if report.get("model_uri") == str(model_path) else None


def _init_ray() -> None:
    import ray

    from pipeline.cluster import start_local_ray

    if ray.is_initialized():
        return
    # Always an embedded instance, even with RAY_ADDRESS set. Logical CPUs for 2 train
    # workers + the Train controller even on a 2-core machine. The dashboard stays on:
    # Ray Train's placement-group cleaner asks the state API it serves whether the
    # controller lives, and warns every second when it cannot.
    start_local_ray(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True)


@dataclass(frozen=True)
class _Paths:
    """Where each step's output goes, under the work folder."""

    work: Path
    data: Path
    fresh: Path
    runs: Path
    out: Path
    overlays: Path
    metrics: Path

    @classmethod
    def under(cls, work: Path) -> _Paths:
        return cls(
            work, data=work / "shapes", fresh=work / "fresh", runs=work / "runs",
            out=work / "segments", overlays=work / "overlays", metrics=work / "metrics.json",
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    steps = _Steps(7)
    paths = _Paths.under(Path(args.workdir).resolve())
    paths.work.mkdir(parents=True, exist_ok=True)
    print(f"maskrcnn demo: everything goes to {paths.work}")

    steps("shapes dataset for training and evaluation")
    data_settings = _training_data(args, paths)
    steps("train the tiny preset with Ray Train (2 workers, DDP on CPU)")
    model_path = _train(args, paths, data_settings)
    if model_path is None:
        return 1
    steps("evaluate: COCO bbox and mask AP on the validation images")
    ap = _evaluate(paths, model_path)
    if ap is None:
        return 1
    steps("segment fresh images with Ray Data into Parquet")
    if not _segment(args, paths, model_path):
        return 1
    steps("query the results with SQL (DuckDB, read-only)")
    if not _query(paths):
        return 1
    steps("render overlays")
    if not _render(paths):
        return 1
    steps("done")
    _summary(paths, model_path, ap, steps.elapsed())
    return 0


def _training_data(args: argparse.Namespace, paths: _Paths) -> dict:
    """Step 1: the train and val splits; returns their settings."""
    data_settings = {
        "images": args.train_images, "val_images": args.val_images,
        "size": args.size, "seed": 0,
    }  # fmt: skip
    _dataset(paths.data, data_settings, ["train", "val"])
    return data_settings


def _train(args: argparse.Namespace, paths: _Paths, data_settings: dict) -> Path | None:
    """Step 2: the trained model's path (reused when these settings trained one), or None
    when training failed."""
    train_settings = {"data": data_settings, "iters": args.train_iters, "v": 2}
    digest = hashlib.sha256(json.dumps(train_settings, sort_keys=True).encode()).hexdigest()
    name = f"tiny-shapes-{digest[:8]}"
    model_path = paths.runs / name / "model.safetensors"
    if model_path.is_file():
        print(f"reusing {model_path} (trained with the same settings)")
        return model_path
    _init_ray()
    if _command(_train_argv(paths.data, paths.runs, name, args.train_iters)) != 0:
        return None
    return model_path


def _evaluate(paths: _Paths, model_path: Path) -> dict[str, float] | None:
    """Step 3: AP per IoU type (the saved evaluation of this model when there is one), or
    None when evaluation failed."""
    report = _metrics_current(paths.metrics, model_path)
    if report is not None:
        print(f"reusing {paths.metrics} (evaluation of this model)")
    else:
        argv = ["evaluate", "--model", str(model_path), "--annotations"]
        argv += [str(paths.data / "val" / "annotations.json"), "--output", str(paths.metrics)]
        if _command(argv) != 0:
            return None
        report = json.loads(paths.metrics.read_text())
    return {kind: m["AP"] for kind, m in report["metrics"].items()}


def _segment(args: argparse.Namespace, paths: _Paths, model_path: Path) -> bool:
    """Step 4: fresh images, segmented into paths.out; False when segment failed."""
    from pipeline.output.checkpoint import checkpoint_model_id

    model = checkpoint_model_id(str(model_path))
    fresh_settings = {"images": args.images, "size": args.size, "seed": 1}
    fresh_remade = _dataset(paths.fresh, fresh_settings, ["train"])
    out = paths.out
    argv = ["segment", str(paths.fresh / "train" / "images"), str(out)]
    argv += ["--model", str(model_path), "--batch-size", "4", "--rows-per-part", "50"]
    if _segment_must_overwrite(out, model, fresh_remade):
        print(f"{out} holds results of another model or other images: replacing them")
        argv.append("--overwrite")
    if not (out / "_delta_log").is_dir() or "--overwrite" in argv:
        _init_ray()  # work to do: on the embedded instance (segment would use RAY_ADDRESS)
    return _command(argv) == 0


def _query(paths: _Paths) -> bool:
    """Step 5: the QUERIES over the results; False when one failed."""
    for title, sql in QUERIES:
        print(f"-- {title}")
        if _command(["query", str(paths.out), sql, "--max-rows", "10"]) != 0:
            return False
    return True


def _render(paths: _Paths) -> bool:
    """Step 6: a few overlays; False when render failed."""
    argv = ["render", str(paths.out), str(paths.overlays), "--limit", "6", "--min-score", "0.5"]
    return _command(argv) == 0


def _summary(paths: _Paths, model_path: Path, ap: dict[str, float], seconds: float) -> None:
    aps = ", ".join(f"{kind} AP {value:.3f}" for kind, value in ap.items())
    work, data, fresh, out = paths.work, paths.data, paths.fresh, paths.out
    metrics, overlays = paths.metrics, paths.overlays
    print(
        f"""maskrcnn demo finished in {seconds:.0f}s; {aps}

  training data    {data}/train (+ val), COCO format
  model            {model_path}
  evaluation       {metrics}
  segmented images {fresh}/train/images
  Parquet output   {out}  (a Delta table: `maskrcnn history {out}` lists its versions)
  overlays         {overlays}

Look further:
  maskrcnn query {out} "SELECT * FROM instances ORDER BY score DESC LIMIT 10"
  maskrcnn query {out} "SELECT label_name, count(*) FROM instances GROUP BY 1" --format csv
  maskrcnn render {out} {work}/overlays-triangles --where "len(list_filter(instances, lambda x: x.label_name = 'triangle' AND x.score >= 0.5)) > 0"
  maskrcnn evaluate --model {model_path} --annotations {data}/val/annotations.json
  maskrcnn export-coco {out} {work}/results.json
  maskrcnn --help"""
    )
