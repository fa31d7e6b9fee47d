"""segment end to end on a real local Ray cluster: every input exactly once, masks equal
predict()'s, bad files as error rows, S3 both ways, resume after SIGKILL, a killed actor,
refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from helpers.local_http import http_server_fixture  # noqa: F401
from helpers.proc import kill_group, maskrcnn_process
from helpers.segment_data import (
    EXPECTED_ERRORS,
    EXPECTED_SIZES,
    assert_exactly_once,
    assert_only_committed,
    duckdb_counts,
    make_images,
    opts,
    read_back,
    tiny_model,
    write_local,
    write_s3,
)
from helpers.wait import wait_until

from pipeline.formats.decode import decode_image
from pipeline.formats.rle import decode_masks
from pipeline.output.schema import committed_files, read_manifest
from pipeline.output.table import LOG_DIR, commit_record, load_table, numbered_history
from pipeline.segment.driver import segment
from pipeline.segment.model_source import ModelSource


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'a': (path, model), 'b': (path, model)}: two different tiny checkpoints."""
    from maskrcnn.checkpoint import load, save

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        path = str(root / f"tiny-{name}.safetensors")
        save(tiny_model(seed), path)
        out[name] = (path, load(path))
    return out


def assert_row_is_predict_alone(row: dict, image: np.ndarray, model, max_detections: int):
    """The row's instances are exactly ``model.predict([image])``'s (the image alone, score
    threshold 0): labels, names, scores, boxes, masks, areas. Returns the decoded masks."""
    ref = model.predict(
        [torch.from_numpy(image).permute(2, 0, 1)],
        score_threshold=0.0,
        max_detections=max_detections,
    )[0]
    inst = row["instances"]
    assert [i["label"] for i in inst] == ref["labels"].tolist()
    assert [i["label_name"] for i in inst] == [
        model.cfg.label_names[v] for v in ref["labels"].tolist()
    ]
    np.testing.assert_array_equal([i["score"] for i in inst], ref["scores"].numpy())
    np.testing.assert_array_equal(
        np.array([i["box"] for i in inst], np.float32).reshape(-1, 4), ref["boxes"].numpy()
    )
    masks = decode_masks([i["mask_counts"] for i in inst], row["height"], row["width"])
    np.testing.assert_array_equal(masks, ref["masks"].numpy())
    assert [i["area"] for i in inst] == masks.sum(axis=(1, 2)).tolist()
    return masks


# --- tests ------------------------------------------------------------------------


def test_local_dir_to_local_output_rows_and_masks_equal_predict(ray_local, tmp_path, models):
    files = make_images(6)
    uris = write_local(tmp_path / "in", files)
    out = str(tmp_path / "out")
    path, model = models["a"]
    summary = segment(str(tmp_path / "in"), out, ModelSource(checkpoint=path), opts())
    table, manifest = read_back(out)
    assert_exactly_once(table, uris)
    assert duckdb_counts(committed_files(out)) == (
        len(uris),
        len(uris),
        len(EXPECTED_ERRORS),
        manifest["counts"]["instances"],
    )
    assert_only_committed(out)
    from maskrcnn.checkpoint import model_id

    assert manifest["model"] == summary["model"] == model_id(model)
    assert set(table.column("model").to_pylist()) == {manifest["model"]}

    torch.set_num_threads(1)  # the actor ran with one thread: same kernels, same bits
    compared = partial = 0
    for row in table.to_pylist():
        name = uris[row["uri"]]
        if name in EXPECTED_ERRORS:
            assert row["status"] == "error" and row["error"] == EXPECTED_ERRORS[name]
            assert row["width"] is None and row["height"] is None and row["instances"] == []
            continue
        assert row["status"] == "ok" and row["error"] is None, row
        image = decode_image(files[name])
        assert (row["height"], row["width"]) == image.shape[:2]
        if name in EXPECTED_SIZES:
            assert (row["width"], row["height"]) == EXPECTED_SIZES[name]
        assert_row_is_predict_alone(row, image, model, max_detections=5)
        inst = row["instances"]
        compared += len(inst)
        boxes_area = [(b[2] - b[0]) * (b[3] - b[1]) for b in (i["box"] for i in inst)]
        partial += sum(0 < i["area"] < a for i, a in zip(inst, boxes_area))
    assert compared >= 20 and partial >= 10, (compared, partial)  # masks really compared


