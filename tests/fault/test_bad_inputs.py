"""Bad inputs to every command (issue 7, item 5): each ends with one line naming the input
and the fix, exit code 2, no traceback unless --debug, and nothing committed.

Every case runs `maskrcnn ...` through the console script's own entry point,
``jobs.cli.main``, in the test process (tests/helpers/cli.py): the same parsing, checks
and printing a user meets, without an interpreter start per case.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from helpers.cli import run_cli

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]

# (case id, argv with {R} for the scratch folder, substrings of the error line,
#  paths under {R} that must not exist afterwards: nothing partially committed)
CASES = [
    ("segment-missing-input", ["segment", "{R}/nowhere", "{R}/o1", "--model", "{R}/m4.st"],
     ["INPUT {R}/nowhere", "no such folder or prefix"], ["o1"]),
    # INPUT is checked before the model is read: its error, not the model's.
    ("segment-missing-input-and-model", ["segment", "{R}/nowhere", "{R}/o7", "--model",
     "{R}/nomodel.st"], ["INPUT {R}/nowhere", "no such folder or prefix"], ["o7"]),
    ("segment-empty-prefix", ["segment", "{R}/empty", "{R}/o2", "--model", "{R}/m4.st"],
     ["INPUT {R}/empty holds no image", ".jpg"], ["o2"]),
    ("segment-missing-model", ["segment", "{R}/shapes/train/images", "{R}/o3", "--model",
     "{R}/nomodel.st"], ["model {R}/nomodel.st: no such file"], ["o3"]),
    ("segment-model-is-folder", ["segment", "{R}/shapes/train/images", "{R}/o4", "--model",
     "{R}/empty"], ["model {R}/empty is a folder, not a checkpoint file"], ["o4"]),
    ("segment-model-not-safetensors", ["segment", "{R}/shapes/train/images", "{R}/o5",
     "--model", "{R}/bad.json"], ["model {R}/bad.json: not a safetensors file"], ["o5"]),
    ("segment-other-model-into-output", ["segment", "{R}/shapes/train/images", "{R}/done",
     "--model", "{R}/m2.st"], ["OUTPUT {R}/done holds 1 row made with another model", "--overwrite"],
     ["done/_run"]),
    ("segment-bad-flag", ["segment", "{R}/shapes/train/images", "{R}/o6", "--model",
     "{R}/m4.st", "--batch-size", "x"], ["--batch-size", "expected a positive integer", "'x'"],
     ["o6"]),
    ("train-missing-data", ["train", "--data", "{R}/nowhere", "--preset", "tiny", "--storage",
     "{R}/runs", "--name", "a"], ["--data {R}/nowhere: annotations file not found",
     "annotations.json"], ["runs/a"]),
    ("train-malformed-annotations", ["train", "--data", "{R}/bad.json", "--preset", "tiny",
     "--storage", "{R}/runs", "--name", "b"], ["{R}/bad.json: not valid JSON"], ["runs/b"]),
    ("train-unknown-preset", ["train", "--data", "{R}/shapes/train", "--preset", "huge",
     "--storage", "{R}/runs", "--name", "c"], ["unknown preset 'huge'", "tiny"], ["runs/c"]),
    ("train-bad-flag", ["train", "--data", "{R}/shapes/train", "--preset", "tiny", "--workers",
     "0", "--storage", "{R}/runs", "--name", "d"], ["--workers", "at least 1", "0"], ["runs/d"]),
    ("evaluate-unfinished-output", ["evaluate", "--predictions", "{R}/empty", "--annotations",
     "{R}/shapes/train/annotations.json", "--output", "{R}/e1.json"],
     ["{R}/empty holds no committed segment table", "re-run the same `maskrcnn segment`"], ["e1.json"]),
    ("evaluate-malformed-annotations", ["evaluate", "--predictions", "{R}/done",
     "--annotations", "{R}/bad.json", "--output", "{R}/e2.json"],
     ["annotations file {R}/bad.json is not valid JSON"], ["e2.json"]),
    ("evaluate-model-of-other-classes", ["evaluate", "--model", "{R}/m2.st", "--annotations",
     "{R}/shapes/train/annotations.json", "--output", "{R}/e3.json"],
     ["model's class names ['a']", "'square'"], ["e3.json"]),
    ("evaluate-bad-flag", ["evaluate", "--model", "{R}/m4.st", "--annotations",
     "{R}/shapes/train/annotations.json", "--limit", "-1", "--output", "{R}/e4.json"],
     ["--limit must be at least 1", "-1"], ["e4.json"]),
    ("query-missing-output", ["query", "{R}/nowhere", "SELECT 1"],
     ["{R}/nowhere holds no committed segment table"], []),
    ("query-bad-flag", ["query", "{R}/done", "SELECT 1", "--format", "xml"],
     ["--format", "'xml'", "csv"], []),
    ("export-missing-output", ["export-coco", "{R}/nowhere", "{R}/x1.json"],
     ["{R}/nowhere holds no committed segment table"], ["x1.json"]),
    ("export-malformed-annotations", ["export-coco", "{R}/done", "{R}/x2.json",
     "--annotations", "{R}/bad.json"], ["annotations file {R}/bad.json is not valid JSON"],
     ["x2.json"]),
    ("render-missing-output", ["render", "{R}/nowhere", "{R}/r1"],
     ["{R}/nowhere holds no committed segment table"], ["r1"]),
    ("render-bad-flag", ["render", "{R}/done", "{R}/r2", "--limit", "-3"],
     ["--limit must be at least 1", "-3"], ["r2"]),
    ("shapes-bad-count", ["shapes", "{R}/s1", "--images", "0"],
     ["--images must be at least 1", "0"], ["s1"]),
    ("shapes-bad-size", ["shapes", "{R}/s2", "--size", "8"],
     ["--size must be at least 32", "8"], ["s2"]),
    ("shapes-output-under-a-file", ["shapes", "{R}/bad.json/sub", "--images", "2"],
     ["{R}/bad.json/sub"], []),
]  # fmt: skip

# Errors raised inside run() (not by argparse): --debug must show their traceback.
DEBUG_CASES = ["segment-missing-input", "train-malformed-annotations", "query-missing-output"]


def _maskrcnn(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # cwd: a stray default output (metrics.json) would land there, not in the repo.
    return run_cli(*argv, cwd=cwd)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Two tiny checkpoints (4 and 2 classes), a 4-image shapes set, a malformed JSON
    file, an empty folder and a finished OUTPUT."""
    from helpers.outputs_fixture import ok_row, write_output

    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from maskrcnn.checkpoint import save
    from pipeline.formats.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("bad-inputs")
    save(MaskRCNN(MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES)), str(root / "m4.st"))
    save(MaskRCNN(MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES[:1] + ["a"])),
         str(root / "m2.st"))  # fmt: skip
    make_shapes_dataset(str(root / "shapes"), 3, 32, seed=0)
    (root / "bad.json").write_text('{"images": [')
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    write_output(str(root / "done"), [ok_row(str(root / "x.png"), 8, 8, [])])
    return root


