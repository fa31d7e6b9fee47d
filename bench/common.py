"""Shared benchmark helpers: timing by interleaved repeats, results files, detection matching."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, CPU)"


def interleaved(fns: dict[str, Any], repeats: int, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin so that machine noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pair_detections(
    ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each ref detection, its best same-label box in out: (box IoU, |score diff|, mask IoU).

    Each fp32 [N]. Masks are bool [N, H, W] (or float probabilities thresholded at 0.5).
    Both sides need at least one detection.
    """
    n = len(ref["boxes"])
    iou = box_iou(ref["boxes"].float(), out["boxes"].float())
    iou = iou * (ref["labels"][:, None] == out["labels"][None, :])
    best, j = iou.max(1)
    rm = ref["masks"] if ref["masks"].dtype == torch.bool else ref["masks"] > 0.5
    om = out["masks"][j] if out["masks"].dtype == torch.bool else out["masks"][j] > 0.5
    rm, om = rm.reshape(n, -1), om.reshape(n, -1)
    inter = (rm & om).sum(1).float()
    union = (rm | om).sum(1).float()
    mask_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return best, (ref["scores"] - out["scores"][j]).abs(), mask_iou


def match_detections(
    ref: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    box_iou_min: float = 0.99,
    score_tol: float = 1e-3,
    mask_iou_min: float = 0.97,
) -> tuple[int, int]:
    """(matched, total): ref detections with a same-label match in out (box IoU, score, mask IoU)."""
    n = len(ref["boxes"])
    if n == 0 or len(out["boxes"]) == 0:
        return 0, n
    box, score, mask = pair_detections(ref, out)
    ok = (box >= box_iou_min) & (score <= score_tol) & (mask >= mask_iou_min)
    return int(ok.sum()), n


def machine_info(load_before: Any, load_after: Any) -> dict[str, Any]:
    """The "machine" record of a result: the CPU, platform and the load around the run."""
    return {
        "device": device_name(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
