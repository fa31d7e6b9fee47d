"""The install is sound: the console script, torchvision's compiled ops, Ray Data."""

from __future__ import annotations

import subprocess

from conftest import VENV_BIN


def test_console_script_help_names_program():
    script = VENV_BIN / "maskrcnn"
    assert script.exists(), f"console script missing at {script}"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "maskrcnn" in proc.stdout
    assert "usage:" in proc.stdout


def test_torchvision_nms_compiled_op():
    import torch
    from torchvision.ops import nms

    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9.5]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = nms(boxes, scores, iou_threshold=0.5)
    # box 3 (0.95) suppresses 0 (IoU .95) and 1 (IoU ~.65); box 2 is apart.
    assert keep.tolist() == [3, 2]


def test_torchvision_roi_align_compiled_op():
    import torch
    from torchvision.ops import roi_align

    feat = torch.arange(16.0).reshape(1, 1, 4, 4)
    # One bin covering the whole map, one sample at its centre (2, 2) -> mean of 5,6,9,10... = 7.5
    out = roi_align(
        feat, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=1, sampling_ratio=1, aligned=True
    )
    assert out.shape == (1, 1, 1, 1)
    assert abs(out.item() - 7.5) < 1e-5


def test_ray_data_pipeline_sum(ray_local):
    import ray

    ds = ray.data.range(1000).map_batches(lambda b: {"x": b["id"] * 2}, batch_format="numpy")
    assert ds.sum("x") == 2 * sum(range(1000))
