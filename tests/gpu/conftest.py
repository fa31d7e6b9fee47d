"""CUDA tests: every test here is marked ``gpu``; `make test-gpu` runs them, `make test`
never collects this folder (see the root conftest's collect_ignore)."""

from __future__ import annotations

import pytest
import torch
from helpers.gpu_cases import device_under_test, set_strict_fp32


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test (cuda, or GPU_TEST_DEVICE); no CUDA device is an error."""
    try:
        dev = device_under_test()
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    set_strict_fp32()
    return dev