def tree_digests(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` -> the sha256 of its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def done_before(scratch) -> dict[str, str | None]:
    """The finished OUTPUT's every file and its bytes, before any case runs."""
    return tree_digests(scratch / "done")


@pytest.fixture(scope="module")
def results(scratch, done_before) -> dict[str, tuple[subprocess.CompletedProcess, ...]]:
    """case id -> (plain run, --debug run or None), all run up front, one after the other
    (after the snapshot of the finished OUTPUT)."""
    root = str(scratch)

    def argv(case_argv: list[str]) -> list[str]:
        return [a.replace("{R}", root) for a in case_argv]

    done = {}
    for case_id, case_argv, _, _ in CASES:
        done[case_id, False] = _maskrcnn(argv(case_argv), scratch)
    for case_id in DEBUG_CASES:
        case_argv = next(c[1] for c in CASES if c[0] == case_id)
        debug = [case_argv[0], "--debug", *argv(case_argv[1:])]
        done[case_id, True] = _maskrcnn(debug, scratch)
    return {cid: (done[cid, False], done.get((cid, True))) for cid, *_ in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_line_error_naming_the_input_and_nothing_committed(case, results, scratch):
    case_id, argv, expected, absent = case
    proc, _ = results[case_id]
    command = argv[0]
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    # argparse prints its usage first; ours prints the one line alone.
    assert err_lines and err_lines[-1].startswith(f"maskrcnn {command}: error: "), proc.stderr
    if not any(line.startswith("usage:") for line in err_lines):
        assert len(err_lines) == 1, err_lines
    for text in expected:
        assert text.replace("{R}", str(scratch)) in err_lines[-1], err_lines[-1]
    for rel in absent:
        assert not (scratch / rel).exists(), f"{rel} was left behind by {case_id}"
    assert not (scratch / "metrics.json").exists()


def test_done_output_untouched_by_the_refusals(results, scratch, done_before):
    assert sorted(done_before) == ["_manifest.json", "part-00000.parquet"]
    # Same paths, same bytes: nothing added, removed or rewritten by the refused runs.
    assert tree_digests(scratch / "done") == done_before


@pytest.mark.parametrize("case_id", DEBUG_CASES)
def test_debug_shows_the_traceback(case_id, results):
    plain, debug = results[case_id]
    assert debug is not None and debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    # The same error, now with its traceback.
    reason = plain.stderr.strip().splitlines()[-1].split(": error: ", 1)[1]
    assert reason in debug.stderr
