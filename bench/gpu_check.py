"""Every GPU figure in one run of at most 8 minutes on one GPU (a short device lease).

Sections, each with its own time budget (one that would overrun is recorded as skipped):

1. tests: `pytest -m gpu tests/gpu` (CPU parity, fast tolerance, AMP step, paste/RLE
   bytes, model id), pass/fail per test.
2. model: images/s at batch 8 on ~800x1067 images: ours fp32, fast (bf16, fp16 before
   Ampere), fp32 + TF32, against torchvision's Mask R-CNN fp32 on identical calibrated
   weights (targets: fp32 >= 2x, fast >= 4x); and how far fast and TF32 move detections
   from fp32 (the effect of --tf32 the README documents).
3. train: training images/s per GPU, r50-fpn at 800 px, AMP, batch 4 (NVIDIA's PyTorch
   Mask R-CNN: about 24 img/s on an A100).
4. stages: segment's stages without Ray on 640x480 JPEG photos with N CPU threads:
   read_and_decode (uint8 to the GPU actor), Segmenter, encode_rows, images/s each; the
   bytes per image decode ships; and mask pasting + threshold + bit-packing on the GPU
   against pasting on the CPU (the measurement that decides whether GPU actors should
   paste; they do not yet).

Writes bench/results/<device>-gpu.json (and a copy under --copy-to, e.g. $OUT).
Needs torch, torchvision, numpy, Pillow, safetensors, pyarrow, fsspec, pycocotools and
pytest, no Ray; it checks for them before any section starts. On the device machine
(Python 3.12, torch 2.11, no registry) all but pycocotools are there; pycocotools 2.0.11
(constraints.txt's) travels as a cp312 manylinux wheel in .whl/, fetched here with
``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11``, and the call carries
.whl::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
      make gpu-check PY_GPU=python3 GPU_CHECK_ARGS="--copy-to $OUT"

(`make test-gpu PY_GPU=python3` runs the tests alone; both keep that PYTHONPATH.)

``--dry-run`` runs every section on CPU at toy sizes (proves nothing is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import device_name, interleaved, median  # noqa: E402
from tests.helpers.gpu_cases import (  # noqa: E402
    FAST,
    FP32,
    matched_fraction,
    set_strict_fp32,
    shapes_batch,
)
from tests.helpers.reference import build_torchvision, calibrate, smooth_images  # noqa: E402

TOTAL_BUDGET_S = 480
# What the sections import besides torch, numpy and pyarrow (imported above), by import name.
NEEDS_MODULES = ("torchvision", "PIL", "safetensors", "fsspec", "pycocotools", "pytest")
# Seconds each section may start with: it is skipped when less of the total is left.
NEEDS_S = {"tests": 60, "model": 90, "train": 60, "stages": 60}


class Sizes:
    """Full sizes for a GPU, toy ones for --dry-run on CPU."""

    def __init__(self, dry: bool):
        self.batch = 2 if dry else 8
        self.image = (240, 320) if dry else (800, 1067)
        self.min_max = (240, 320) if dry else (800, 1333)
        self.repeats = 1 if dry else 5
        self.train_preset = "tiny" if dry else "r50-fpn"
        self.train_px, self.train_batch, self.train_steps = (128, 2, 2) if dry else (800, 4, 10)
        self.photos = 4 if dry else 64
        self.threads = 2 if dry else min(8, os.cpu_count() or 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    from pipeline.segment.stages.model import set_tf32 as stages_set_tf32

    stages_set_tf32(on)


# --- 1. tests -------------------------------------------------------------------------


def run_tests(dev: torch.device, sz: Sizes) -> dict:
    env = {
        **os.environ,
        "GPU_TEST_DEVICE": str(dev),
        "PYTHONPATH": f"{REPO}:" + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/gpu",
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
    ]
    if dev.type == "cpu":  # dry run: the wiring, not the CPU-slow cases
        cmd += ["-k", "keeps_its_id"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    outcome = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR) (\S+)", line)
        if m:
            outcome[m[2].split("::")[-1]] = m[1]
    return {"returncode": proc.returncode, "tests": outcome, "tail": proc.stdout[-1500:]}


# --- 2. model -------------------------------------------------------------------------


def model_speed(dev: torch.device, sz: Sizes) -> dict:
    from maskrcnn.checkpoint import from_torchvision

    images = smooth_images([sz.image] * sz.batch, seed=11)
    tv = build_torchvision("v1", 91).to(dev)
    calibrate(tv, [im.to(dev).float() / 255 for im in images[:4]])
    tv.transform.min_size, tv.transform.max_size = (sz.min_max[0],), sz.min_max[1]
    ours = from_torchvision(tv.state_dict(), variant="v1").to(dev).eval()
    ours.cfg.min_size, ours.cfg.max_size = sz.min_max
    images = [im.to(dev) for im in images]
    floats = [im.float() / 255 for im in images]

    def tv_fp32():
        set_tf32(False)
        with torch.inference_mode():
            return tv(floats)

    def ours_fp32():
        set_tf32(False)
        return ours.predict(images)

    def ours_tf32():
        set_tf32(True)
        return ours.predict(images)

    def ours_fast():
        set_tf32(False)
        return ours.predict(images, fast=True)

    fns = {"torchvision_fp32": tv_fp32, "ours_fp32": ours_fp32, "ours_fast": ours_fast}
    if dev.type == "cuda":
        fns["ours_tf32"] = ours_tf32
    outs = {k: fn() for k, fn in fns.items()}  # warm-up (cuDNN choice) and the accuracy check
    times = interleaved(fns, sz.repeats, sync=lambda: sync(dev))
    set_tf32(False)
    rate = {k: sz.batch / median(v) for k, v in times.items()}
    tv_out = [{**o, "masks": o["masks"][:, 0] > 0.5} for o in outs["torchvision_fp32"]]
    moved = {
        k: dict(zip(("fraction", "detections"), matched_fraction(outs["ours_fp32"], outs[k], FAST)))
        for k in fns
        if k.startswith("ours_") and k != "ours_fp32"
    }
    strict = {k: matched_fraction(outs["ours_fp32"], outs[k], FP32)[0] for k in moved}
    return {
        "batch": sz.batch,
        "image": list(sz.image),
        "images_per_s": {k: round(v, 2) for k, v in rate.items()},
        "vs_torchvision_fp32": {
            k: round(v / rate["torchvision_fp32"], 2)
            for k, v in rate.items()
            if k != "torchvision_fp32"
        },
        "targets": {"ours_fp32": 2.0, "ours_fast": 4.0},
        "fp32_matches_torchvision": matched_fraction(tv_out, outs["ours_fp32"], FP32)[0],
        "against_our_fp32_fast_tolerance": moved,
        "against_our_fp32_parity_criteria": strict,
        "fast_dtype": str(__import__("maskrcnn.model", fromlist=["fast_dtype"]).fast_dtype(dev)),
        "seconds": times,
    }


# --- 3. train -------------------------------------------------------------------------


def train_speed(dev: torch.device, sz: Sizes) -> dict:
    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from pipeline.train.amp import amp_mode, autocast, fast_path, grad_scaler

    cfg = MaskRCNNConfig.preset(sz.train_preset, num_classes=4)
    cfg.min_size, cfg.max_size = sz.train_px, int(sz.train_px * 1333 / 800)
    torch.manual_seed(0)
    model = MaskRCNN(cfg).to(dev).train()
    images, targets = shapes_batch(sz.train_batch, sz.train_px, seed=2)
    images = [im.to(dev) for im in images]
    mode = amp_mode(True, dev)
    scaler = grad_scaler(mode, dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast(mode, dev):
            loss = sum(model(images, targets, fast=fast_path(mode)).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    first = [step() for _ in range(3)]  # warm-up
    sync(dev)
    t = time.perf_counter()
    last = [step() for _ in range(sz.train_steps)]
    sync(dev)
    seconds = time.perf_counter() - t
    return {
        "preset": sz.train_preset,
        "px": sz.train_px,
        "batch": sz.train_batch,
        "amp": mode,
        "images_per_s": round(sz.train_batch * sz.train_steps / seconds, 2),
        "reference_nvidia_a100_images_per_s": 24,
        "loss_first_last": [first[0], last[-1]],
    }


# --- 4. stages ------------------------------------------------------------------------


def _in_threads(fn, batches: list, threads: int) -> tuple[list, float]:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(fn, batches))
    return out, time.perf_counter() - t


def pack_on_device(mask_probs, boxes, height: int, width: int, threshold: float):
    """GPU pasting: paste + threshold on the device, bit-pack, one device-to-host copy."""
    from maskrcnn.masks import paste_masks

    masks = paste_masks(mask_probs, boxes, height, width, threshold)
    flat = masks.reshape(masks.shape[0], -1)
    pad = (-flat.shape[1]) % 8
    flat = torch.nn.functional.pad(flat, (0, pad)).view(flat.shape[0], -1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    packed = (flat * weights).sum(-1, dtype=torch.uint8).cpu().numpy()
    bits = np.unpackbits(packed, axis=1)[:, : height * width]
    return bits.reshape(-1, height, width).astype(bool)


def stages_speed(dev: torch.device, sz: Sizes) -> dict:
    from bench.postprocess_bench import photo_jpegs
    from maskrcnn.checkpoint import from_torchvision, state_dict_bytes
    from maskrcnn.masks import paste_masks
    from pipeline.segment.stages.decode import read_and_decode
    from pipeline.segment.stages.encode import encode_rows
    from pipeline.segment.stages.model import Segmenter

    tv = build_torchvision("v1", 91).to(dev)
    calib = smooth_images([sz.image if sz.batch < 8 else (480, 640)] * 2, seed=4)
    calibrate(tv, [im.to(dev).float() / 255 for im in calib])
    model = from_torchvision(tv.state_dict(), variant="v1")
    del tv
    if sz.min_max[0] < 800:
        model.cfg.min_size, model.cfg.max_size = sz.min_max
    weights = state_dict_bytes(model)
    torch.set_num_threads(1)  # the CPU stages' threads each do one image batch
    with tempfile.TemporaryDirectory() as tmp:
        paths = photo_jpegs(Path(tmp), sz.photos, seed=5)
        batches = [pa.table({"uri": paths[i : i + 8]}) for i in range(0, len(paths), 8)]

        def decode(b):
            return read_and_decode(b, storage_options=None, cfg=model.cfg, resize="smaller")

        decode(batches[0])
        decoded, t_decode = _in_threads(decode, batches, sz.threads)
    shipped = float(np.mean([len(v.as_py()) for d in decoded for v in d.column("image")]))
    result = {
        "threads": sz.threads,
        "photos": sz.photos,
        "bytes_per_image_shipped": shipped,
        "bytes_per_image_float32_input": 4 * 3 * 800 * 1066,
    }
    result["decode_images_per_s"] = round(sz.photos / t_decode, 2)
    for fast in (False, True):
        seg = Segmenter(weights, score_threshold=None, max_detections=20, fast=fast, threads=0)
        seg(decoded[0])
        sync(dev)
        t = time.perf_counter()
        dets = [seg(d) for d in decoded]
        sync(dev)
        result[f"segmenter_{'fast' if fast else 'fp32'}_images_per_s"] = round(
            sz.photos / (time.perf_counter() - t), 2
        )
    names = model.cfg.label_names

    def encode(d):
        return encode_rows(d, class_names=names, model_id="m", mask_threshold=0.5)

    _, t_encode = _in_threads(encode, dets, sz.threads)
    result["encode_rows_images_per_s"] = round(sz.photos / t_encode, 2)
    result["detections_per_image"] = float(
        np.mean([n for d in dets for n in d.column("n").to_pylist()])
    )
    # Pasting on the device against the CPU, from the same detections of one actor batch.
    seg = Segmenter(weights, score_threshold=None, max_detections=20, fast=False, threads=0)
    images = seg._inputs(decoded[0], list(range(decoded[0].num_rows)))
    sizes = [(480, 640)] * len(images)
    out = seg.model.predict(images, original_sizes=sizes, paste_masks=False)

    def gpu_paste():
        return [pack_on_device(o["mask_probs"], o["boxes"], 480, 640, 0.5) for o in out]

    host = [(o["mask_probs"].cpu(), o["boxes"].cpu()) for o in out]

    def cpu_paste():
        return [paste_masks(p, b, 480, 640, 0.5).numpy() for p, b in host]

    same = all(np.array_equal(a, b) for a, b in zip(gpu_paste(), cpu_paste()))
    times = interleaved({"gpu_paste_pack_copy": gpu_paste, "cpu_paste": cpu_paste}, sz.repeats)
    result["paste_images_per_s"] = {k: round(len(out) / median(v), 2) for k, v in times.items()}
    result["gpu_paste_equals_cpu"] = same
    return result


# --- driver ---------------------------------------------------------------------------


def missing_modules() -> list[str]:
    """The NEEDS_MODULES this Python cannot import: checked before any section starts, so
    that a missing one (pycocotools not carried) costs no device time."""
    import importlib.util

    return [m for m in NEEDS_MODULES if importlib.util.find_spec(m) is None]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, result in a temp dir")
    ap.add_argument("--only", nargs="*", choices=list(NEEDS_S), help="run only these sections")
    ap.add_argument("--copy-to", help="also copy the JSON here (e.g. $OUT on the device)")
    args = ap.parse_args()
    start = time.perf_counter()
    missing = missing_modules()
    if missing:
        sys.exit(
            f"gpu_check: {sys.executable} cannot import {', '.join(missing)}: carry them as "
            "wheels in .whl/ and install them with the command in this script's docstring"
        )
    if args.dry_run:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit(
            f"gpu_check: no CUDA device visible to torch {torch.__version__} (--dry-run for CPU)"
        )
    else:
        dev = torch.device("cuda")
    set_strict_fp32()
    sz = Sizes(args.dry_run)
    threads_before = torch.get_num_threads()
    result = {
        "device": device_name() if dev.type == "cuda" else f"dry run: {device_name()}",
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dev.type == "cuda":
        result["capability"] = list(torch.cuda.get_device_capability(dev))
    for name, fn in (
        ("tests", run_tests),
        ("model", model_speed),
        ("train", train_speed),
        ("stages", stages_speed),
    ):
        if args.only and name not in args.only:
            continue
        left = TOTAL_BUDGET_S - (time.perf_counter() - start)
        if left < NEEDS_S[name] and not args.dry_run:  # a dry run proves every section
            result[name] = {"skipped": f"{left:.0f} s of the {TOTAL_BUDGET_S} s budget left"}
            continue
        t = time.perf_counter()
        try:
            result[name] = fn(dev, sz)
        except Exception as exc:  # one broken section must not cost the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        torch.set_num_threads(threads_before)
        result[name]["section_seconds"] = round(time.perf_counter() - t, 1)
        print(f"gpu_check: {name} done in {result[name]['section_seconds']} s", flush=True)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")[:40]
    out_dir = Path(tempfile.mkdtemp()) if args.dry_run else REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{'dry-run' if args.dry_run else slug}-gpu.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.copy_to:
        shutil.copy(path, Path(args.copy_to) / path.name)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "model"}
            | {"model": {k: v for k, v in result.get("model", {}).items() if k != "seconds"}},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
