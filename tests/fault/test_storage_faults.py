"""Flaky and failing storage, and secrets (issue 7, items 2 and 6), through the CLI.

`maskrcnn segment` reads from and writes to S3 (the loopback moto server) through a
proxy that answers a share of requests 503 SlowDown, resets connections and delays
replies: the run finishes with every input exactly once. A permanent failure (a
missing bucket, access denied) ends the run with one clear line before any row is
written. Credentials and signed-URL parameters never reach stdout/stderr, the manifest
or the Parquet files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from helpers.local_http import http_server_fixture  # noqa: F401
from helpers.proc import kill_group, maskrcnn_process
from helpers.s3_proxy import FlakyS3Proxy
from helpers.segment_data import make_images, tiny_model, write_local, write_s3

from pipeline.output.schema import committed_files, read_manifest

# Their own Ray: credentials and endpoint reach the Ray workers through the environment.
pytestmark = [pytest.mark.slow, pytest.mark.ray]

SECRET_KEY_ID = "AKIAFAULTSUITEKEY0001"
SECRET_KEY = "fault-suite-secret-key-do-not-print"
SIGNATURE = "SIGNATUREfaultsuite42"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from maskrcnn.checkpoint import save

    path = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    save(tiny_model(0), path)
    return path


def _segment(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.Popen:
    return maskrcnn_process(["segment", *args], cwd=cwd, env_extra=env_extra)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"segment hung:\n{out[-2000:]}\n{err[-2000:]}") from None
    return proc.returncode, out, err


def _creds(endpoint: str) -> dict[str, str]:
    """AWS credentials with recognisable values (moto accepts any), endpoint ``endpoint``."""
    return {
        "AWS_ACCESS_KEY_ID": SECRET_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
    }


def _output_bytes(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def _assert_no_secrets(texts: dict[str, bytes | str]) -> None:
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        for secret in (SECRET_KEY_ID, SECRET_KEY, SIGNATURE):
            assert secret.encode() not in data, f"{secret} appears in {where}"


def _exactly_once(output: str, storage: dict, expected: list[str]):
    manifest = read_manifest(output, storage)
    fs = fsspec.filesystem("s3", **storage)
    uris, status = [], []
    for uri in committed_files(output, storage):
        with fs.open(uri, "rb") as f:
            table = pq.read_table(f)
        uris += table.column("uri").to_pylist()
        status += table.column("status").to_pylist()
    assert len(uris) == len(set(uris)), "a URI is in the output twice"
    assert sorted(uris) == sorted(expected)
    assert manifest["counts"]["images"] == len(expected)
    return manifest, status


def test_flaky_s3_both_ways_finishes_exactly_once_without_leaking_credentials(
    s3_server, s3_bucket, model_path, tmp_path
):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    files = make_images(10, seed=21, odd=False) | {"broken.jpg": b"\xff\xd8\xff not a jpeg"}
    uris = write_s3(fs, f"{s3_bucket}/in", files)
    out = f"s3://{s3_bucket}/out"
    with FlakyS3Proxy(s3_server["endpoint_url"], every=5) as proxy:
        proc = _segment(
            [f"s3://{s3_bucket}/in", out, "--model", model_path, "--endpoint-url",
             proxy.endpoint_url, "--batch-size", "2", "--actors", "1", "--cpus-per-actor", "1",
             "--rows-per-part", "3", "--score-threshold", "0", "--max-detections", "5"],
            _creds(proxy.endpoint_url),
            tmp_path,
        )  # fmt: skip
        rc, stdout, stderr = _finish(proc)
        faults = dict(proxy.faults)
    assert rc == 0, stderr[-3000:]
    # Faults really met the run: several of each kind, every 5th request or so.
    assert faults["slowdown"] >= 3 and faults["reset"] >= 3 and faults["delayed"] >= 3, faults
    manifest, status = _exactly_once(out, storage, list(uris))
    assert status.count("error") == 1 and manifest["counts"]["error"] == 1
    assert "10 images ok, 1 with errors" in stdout
    _assert_no_secrets(
        {"stdout": stdout, "stderr": stderr, **_output_bytes(fs, f"{s3_bucket}/out")}
    )
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/out/_run"), "run state left after commit"


def test_permanent_storage_failures_stop_before_any_row(s3_server, s3_bucket, model_path, tmp_path):
    storage = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **storage)
    write_s3(fs, f"{s3_bucket}/in", make_images(2, seed=22, odd=False))
    common = ["--model", model_path, "--actors", "1", "--cpus-per-actor", "1"]
    env = _creds(s3_server["endpoint_url"])
    with FlakyS3Proxy(s3_server["endpoint_url"]) as denied:
        denied.permanent = True  # every request: 403 AccessDenied
        missing_bucket = _segment(
            [f"s3://{s3_bucket}/in", "s3://no-such-bucket-fault/out", *common], env, tmp_path
        )
        access_denied = _segment(
            [f"s3://{s3_bucket}/in", str(tmp_path / "out"), *common, "--endpoint-url",
             denied.endpoint_url], env, tmp_path,
        )  # fmt: skip
        results = {"missing": _finish(missing_bucket, 300), "denied": _finish(access_denied, 300)}
    for name, (rc, stdout, stderr) in results.items():
        lines = stderr.strip().splitlines()
        assert rc == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr[-2000:])
        _assert_no_secrets({f"{name} stdout": stdout, f"{name} stderr": stderr})
    missing_line = results["missing"][2].strip()
    assert missing_line.startswith("maskrcnn segment: error: OUTPUT s3://no-such-bucket-fault/out")
    denied_line = results["denied"][2].strip()
    assert f"INPUT s3://{s3_bucket}/in: access denied" in denied_line, denied_line
    assert not (tmp_path / "out").exists(), "rows written although INPUT could not be read"
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket-fault"), "the missing bucket was created"


def test_signed_urls_and_credentials_stay_out_of_logs_manifest_and_parquet(
    s3_server, s3_bucket, model_path, tmp_path, http_server
):
    """From the CLI, to an S3 OUTPUT, with credentials in the environment (the in-process,
    local-output case is tests/segment/test_driver.py::test_signed_urls_are_read_but_never_stored_or_logged)."""
    root, base = http_server
    files = make_images(3, seed=23, odd=False)
    write_local(root, files)
    query = f"X-Amz-Credential={SECRET_KEY_ID}&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60"
    signed = [f"{base}/{name}?{query}" for name in files] + [f"{base}/gone.jpg?{query}"]
    (tmp_path / "list.txt").write_text("\n".join(signed) + "\n")
    out = f"s3://{s3_bucket}/out"
    proc = _segment(
        [str(tmp_path / "list.txt"), out, "--model", model_path, "--actors", "1",
         "--cpus-per-actor", "1", "--debug"],
        _creds(s3_server["endpoint_url"]),
        tmp_path,
    )  # fmt: skip
    rc, stdout, stderr = _finish(proc)
    assert rc == 0, stderr[-3000:]
    storage = s3_server["storage_options"]
    manifest, status = _exactly_once(out, storage, [u.split("?")[0] for u in signed])
    assert status.count("error") == 1  # gone.jpg: a read error row, its URL redacted
    fs = fsspec.filesystem("s3", **storage)
    written = _output_bytes(fs, f"{s3_bucket}/out")
    assert any(p.startswith(f"{s3_bucket}/out/_delta_log/") for p in written)  # the log too
    _assert_no_secrets({"stdout": stdout, "stderr": stderr, **written})
