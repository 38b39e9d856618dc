"""Small pieces several test modules share: one torch thread (tiny models: genart.models.tiny; a free loopback port:
genart.runtime.free_port)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets on a busy 2-core machine: two OpenMP threads spin against other processes and run ~100x slower.
    A module that imports this fixture runs with one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
