"""CPU work per image on a GPU node: post-processing and decode, images/s per CPU core.

Post-processing is segment's encode_rows stage (paste the 28x28 mask probabilities into
the image, threshold, COCO RLE, Arrow rows) on COCO-like photos: 640x480, 15-20
detections each of mixed sizes (boxes 12..400 px, log-uniform), masks smooth blobs.
Decode is read_and_decode on 640x480 JPEGs, as GPU actors get them (uint8, not resized).
One thread, timed in process CPU seconds, so the figure is per core even on a shared machine; from it, the cores per GPU a node needs to keep
up with a GPU's images/s (NVIDIA's ~30 img/s A100 Mask R-CNN inference until
bench/gpu_check.py measures ours). Also the bytes per image that decode ships through
the object store: the model's float32 input against uint8 pixels.
Writes bench/results/postprocess.json.

    .venv/bin/python bench/postprocess_bench.py [--images 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, write_result  # noqa: E402

H, W, M = 480, 640, 28
A100_IMAGES_PER_S = 30.0  # NVIDIA's published Mask R-CNN inference rate, until ours is measured


def synthetic_detections(n_images: int, seed: int = 0) -> pa.Table:
    """A Segmenter output batch (see pipeline/segment/stages/model.py): n_images 640x480 images with
    15-20 detections each, boxes of mixed sizes, mask probabilities shaped like objects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:M, 0:M] / (M - 1) * 2 - 1
    cols: dict[str, list] = {k: [] for k in ("n", "boxes", "scores", "labels", "mask_probs")}
    for _ in range(n_images):
        k = int(rng.integers(15, 21))
        side = np.exp(rng.uniform(np.log(12), np.log(400), (k, 2)))
        x1 = rng.uniform(-0.1, 1.0, k) * (W - side[:, 0] * 0.5)
        y1 = rng.uniform(-0.1, 1.0, k) * (H - side[:, 1] * 0.5)
        boxes = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1).clip(0, [W, H, W, H])
        # An ellipse of random aspect, wobbled, through a sigmoid: runs like a real mask's.
        ax = rng.uniform(0.5, 1.0, (k, 1, 1))
        wobble = 0.15 * np.sin(3 * np.arctan2(yy, xx)[None] + rng.uniform(0, 6, (k, 1, 1)))
        r = np.sqrt((xx[None] / ax) ** 2 + (yy[None] * ax) ** 2) + wobble
        probs = 1 / (1 + np.exp(12 * (r - 0.8)))
        cols["n"].append(k)
        cols["boxes"].append(boxes.astype(np.float32).tobytes())
        cols["scores"].append(np.sort(rng.uniform(0.05, 1, k))[::-1].astype(np.float32).tobytes())
        cols["labels"].append(rng.integers(1, 91, k).astype(np.int64).tobytes())
        cols["mask_probs"].append(probs.astype(np.float32).tobytes())
    n = n_images
    return pa.table(
        {
            "uri": pa.array([f"mem://img{i:05d}.jpg" for i in range(n)]),
            "status": pa.array(["ok"] * n),
            "error": pa.array([None] * n, pa.string()),
            "width": pa.array([W] * n, pa.int32()),
            "height": pa.array([H] * n, pa.int32()),
            "n": pa.array(cols["n"], pa.int32()),
            **{k: pa.array(cols[k], pa.large_binary()) for k in cols if k != "n"},
        }
    )


def photo_jpegs(root: Path, n: int, size: tuple[int, int] = (H, W), seed: int = 0) -> list[str]:
    """n photo-like JPEGs (smooth colour fields with noise) under root; their paths."""
    from PIL import Image

    from tests.helpers.reference import smooth_images

    paths = []
    for i, im in enumerate(smooth_images([size] * n, seed=seed)):
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
        path = root / f"photo{i:04d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    return paths


def shipped_bytes(paths: list[str], cfg, resize: str) -> float:
    """Mean bytes per image of read_and_decode's image column (what the object store carries)."""
    from pipeline.segment.stages.decode import read_and_decode

    out = read_and_decode(pa.table({"uri": paths}), storage_options=None, cfg=cfg, resize=resize)
    return float(np.mean([len(v.as_py()) for v in out.column("image")]))


def cpu_seconds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of this process per call, round-robin: on one thread, per core rates that
    other processes on a shared machine do not dilute (wall time does)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from maskrcnn.config import MaskRCNNConfig
    from maskrcnn.masks import paste_masks
    from pipeline.segment.stages.decode import read_and_decode
    from pipeline.segment.stages.encode import encode_rows

    cfg = MaskRCNNConfig.preset("r50-fpn", num_classes=91)
    dets = synthetic_detections(args.images)
    names = [f"c{i}" for i in range(91)]

    def post():
        encode_rows(dets, class_names=names, model_id="m", mask_threshold=0.5)

    probs = [
        torch.from_numpy(np.frombuffer(b.as_py(), np.float32).reshape(-1, M, M).copy())
        for b in dets.column("mask_probs")
    ]
    boxes = [
        torch.from_numpy(np.frombuffer(b.as_py(), np.float32).reshape(-1, 4).copy())
        for b in dets.column("boxes")
    ]

    def paste_only():
        for p, b in zip(probs, boxes):
            paste_masks(p, b, H, W, 0.5)

    with tempfile.TemporaryDirectory() as tmp:
        paths = photo_jpegs(Path(tmp), args.images)

        def decode():
            read_and_decode(
                pa.table({"uri": paths}), storage_options=None, cfg=cfg, resize="smaller"
            )

        post()  # warm-up
        times = cpu_seconds(
            {"postprocess": post, "paste": paste_only, "decode": decode}, args.repeats
        )
        bytes_float = shipped_bytes(paths[:4], cfg, "always")
        bytes_uint8 = shipped_bytes(paths[:4], cfg, "smaller")
        big = photo_jpegs(Path(tmp), 2, size=(3000, 4000), seed=1)
        big_float, big_sent = shipped_bytes(big, cfg, "always"), shipped_bytes(big, cfg, "smaller")

    rate = {k: args.images / median(v) for k, v in times.items()}
    cores = A100_IMAGES_PER_S / rate["postprocess"] + A100_IMAGES_PER_S / rate["decode"]
    detections = int(np.sum(dets.column("n").to_numpy()))
    result = {
        "images": args.images,
        "detections_per_image": detections / args.images,
        "postprocess_images_per_s_per_core": round(rate["postprocess"], 2),
        "paste_threshold_images_per_s_per_core": round(rate["paste"], 2),
        "decode_640x480_jpeg_images_per_s_per_core": round(rate["decode"], 2),
        "gpu_rate_assumed_images_per_s": A100_IMAGES_PER_S,
        "postprocess_cores_per_gpu": round(A100_IMAGES_PER_S / rate["postprocess"], 2),
        "decode_cores_per_gpu": round(A100_IMAGES_PER_S / rate["decode"], 2),
        "cpu_cores_per_gpu": math.ceil(cores),
        "object_store_bytes_per_image_640x480": {
            "float32_model_input": bytes_float,
            "shipped_to_gpu_actors": bytes_uint8,
            "ratio": round(bytes_float / bytes_uint8, 2),
        },
        "object_store_bytes_per_image_4000x3000": {
            "float32_model_input": big_float,
            "shipped_to_gpu_actors": big_sent,
        },
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "load_avg": list(__import__("os").getloadavg()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = write_result("postprocess", result)
    for key, value in result.items():
        if key != "seconds":
            print(f"{key}: {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
