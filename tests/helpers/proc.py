"""`maskrcnn` CLI runs as child processes, for the tests that drive the command end to end."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import IO

from conftest import REPO, VENV_BIN


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a child process: this checkout importable, and RAY_ADDRESS
    dropped so that the child runs its own embedded Ray, not the tests' instance."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
    its environment is :func:`child_env`. Pipes are text.
    """
    return subprocess.Popen(
        [str(VENV_BIN / "maskrcnn"), *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=child_env(env_extra),
        cwd=cwd,
        start_new_session=True,
    )


def run_maskrcnn(
    args: list[str], *, cwd: Path | str, timeout: float
) -> subprocess.CompletedProcess:
    """``maskrcnn ARGS`` to its end (text output captured), then whatever it left in its
    process group killed."""
    proc = maskrcnn_process(args, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it and the processes it started); wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
