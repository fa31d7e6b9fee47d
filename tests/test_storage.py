"""pipeline/storage.py: retries with backoff for transient storage errors only."""

from __future__ import annotations

import pytest

from pipeline.storage import retrying


def test_retrying_retries_transient_and_raises_permanent_at_once():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retrying(flaky, what="read") == "ok" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retrying(missing)
    assert len(calls) == 1

    def always() -> None:
        raise TimeoutError("slow down")

    with pytest.raises(OSError, match="write x: slow down"):
        retrying(always, what="write x", attempts=2)