def test_s3_input_to_s3_output_batched(ray_local, s3_server, s3_bucket, models):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    uris = write_s3(
        fs,
        f"{s3_bucket}/in",
        make_images(7, seed=3, odd=False) | {"broken.jpg": b"\xff\xd8\xff garbage"},
    )
    out = f"s3://{s3_bucket}/out"
    path, _ = models["a"]
    segment(
        f"s3://{s3_bucket}/in",
        out,
        ModelSource(checkpoint=path),
        opts(batch_size=3, rows_per_part=3, input_options=storage, output_options=storage),
    )
    table, manifest = read_back(out, storage)
    assert_exactly_once(table, uris)
    assert manifest["counts"]["error"] == 1 and manifest["counts"]["instances"] > 0
    files = committed_files(out, storage)
    assert len(files) == 3
    assert duckdb_counts(files, storage)[:3] == (8, 8, 1)
    assert_only_committed(out, storage)


def test_complete_output_kept_other_model_refused_overwrite_replaces(
    ray_local, tmp_path, s3_server, s3_bucket, models, capsys
):
    storage = s3_server["storage_options"]
    uris = write_local(tmp_path / "in", make_images(3, seed=5, odd=False))
    out = f"s3://{s3_bucket}/out"
    (path_a, _), (path_b, model_b) = models["a"], models["b"]
    run = dict(output_options=storage)
    first = segment(str(tmp_path / "in"), out, ModelSource(checkpoint=path_a), opts(**run))
    again = segment(str(tmp_path / "in"), out, ModelSource(checkpoint=path_a), opts(**run))
    assert again["already_complete"] and again["run_id"] == first["run_id"]
    assert "is up to date" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"rows made with another model: .*--overwrite"):
        segment(str(tmp_path / "in"), out, ModelSource(checkpoint=path_b), opts(**run))
    with pytest.raises(ValueError, match=r"score_threshold: 0.0 \(now 0.5\)"):
        segment(
            str(tmp_path / "in"),
            out,
            ModelSource(checkpoint=path_a),
            opts(score_threshold=0.5, **run),
        )
    assert read_manifest(out, storage)["run_id"] == first["run_id"]  # refusals changed nothing

    replaced = segment(
        str(tmp_path / "in"), out, ModelSource(checkpoint=path_b), opts(overwrite=True, **run)
    )
    table, manifest = read_back(out, storage)
    assert_exactly_once(table, uris)
    from maskrcnn.checkpoint import model_id

    assert manifest["run_id"] == replaced["run_id"] != first["run_id"]
    assert set(table.column("model").to_pylist()) == {model_id(model_b)}
    before = read_manifest(out, storage, version=first["version"])
    assert before["run_id"] == first["run_id"]  # the version before reads as it was
    assert not set(before["files"]) & set(manifest["files"])  # no part of it is the latest's


def test_signed_urls_are_read_but_never_stored_or_logged(
    ray_local, tmp_path, http_server, models, capsys
):
    root, base = http_server
    files = make_images(3, seed=9, odd=False)
    write_local(root, files)
    secret = "X-Amz-Signature=SECRETSIG123&X-Amz-Credential=AKIASECRETKEY"
    signed = [f"{base}/{name}?{secret}" for name in files] + [f"{base}/missing.jpg?{secret}"]
    (tmp_path / "list.txt").write_text("\n".join(signed) + "\n")
    out = tmp_path / "out"
    segment(str(tmp_path / "list.txt"), str(out), ModelSource(checkpoint=models["a"][0]), opts())
    table, _ = read_back(str(out))
    assert_exactly_once(table, [u.split("?")[0] for u in signed])
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows[f"{base}/missing.jpg"]["error"].startswith("read: ")
    assert sum(r["status"] == "ok" for r in rows.values()) == 3
    for path in out.rglob("*"):
        assert path.is_dir() or b"SECRET" not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err


def _gcs_actors(class_part: str) -> dict[str, dict]:
    import ray._private.state

    return {
        k: v for k, v in ray._private.state.actors().items() if class_part in v["ActorClassName"]
    }


