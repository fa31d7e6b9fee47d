"""`maskrcnn ARGS` run inside the test process through ``jobs.cli.main``, output captured.

For the tests of argument handling, error lines and printing: they need no process of
their own, and a subprocess costs seconds of interpreter, torch and Ray imports each.
What comes back has the shape of ``subprocess.run``'s result. An exception that escapes
``main`` (``--debug``) is printed as the interpreter prints an uncaught one, exit code 1.
The console script itself is run as a process by tests/test_install.py and the
end-to-end tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import traceback
from pathlib import Path


def run_cli(*args: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``maskrcnn ARGS`` in this process (in ``cwd`` when given); stdout, stderr as text."""
    from jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors, and --help
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # noqa: BLE001 - what `python` does with an uncaught error
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["maskrcnn", *args], code, out.getvalue(), err.getvalue())
