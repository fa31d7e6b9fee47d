"""`maskrcnn` CLI runs as child processes, for the tests that drive the command end to end."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import IO

from conftest import REPO, VENV_BIN


def maskrcnn_process(
    args: list[str],
    *,
    cwd: Path | str,
    env_extra: dict[str, str] | None = None,
    stdout: int | IO = subprocess.PIPE,
    stderr: int | IO = subprocess.PIPE,
) -> subprocess.Popen:
    """``maskrcnn ARGS`` from this checkout, started in its own process group.

    Its own group, so :func:`kill_group` also ends the Ray processes it starts;
    RAY_ADDRESS is dropped so it runs on its own embedded Ray, not the tests'.
    Pipes are text.
    """
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [str(VENV_BIN / "maskrcnn"), *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it and the processes it started); wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
