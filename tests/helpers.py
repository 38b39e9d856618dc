"""Small pieces several test modules share: a free loopback port, a tiny untrained checkpoint, one torch thread."""

from __future__ import annotations

import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(folder, family: str, image_size: int, labels=(), **cfg_kw) -> str:
    """An untrained, seeded checkpoint of `family` in `folder`, loadable by `genart.models.load`."""
    from genart.models import REGISTRY
    from genart.models.checkpoint import save_checkpoint

    fam = REGISTRY[family]
    cfg = fam.config_cls(**cfg_kw)
    torch.manual_seed(0)
    nets = fam.build(cfg, image_size, len(labels), inference=True)
    save_checkpoint(str(folder), nets, {}, {"family": family, "step": 1, "config": cfg.model_dump(),
                                            "image_size": image_size, "label_names": list(labels)})
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets on a busy 2-core machine: two OpenMP threads spin against other processes and run ~100x slower.
    A module that imports this fixture runs with one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
