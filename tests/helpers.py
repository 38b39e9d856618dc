"""Small pieces several test modules share: a free loopback port, one torch thread (tiny models: genart.models.tiny)."""

from __future__ import annotations

import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets on a busy 2-core machine: two OpenMP threads spin against other processes and run ~100x slower.
    A module that imports this fixture runs with one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
