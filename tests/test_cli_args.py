"""The shared argparse types (jobs/args.py) and segment's INPUT check coming first.

The INPUT tests run `maskrcnn segment` in a fresh interpreter, so that what the
failing run imported can be read back: a run that stops at INPUT never imports
Ray (so never starts it) and never reads the model (the --model given does not
exist, and its error would name the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.proc import child_env

from jobs.args import actors, non_negative, positive_int, score
from jobs.cli import main as cli_main


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (positive_int, "1", 1),
        (positive_int, "12", 12),
        (non_negative, "0", 0.0),
        (non_negative, "2.5", 2.5),
        (score, "0", 0.0),
        (score, "1", 1.0),
        (score, "0.25", 0.25),
        (actors, "3", (3, 3)),
        (actors, "1,4", (1, 4)),
        (actors, "2,2", (2, 2)),
    ],
)
def test_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (positive_int, "0", "a positive integer"),
        (positive_int, "-2", "a positive integer"),
        (positive_int, "x", "a positive integer"),
        (positive_int, "1.5", "a positive integer"),
        (non_negative, "-0.5", "a number >= 0"),
        (non_negative, "many", "a number >= 0"),
        (non_negative, "nan", "a number >= 0"),
        (non_negative, "inf", "a number >= 0"),
        (score, "1.5", "a score in 0..1"),
        (score, "-0.1", "a score in 0..1"),
        (score, "nan", "a score in 0..1"),
        (score, "high", "a score in 0..1"),
        (actors, "0", "N or MIN,MAX with 1 <= MIN <= MAX"),
        (actors, "3,1", "N or MIN,MAX with 1 <= MIN <= MAX"),
        (actors, "1,2,3", "N or MIN,MAX with 1 <= MIN <= MAX"),
        (actors, "two", "N or MIN,MAX with 1 <= MIN <= MAX"),
        (actors, "", "N or MIN,MAX with 1 <= MIN <= MAX"),
    ],
)
def test_types_refuse_naming_the_value_and_what_was_expected(parse, text, expected):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == f"expected {expected}, got {text!r}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["segment", "in", "out", "--model", "m.st", "--actors", "3,1"],
            "argument --actors: expected N or MIN,MAX with 1 <= MIN <= MAX, got '3,1'",
        ),
        (
            ["segment", "in", "out", "--model", "m.st", "--score-threshold", "2"],
            "argument --score-threshold: expected a score in 0..1, got '2'",
        ),
        (
            ["segment", "in", "out", "--model", "m.st", "--gpus-per-actor", "-1"],
            "argument --gpus-per-actor: expected a number >= 0, got '-1'",
        ),
        (["demo", "--train-iters", "0"], "argument --train-iters: expected a positive integer"),
    ],
)
def test_the_commands_use_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _fresh_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a new interpreter (the repo importable); its last stdout line, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_modules_import_nothing_heavy(tmp_path):
    """`maskrcnn --help` builds every parser: none may import torch, Ray or pyarrow."""
    loaded = _fresh_python(
        "import json, sys\n"
        "from jobs.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps([m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules]))\n",
        tmp_path,
    )
    assert loaded == []


def test_segment_checks_input_before_the_model_and_ray(tmp_path):
    """Each bad INPUT, with a --model that does not exist: INPUT's error, exit 2, no OUTPUT,
    and neither Ray nor torch imported by the process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "comments.txt").write_text("# nothing listed yet\n\n")
    (tmp_path / "table.csv").write_text("uri\n")
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "nouri.parquet")
    cases = {
        "nowhere": "no such folder or prefix",
        "empty": "holds no image",
        "missing.txt": "no such file",
        "comments.txt": "lists no URI",
        "nouri.parquet": "has no `uri` column",
        "table.csv": "is neither an image",
    }
    code = f"""
import contextlib, io, json, sys
from jobs.cli import main
root = {str(tmp_path)!r}
results = {{}}
for name in {sorted(cases)!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["segment", f"{{root}}/{{name}}", f"{{root}}/out-{{name}}",
                     "--model", f"{{root}}/nomodel.safetensors"])
    results[name] = [code, err.getvalue()]
heavy = [m for m in ("ray", "torch") if m in sys.modules]
print(json.dumps({{"results": results, "imported": heavy}}))
"""
    got = _fresh_python(code, tmp_path)
    for name, reason in cases.items():
        code, stderr = got["results"][name]
        assert code == 2, (name, stderr)
        line = stderr.strip().splitlines()[0]
        assert line.startswith(f"maskrcnn segment: error: INPUT {tmp_path}/{name}"), line
        assert reason in line, line
        assert "nomodel" not in line, line  # the model was not read first
        assert not (tmp_path / f"out-{name}").exists(), name
    # Neither Ray (so never started) nor torch (so no model read) was even imported.
    assert got["imported"] == []


def tree_bytes(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (recursively) -> its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def test_bad_input_with_overwrite_keeps_the_finished_output(tmp_path):
    """--overwrite replaces OUTPUT only once INPUT is known good: a typo loses nothing."""
    from helpers.outputs_fixture import ok_row, write_output

    done = tmp_path / "done"
    write_output(str(done), [ok_row(str(tmp_path / "x.png"), 8, 8, [])])
    before = tree_bytes(done)
    assert sorted(before) == ["_manifest.json", "part-00000.parquet"]
    got = _fresh_python(
        "import contextlib, io, json\n"
        "from jobs.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    code = main(['segment', {str(tmp_path / 'typo')!r}, {str(done)!r}, '--overwrite',\n"
        f"                 '--model', {str(tmp_path / 'nomodel.safetensors')!r}])\n"
        "print(json.dumps([code, err.getvalue()]))\n",
        tmp_path,
    )
    assert got[0] == 2 and f"INPUT {tmp_path}/typo: no such folder or prefix" in got[1], got
    assert tree_bytes(done) == before  # same paths (folders too), same bytes