def test_model_actor_killed_mid_run_still_exactly_once(
    ray_local, tmp_path, s3_server, s3_bucket, models
):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    uris = write_s3(fs, f"{s3_bucket}/in", make_images(24, seed=7, odd=False))
    out = tmp_path / "out"
    before = set(_gcs_actors("MapWorker"))
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = segment(
                f"s3://{s3_bucket}/in",
                str(out),
                ModelSource(checkpoint=models["a"][0]),
                opts(rows_per_part=2, input_options=storage, max_detections=20),
            )
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def a_model_actor_at_work() -> tuple | None:
        parts = list(out.glob("run-*/part-*.parquet")) if out.exists() else []
        alive = {
            k: v
            for k, v in _gcs_actors("MapWorker").items()
            if k not in before and v["State"] == "ALIVE"
        }
        return (next(iter(alive.items())), len(parts)) if parts and alive else None

    victim, committed_at_kill = wait_until(
        a_model_actor_at_work,
        "the model actor alive with work left",
        timeout=120,
        interval=0.02,
        gave_up=lambda: None if thread.is_alive() else f"the run ended: {result}",
    )
    os.kill(victim[1]["Pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert committed_at_kill < 12  # 24 images, 2 per part: killed with work left
    restarted = _gcs_actors("MapWorker")[victim[0]]
    assert restarted["NumRestarts"] >= 1 or restarted["Pid"] != victim[1]["Pid"]
    table, _ = read_back(str(out))
    assert_exactly_once(table, uris)
    assert set(table.column("status").to_pylist()) == {"ok"}


def _cli(args: list[str], log: Path, ray_address: str) -> subprocess.Popen:
    """`maskrcnn segment ARGS`, a driver process of its own that joins the shared Ray."""
    return maskrcnn_process(
        ["segment", *args],
        cwd=REPO,
        env_extra={"RAY_ADDRESS": ray_address},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_driver_sigkill_then_rerun_resumes_exactly_once(tmp_path, models, ray_address):
    uris = write_local(tmp_path / "in", make_images(24, seed=11, odd=False))
    out = tmp_path / "out"
    args = [
        str(tmp_path / "in"), str(out), "--model", models["a"][0], "--batch-size", "2",
        "--actors", "1", "--cpus-per-actor", "1", "--rows-per-part", "2",
        "--score-threshold", "0", "--max-detections", "20",
    ]  # fmt: skip
    same = opts(batch_size=2, rows_per_part=2, max_detections=20)  # what args say
    first = _cli(args, tmp_path / "first.log", ray_address)
    log = tmp_path / "first.log"

    def first_ended() -> str | None:
        return None if first.poll() is None else f"it exited:\n{log.read_text()[-3000:]}"

    try:
        lock = out / "_run" / "lock.json"
        wait_until(lock.exists, "the first run's lease", 180, 0.02, first_ended)
        # A second run into the same OUTPUT while the first holds it is refused.
        with pytest.raises(
            ValueError, match=f"being written by another segment run .*pid {first.pid}"
        ):
            segment(str(tmp_path / "in"), str(out), ModelSource(checkpoint=models["a"][0]), same)
        two_parts = lambda: len(list(out.glob("run-*/part-*.parquet"))) >= 2  # noqa: E731
        wait_until(two_parts, "two parts of the first run", 180, 0.02, first_ended)
        os.kill(first.pid, signal.SIGKILL)  # the driver only, mid-run
        first.wait()
    finally:
        kill_group(first)
    committed = sorted(str(p.relative_to(out)) for p in out.glob("run-*/part-*.parquet"))
    committed_uris = [
        u for p in committed for u in pq.read_table(out / p).column("uri").to_pylist()
    ]
    assert not (out / LOG_DIR).exists() and 2 <= len(committed)
    assert 0 < len(committed_uris) < 24 and len(set(committed_uris)) == len(committed_uris)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(out))

    # The same command with another model: refused, and the lease of the dead run is free.
    with pytest.raises(
        ValueError, match=r"unfinished run with another model: \w+ \(now \w+\); re-run"
    ):
        segment(str(tmp_path / "in"), str(out), ModelSource(checkpoint=models["b"][0]), same)

    rerun = _cli(args, tmp_path / "rerun.log", ray_address)
    try:
        rerun.wait(timeout=300)
    finally:
        kill_group(rerun)
    log = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, log[-3000:]
    assert (
        f"{len(committed_uris)} of 24 images already committed; {24 - len(committed_uris)} to go"
        in log
    )
    assert "24 images ok, 0 with errors" in log and "images/s" in log
    table, manifest = read_back(str(out))
    assert_exactly_once(table, uris)
    assert set(committed) <= set(manifest["files"])  # parts from before the kill were kept
    assert_only_committed(str(out))

    # The resumed rows are a clean run's: each is exactly its image's predict() alone
    # (what a clean run's rows are, test_local_dir_...), though the images (64..128 px,
    # every aspect) were batched in pairs, and after the kill with other neighbours.
    sizes = set(zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
    assert len(sizes) > 12  # mixed sizes, not one
    torch.set_num_threads(1)  # the actor ran with one thread: same kernels, same bits
    model = models["a"][1]
    for row in table.to_pylist():
        image = decode_image((tmp_path / "in" / uris[row["uri"]]).read_bytes())
        assert_row_is_predict_alone(row, image, model, max_detections=20)


def test_cli_errors_are_one_line(tmp_path, models, capsys):
    from jobs.cli import main

    for bad in (["--actors", "0"], ["--batch-size", "0"], ["--score-threshold", "2"]):
        with pytest.raises(SystemExit) as exc:
            main(["segment", "in", "out", "--model", "m", *bad])
        assert exc.value.code == 2
    capsys.readouterr()
    rc = main(
        ["segment", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", models["a"][0]]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"maskrcnn segment: error: INPUT {tmp_path / 'nowhere'}: no such folder or prefix"
    ]
    assert not (tmp_path / "out").exists()  # nothing left behind
    # With a good INPUT, a missing model is the error (INPUT is checked first).
    images = tmp_path / "images"
    write_local(images, make_images(1, odd=False))
    rc = main(["segment", str(images), str(tmp_path / "o2"), "--model", str(tmp_path / "no.st")])
    assert rc == 2 and "no.st: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


class _Built(Exception):
    """Stops segment() once its model is built: these tests look at what came before."""


@pytest.mark.parametrize("output", ["fresh", "table"])
def test_ray_starts_while_the_model_builds_only_when_work_is_certain(
    tmp_path, models, monkeypatch, output
):
    """Into an OUTPUT without rows every listed image is work: Ray's start (4.6 s on 2
    cores) overlaps the model's build (2.5 s). The two meet at a barrier, which a
    sequential start never passes. Over a table's rows nothing may be new: Ray waits."""
    import pipeline.segment.driver as driver

    images = tmp_path / "images"
    write_local(images, make_images(2, odd=False))
    out = tmp_path / "out"
    if output == "table":
        (out / LOG_DIR).mkdir(parents=True)
        (out / LOG_DIR / "00000000000000000000.json").write_text("{}")
    both = threading.Barrier(2, timeout=30)
    starts, builders = [], []

    def start_ray(*args, **kwargs):
        starts.append(threading.get_ident())
        both.wait()

    def build(source, data):
        builders.append(threading.get_ident())
        if output == "fresh":
            both.wait()
        raise _Built

    monkeypatch.setattr(driver, "init_ray", start_ray)
    monkeypatch.setattr(driver, "build_model", build)
    with pytest.raises(_Built):
        segment(str(images), str(out), ModelSource(checkpoint=models["a"][0]), opts())
    if output == "fresh":
        assert starts == [threading.get_ident()] and builders != starts
    else:
        assert starts == [] and builders == [threading.get_ident()]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))


def test_grown_input_appends_only_new_images_once_then_prunes_and_retries(
    ray_local, tmp_path, models, capsys
):
    root, out = tmp_path / "in", str(tmp_path / "out")
    source = ModelSource(checkpoint=models["a"][0])
    images = make_images(6, seed=11, odd=False)
    names = sorted(images)
    first = {n: images[n] for n in names[:3]} | {"broken.jpg": b"\xff\xd8\xff not a jpeg"}
    write_local(root, first)
    one = segment(str(root), out, source, opts(rows_per_part=1))
    assert one["changes"] == {"added": 4, "replaced": 0, "removed": 0, "errors": 1}
    rows_one = {r["uri"]: r for r in read_back(out)[0].to_pylist()}

    # INPUT grows: only the new images are segmented, appended in one commit. The listing
    # has more shards than diff.LOCAL_SHARDS: it is compared in Ray tasks.
    write_local(root, {f"more-{i}-{n}": images[n] for i in range(2) for n in names[3:]})
    two = segment(str(root), out, source, opts(rows_per_part=1))
    assert two["changes"] == {"added": 6, "replaced": 0, "removed": 0, "errors": 0}
    assert two["this_run"]["rows"] == 6 and two["counts"]["images"] == 10
    table, manifest = read_back(out)
    assert_exactly_once(table, [str(p) for p in root.rglob("*") if p.is_file()])
    assert all(r == rows_one[r["uri"]] for r in table.to_pylist() if r["uri"] in rows_one)
    assert "INPUT lists 10 images: 6 new" in capsys.readouterr().err

    # Nothing new: no commit, one line.
    version = load_table(out).version()
    three = segment(str(root), out, source, opts(rows_per_part=1))
    assert three["already_complete"] and load_table(out).version() == version
    assert "nothing to do" in capsys.readouterr().err

    # The broken file is uploaded again whole and two images are deleted: --retry-errors
    # replaces its row and --prune removes theirs, in one commit.
    (root / "broken.jpg").write_bytes(images[names[0]])
    gone = [root / names[1], root / f"more-0-{names[3]}"]
    for path in gone:
        path.unlink()
    four = segment(str(root), out, source, opts(rows_per_part=1, prune=True, retry_errors=True))
    assert four["changes"] == {"added": 0, "replaced": 1, "removed": 2, "errors": 0}
    assert four["counts"] == {**four["counts"], "images": 8, "error": 0}
    table, _ = read_back(out)
    assert_exactly_once(table, [str(p) for p in root.rglob("*") if p.is_file()])
    assert {r["uri"]: r["status"] for r in table.to_pylist()}[str(root / "broken.jpg")] == "ok"
    # The versions before read as they were (time travel), until the table is vacuumed.
    earlier = read_manifest(out, version=two["version"])
    assert earlier["counts"]["images"] == 10 and earlier["run_id"] == two["run_id"]


def test_folder_format_output_is_converted_into_a_table_and_appended_to(
    ray_local, tmp_path, models, capsys
):
    root, out = tmp_path / "in", tmp_path / "out"
    images = make_images(4, seed=13, odd=False)
    names = sorted(images)
    write_local(root, {n: images[n] for n in names[:2]})
    source = ModelSource(checkpoint=models["a"][0])
    first = segment(str(root), str(out), source, opts(rows_per_part=1))
    # The same rows as the folder format held them: parts at OUTPUT's top, a manifest.
    files = []
    for i, rel in enumerate(sorted(first["files"])):
        files.append(f"part-{i:05d}.parquet")
        (out / rel).rename(out / files[-1])
    shutil.rmtree(out / LOG_DIR)
    (out / "run-000001").rmdir()
    keys = ("format", "run_id", "model", "model_uri", "config", "input", "options", "counts")
    manifest = {k: first[k] for k in keys} | {"files": files, "started": "", "finished": ""}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(str(out))["files"] == files  # it reads as the folder format

    write_local(root, {n: images[n] for n in names[2:]})
    second = segment(str(root), str(out), source, opts(rows_per_part=1))
    assert "it is now a Delta table (version 0: its 2 parts, 2 images)" in capsys.readouterr().err
    assert second["changes"] == {"added": 2, "replaced": 0, "removed": 0, "errors": 0}
    table, _ = read_back(str(out))
    assert_exactly_once(table, [str(p) for p in root.rglob("*") if p.is_file()])
    assert not (out / "_manifest.json").exists()
    log = numbered_history(load_table(str(out)))
    ours = [commit_record(c)["operation"] for c in log if commit_record(c)]
    assert ours == ["segment", "convert"]  # newest first
