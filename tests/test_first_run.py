"""A new user's first `maskrcnn segment`: its own process on an embedded Ray, as typed in a
shell. What it prints is progress and results, never a line the user cannot act on, and
the instance it starts runs without the dashboard unless asked."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import pytest
from conftest import REPO
from helpers.proc import kill_group, maskrcnn_process

from pipeline import cluster

# Its own process and Ray, as a user's first run.
pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Lines Ray printed on a first run before they were silenced, and Ray's C++ log lines.
NOISE = [
    r"tqdm is not installed",
    r"A new progress UI is available",
    r"constructor arguments in the object store",
    r"Token authentication is (enabled|disabled) for this Ray cluster",
    r"Starting execution of Dataset",
    r"Execution plan of Dataset",
    r"Progress will be logged because",
    r"Dataset \S+ execution finished in",
    r"Progress bars (for operators )?disabled",
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]",  # Ray's C++ logging
]


@pytest.fixture(scope="module")
def images_and_model(tmp_path_factory):
    """Six shapes images and an untrained tiny checkpoint (seeded)."""
    import torch

    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from maskrcnn.checkpoint import save
    from pipeline.formats.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("first_run")
    make_shapes_dataset(str(root / "ds"), images=6, size=64, seed=0)
    torch.manual_seed(0)
    cfg = MaskRCNNConfig.preset("tiny", num_classes=4)
    save(MaskRCNN(cfg).eval(), str(root / "m.safetensors"))
    return root / "ds" / "train" / "images", root / "m.safetensors"


def test_segment_prints_progress_and_results_and_no_noise(images_and_model, tmp_path):
    images, model = images_and_model
    # A short temporary folder of Ray's own (its socket paths must stay under 108 bytes).
    with tempfile.TemporaryDirectory(prefix="ray-") as ray_tmp:
        proc = maskrcnn_process(
            ["segment", str(images), str(tmp_path / "out"), "--model", str(model)],
            cwd=REPO,
            env_extra={"RAY_TMPDIR": ray_tmp},
        )
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            kill_group(proc)
        assert proc.returncode == 0, err[-3000:]
        (dashboard_log,) = Path(ray_tmp).glob("ray/session_2*/logs/dashboard.log")
        dashboard = dashboard_log.read_text()
    assert "6 images added" in out and "the table: 6 images ok, 0 with errors" in out
    # Progress: not a terminal here, so Ray Data's progress lines rather than bars.
    assert "Total Progress:" in err, err[-3000:]
    noise = [line for line in err.splitlines() if any(re.search(p, line) for p in NOISE)]
    assert noise == [], "\n".join(noise)
    # The embedded instance's dashboard process serves nothing (no --dashboard).
    assert "http server disabled" in dashboard


def test_console_filter_keeps_warnings_and_progress_lines():
    keep = cluster.RayDataConsoleFilter().filter

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    executor = "ray.data._internal.execution.streaming_executor"
    assert not keep(record(executor, logging.INFO))
    assert not keep(record("ray.data._internal.progress", logging.INFO))
    assert keep(record(executor, logging.WARNING))
    assert keep(record("ray.data._internal.progress.logging_progress", logging.INFO))
    assert keep(record("ray.data._internal.execution.operators.map_operator", logging.INFO))


def test_progress_is_bars_on_a_terminal_and_lines_elsewhere():
    assert cluster.progress_env(terminal=True) == {"RAY_TQDM": "1"}
    assert cluster.progress_env(terminal=False) == {"RAY_TQDM": "0"}
