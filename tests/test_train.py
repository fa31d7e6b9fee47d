"""`maskrcnn train`: DDP training on a real local Ray cluster, with local checkpoints
(on S3: tests/fault/test_node_loss.py, whose run restarts from them).

The end-to-end test runs the CLI in a subprocess (its own local Ray instance, 2
workers on the tiny preset with 64 px shapes) and interrupts it from outside twice:
a worker process killed with SIGKILL, then the driver. Fast unit tests cover the
pieces the resumption relies on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_cli
from helpers.proc import kill_group, maskrcnn_process
from helpers.train_logs import (
    CLASS_NAMES,
    iteration_lines,
    losses_by_iteration,
    registered_checkpoint,
)
from helpers.wait import wait_until

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.checkpoint import load, model_id, read_metadata, save
from pipeline.formats.coco import CocoDataset
from pipeline.formats.shapes import make_shapes_dataset
from pipeline.storage import get_fs
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.curves import CURVES_FILE, read_metrics
from pipeline.train.data import BatchPlan, hflip, input_size, train_input_size
from pipeline.train.progress import write_worker_status
from pipeline.train.schedule import lr_factor
from pipeline.train.spec import TrainSpec

SMALL_RUN = [
    "--preset", "tiny", "--min-size", "64", "--max-size", "64",
    "--workers", "2", "--log-every", "1", "--lr", "0.01",
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-shapes")
    make_shapes_dataset(str(root), images=24, size=64, seed=3, val_images=8)
    return root


# --- helpers -------------------------------------------------------------------------


def start_train(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """`maskrcnn train ARGS` in its own session (so its Ray processes can be cleaned up)."""
    return maskrcnn_process(
        ["train", *args], cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_for(
    condition, proc: subprocess.Popen, log: Path, timeout: float = 240.0, interval: float = 0.2
):
    """``condition()``'s first truthy value (wait_until); fails if the run ends first."""

    def ended() -> str | None:
        if proc.poll() is None:
            return None
        return f"train exited ({proc.returncode}):\n{log.read_text()[-3000:]}"

    return wait_until(condition, "train", timeout, interval, gave_up=ended)


def assert_resumed(log_text: str, start: int, iterations: int) -> None:
    """The run resumed at ``start`` and trained exactly start+1 .. iterations afterwards."""
    marker = f"resumed from the checkpoint of iteration {start}"
    assert marker in log_text, log_text[-3000:]
    after = iteration_lines(log_text.split(marker, 1)[1])
    assert after == list(range(start + 1, iterations + 1))


# --- end to end ------------------------------------------------------------------------


