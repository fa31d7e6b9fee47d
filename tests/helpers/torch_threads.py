"""An autouse fixture for model tests: one torch intra-op thread for the module.

On a shared 2-core machine two intra-op threads spin against other processes and
run up to 10x slower than one. Import it into a test module to use it:
``from torch_threads import one_thread  # noqa: F401``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
