"""Two `maskrcnn segment` runs into the same OUTPUT at the same time (issue 7, item 3).

The rule (pipeline/segment/lease.py): one writer per OUTPUT. A run that finds another run's
live lease is refused with a message naming it; two runs that take the lease in the
same instant find out when they read it back (or at the next heartbeat) and the loser
stops before writing another part. A run that starts after the other finished finds
the OUTPUT complete and leaves it. Whatever the interleaving: at least one run
finishes, and the output holds each input exactly once.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers.proc import kill_group, maskrcnn_process
from helpers.segment_data import assert_only_committed, make_images, tiny_model, write_local

from pipeline.output.schema import committed_files, read_manifest

REFUSALS = (
    "is being written by another segment run",
    "took the lease at the same time",
    "lost the lease",
)


@pytest.mark.slow
def test_two_runs_into_one_output_one_refused_or_both_exactly_once(tmp_path, ray_address):
    from maskrcnn.checkpoint import save

    model = str(tmp_path / "tiny.safetensors")
    save(tiny_model(0), model)
    uris = write_local(tmp_path / "in", make_images(12, seed=31, odd=False))
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), str(out), "--model", model, "--actors", "1",
            "--cpus-per-actor", "1", "--batch-size", "2", "--rows-per-part", "2"]  # fmt: skip
    # Both drivers join the tests' shared Ray instance, as two jobs on one cluster do.
    join = {"RAY_ADDRESS": ray_address}
    procs = [maskrcnn_process(args, cwd=tmp_path, env_extra=join) for _ in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=400)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    print("concurrent segment runs:", [(rc, err.strip()[-160:]) for rc, _, err in results])
    finished = [r for r in results if r[0] == 0]
    assert finished, [r[2][-2000:] for r in results]
    for rc, stdout, stderr in results:
        if rc != 0:  # refused: one error line naming the rule, and exit 2
            lines = stderr.strip().splitlines()
            errors = [line for line in lines if line.startswith("maskrcnn segment: error: ")]
            assert rc == 2 and len(errors) == 1, stderr[-2000:]
            assert any(text in errors[0] for text in REFUSALS), errors[0]
            assert f"OUTPUT {out}" in errors[0]
            # Refused before any work, the error is all it prints; a run that lost the
            # lease mid-run has Ray's log before it and the --debug hint after.
            if "lost the lease" not in errors[0]:
                assert lines == errors, stderr[-2000:]
        else:
            assert "12 images ok, 0 with errors" in stdout + stderr
    manifest = read_manifest(str(out))
    rows = [
        u for f in committed_files(str(out)) for u in pq.read_table(f).column("uri").to_pylist()
    ]
    assert len(rows) == len(set(rows)) and sorted(rows) == sorted(uris)
    assert manifest["counts"]["images"] == 12
    assert_only_committed(str(out))