# Its own Ray: Ray Train's cleaner asks the dashboard, which the shared instance runs without.
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(480)
def test_killed_worker_then_stopped_run_each_resume_from_a_checkpoint(shapes, tmp_path):
    """One run meets both interruptions: a worker SIGKILLed mid-run (Ray Train restarts
    the worker group from the last registered checkpoint, within the run), then the whole
    job stopped (the same command again continues it). Also the --amp path (bf16
    autocast, channels_last weights under DDP, in checkpoints), a corrupt image (with one
    image per batch, a batch of nothing still steps) and a fine-tune: the run starts from
    --init, which neither resumption re-applies."""
    pretrained = tmp_path / "pretrained.safetensors"
    torch.manual_seed(3)
    old = MaskRCNN(
        MaskRCNNConfig.preset(
            "tiny",
            class_names=["__background__", "square", "star", "circle"],
            min_size=64,
            max_size=64,
        )
    )
    save(old, str(pretrained))
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "images" / "000005.png").write_bytes(b"not a png")
    storage = tmp_path / "runs"
    run = storage / "stopped"

    def read_text(name: str) -> str | None:
        path = run / name
        return path.read_text() if path.exists() else None

    def status(rank: int) -> dict:
        return json.loads(read_text(f"workers/rank-{rank}.json") or "{}")

    args = [
        "--data", str(data / "train"), "--val-data", str(data / "val"), *SMALL_RUN,
        "--batch-size", "1", "--iters", "24", "--checkpoint-every", "4", "--keep-checkpoints", "2",
        "--max-failures", "2", "--amp", "--storage", str(storage), "--name", "stopped",
        "--init", str(pretrained),
    ]  # fmt: skip
    first_log = tmp_path / "first.log"
    proc = start_train(args, first_log, tmp_path)

    def first_attempt_worker() -> dict | None:
        """Rank 1 of the first attempt, once a checkpoint is registered."""
        rank1 = status(1)
        return (
            rank1
            if rank1.get("start_iteration") == 0 and registered_checkpoint(read_text)
            else None
        )

    def restarted_workers() -> list[dict] | None:
        ranks = [status(0), status(1)]
        return ranks if all(r.get("start_iteration", 0) > 0 for r in ranks) else None

    def just_past_a_checkpoint_after_the_restart(start: int):
        """The last logged iteration, when it is the second after a checkpoint (4, 8,
        ...) the restarted group registered: stopped there, the run redoes two iterations
        or more, one of them after an optimizer step taken since the restart."""

        def condition() -> int | None:
            logged = iteration_lines(first_log.read_text())
            checkpoint = registered_checkpoint(read_text)
            if logged and logged[-1] % 4 == 2 and checkpoint and checkpoint > start:
                return logged[-1]
            return None

        return condition

    try:
        # 1. A worker of the first attempt killed once a checkpoint is registered: the
        #    run goes on with a new worker group, from that checkpoint.
        victim = wait_for(first_attempt_worker, proc, first_log)
        os.kill(victim["pid"], signal.SIGKILL)
        restarted = wait_for(restarted_workers, proc, first_log)
        start = restarted[0]["start_iteration"]
        # 2. Past the restarted group's next checkpoint, the whole job is stopped at once:
        #    the driver, and its workers with it (they would otherwise outlive the driver
        #    by a moment and go on checkpointing).
        last_logged = wait_for(
            just_past_a_checkpoint_after_the_restart(start), proc, first_log, interval=0.05
        )
        for pid in [proc.pid, status(0)["pid"], status(1)["pid"]]:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    first_text = first_log.read_text()

    # Both workers were restarted, from the same registered checkpoint, over all the data.
    assert start > 0 and start % 4 == 0
    assert restarted[1]["start_iteration"] == start
    assert restarted[1]["pid"] != victim["pid"]
    assert restarted[0]["shard_images"] + restarted[1]["shard_images"] == 24
    final = iteration_lines(first_text)[-1]  # the kill may land an iteration later
    assert final >= last_logged
    assert_resumed(first_text, start, final)
    stopped_at = registered_checkpoint(read_text)
    assert stopped_at and start < stopped_at < last_logged and stopped_at % 4 == 0
    assert not (run / "model.safetensors").exists()

    again_log = tmp_path / "again.log"
    proc = start_train(args, again_log, tmp_path)
    try:
        assert proc.wait(timeout=300) == 0, again_log.read_text()[-3000:]
    finally:
        kill_group(proc)
    text = again_log.read_text()
    for log_text in (first_text, text):
        assert (
            f"train: --init {pretrained}: found a maskrcnn checkpoint (resnet18, 4 classes)"
            in log_text
        ), log_text[-3000:]
        assert "train: classes: kept 2 of 3 classes (square, circle), new 1 (triangle)" in log_text
    assert_resumed(text, stopped_at, 24)
    assert "finished at iteration 24" in text
    # Resumed exactly: iterations trained by both runs (after the checkpoint the
    # first run went on until killed) have the same losses.
    first, resumed = losses_by_iteration(first_text), losses_by_iteration(text)
    redone = sorted(set(first) & set(resumed))
    assert len(redone) >= 2 and redone[0] == stopped_at + 1
    assert [first[i] for i in redone] == [resumed[i] for i in redone]
    # Each worker's 12 images all come in its first 12 iterations: the corrupt one was met.
    both = first_text + text
    assert re.search(r"skipped image \S*000005.png: undecodable", both), both[-3000:]

    # The last two checkpoints are kept, each complete; the export is the last one's model.
    kept = sorted(p.name for p in run.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000024"]
    for name in kept:
        files = sorted(p.name for p in (run / name).iterdir())
        assert files == ["model.safetensors", "state.json", "train_state.pt"]
    state = json.loads((run / "checkpoint_00000024" / "state.json").read_text())
    assert state["iteration"] == 24
    # The final evaluation on --val-data is reported with the last checkpoint.
    assert 0.0 <= state["metrics"]["segm_AP"] <= 1.0
    assert state["metrics"]["eval_images"] == 8
    model = load(str(run / "model.safetensors"))
    assert model.cfg.class_names == CLASS_NAMES and model.cfg.min_size == 64
    assert model_id(model) == state["model_id"]
    origin = json.loads(read_metadata((run / "model.safetensors").read_bytes())["init"])
    assert origin["kept"] == {"square": "square", "circle": "circle"}
    assert origin["new"] == ["triangle"] and origin["trainable_layers"] == "3+"
    # One metrics line per logged iteration, continued (not repeated) after each resume,
    # and the curves drawn from them.
    steps = [m["iteration"] for m in read_metrics(str(run), {}) if "loss" in m]
    assert steps == list(range(1, 25)), steps
    assert f"train: wrote training curves {run / CURVES_FILE}" in text
    assert (run / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image, _ = CocoDataset(str(shapes / "val"), train=False)[0]
    out = model.predict([image])[0]
    assert out["masks"].shape[1:] == image.shape[1:]


@pytest.mark.timeout(120)
def test_data_that_does_not_exist_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("train", "--data", str(missing), "--preset", "tiny", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"maskrcnn train: error: --data {missing}")
    assert "not found" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


# --- pieces ------------------------------------------------------------------------------


def test_batch_plan_resumes_exactly_and_covers_each_epoch():
    full = list(BatchPlan(n=10, batch_size=3, seed=7, rank=1, start=0, stop=20))
    resumed = list(BatchPlan(n=10, batch_size=3, seed=7, rank=1, start=9, stop=20))
    assert resumed == full[9:]
    stream = [draw for batch in full for draw in batch]
    for epoch in range(5):  # 60 draws: 6 epochs of 10
        assert sorted(i for i, _ in stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    flips = [f for _, f in stream]
    assert 0 < sum(flips) < len(flips)
    other_rank = [d for b in BatchPlan(10, 3, 7, 0, 0, 20) for d in b]
    assert other_rank != stream
    assert not any(f for b in BatchPlan(10, 3, 7, 1, 0, 5, flip=False) for _, f in b)


def test_hflip_mirrors_image_masks_and_boxes_together(shapes):
    data = CocoDataset(str(shapes / "train"))
    image, target = data[0]
    flipped_image, flipped = hflip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        ys, xs = np.nonzero(mask.numpy())
        # Boxes are the mask's pixel extent before and after the flip.
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    back_image, back = hflip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    assert torch.equal(back["masks"], target["masks"])


def test_worker_status_survives_a_transient_storage_error(s3_server, s3_bucket, monkeypatch):
    """A PUT that the store fails once (a reset connection) does not fail a worker's start:
    the status is written on the next try."""
    spec = TrainSpec(
        data="d", model_config={}, iterations=1, batch_size=1, lr=0.1,
        storage=f"s3://{s3_bucket}/run", storage_options=s3_server["storage_options"],
    )  # fmt: skip
    fs, _ = get_fs(spec.storage, spec.storage_options)  # the instance atomic_write gets
    real, tries = fs.pipe_file, []

    def reset_once(path, data, **kwargs):
        tries.append(path)
        if len(tries) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real(path, data, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", reset_once)
    write_worker_status(spec, rank=1, world=2, start=7, shard_images=3)
    status = json.loads(fs.cat_file(f"{s3_bucket}/run/workers/rank-1.json"))
    assert len(tries) == 2 and status["pid"] == os.getpid()
    assert (status["rank"], status["world_size"], status["start_iteration"]) == (1, 2, 7)


def test_lr_schedule_warms_up_linearly_then_steps_down():
    spec = TrainSpec(
        data="d", model_config={}, iterations=100, batch_size=1, lr=0.1, storage="s",
        warmup_iters=10, warmup_factor=0.001, lr_steps=(60, 90), lr_gamma=0.1,
    )  # fmt: skip
    f = lr_factor(spec)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [f(10), f(59), f(60), f(89), f(90), f(99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_scale_jitter_stays_in_range_and_the_model_config_is_restored():
    sizes = {train_input_size(128, 224, 0.25, 0, 0, it) for it in range(200)}
    assert all(96 <= s <= 160 and m == max(s, round(224 * s / 128)) for s, m in sizes)
    assert len(sizes) > 20
    assert train_input_size(128, 224, 0.25, 0, 0, 5) == train_input_size(128, 224, 0.25, 0, 0, 5)
    assert train_input_size(128, 224, 0.0, 0, 0, 5) == (128, 224)

    model = MaskRCNN(MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES))
    original = model.cfg
    with input_size(model, 100, 175):
        assert (model.cfg.min_size, model.cfg.max_size) == (100, 175)
    assert model.cfg is original


def test_checkpoint_restores_weights_optimizer_and_schedule(tmp_path):
    torch.manual_seed(0)
    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES, min_size=64, max_size=64)

    def build():
        model = MaskRCNN(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
        spec = TrainSpec(data="d", model_config={}, iterations=10, batch_size=1, lr=0.01,
                         storage="s", warmup_iters=4)  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(spec))
        return model, opt, sched, torch.amp.GradScaler("cpu", enabled=False)

    model, opt, sched, scaler = build()
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    masks = torch.zeros((1, 64, 64), dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]),
              "masks": masks}  # fmt: skip
    for _ in range(2):
        loss = sum(model([image], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(str(tmp_path), model, opt, sched, scaler, 2, {"loss": loss.detach().item()})

    restored, opt2, sched2, scaler2 = build()
    assert load_checkpoint(str(tmp_path), restored, opt2, sched2, scaler2) == 2
    assert model_id(restored) == model_id(model)
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    first = next(p for p in model.parameters() if p.requires_grad)
    first2 = next(p for p in restored.parameters() if p.requires_grad)
    assert torch.equal(opt.state[first]["momentum_buffer"], opt2.state[first2]["momentum_buffer"])
    assert model_id(load(str(tmp_path / "model.safetensors"))) == model_id(model)


def test_progress_line_ends_with_the_time_the_remaining_iterations_take():
    from pipeline.train.progress import duration_text, format_log

    losses = {"loss": 1.0, "loss_mask": 0.5}
    line = format_log(40, 120, losses, 0.01, 12.3, seconds_per_step=0.75)
    assert line.endswith("12.3 img/s  ETA 1m00s"), line  # 80 iterations left at 0.75 s
    assert "ETA" not in format_log(120, 120, losses, 0.01, 12.3, seconds_per_step=0.75)
    assert [duration_text(s) for s in (4.4, 725, 3 * 3600 + 7 * 60)] == ["4s", "12m05s", "3h07m"]
