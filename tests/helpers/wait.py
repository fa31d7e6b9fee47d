"""One way for a test to wait for something that happens in another process: poll a
condition with a deadline (never a bare sleep as synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.2,
    gave_up: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> T:
    """``condition()``'s first truthy value, polled every ``interval`` seconds.

    Fails the test naming ``what`` at the deadline, or as soon as ``gave_up()`` returns a
    reason why the condition can no longer come true (a job that ended, a process that
    exited); that reason ends the failure message, and ``context()`` (log tails) after it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        reason = gave_up() if gave_up is not None else None
        if reason is None and time.monotonic() >= deadline:
            reason = f"timed out after {timeout:g}s"
        if reason is not None:
            more = f"\n{context()}" if context is not None else ""
            pytest.fail(f"gave up waiting for {what}: {reason}{more}")
        time.sleep(interval)  # the polling interval of a condition with a deadline
