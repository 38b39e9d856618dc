"""Small pieces several test modules share: one torch thread (tiny models: genart.models.tiny; a free loopback port:
genart.runtime.free_port), and a Serve app of a few checkpoints for real HTTP."""

from __future__ import annotations

import contextlib
from typing import Iterator

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


@contextlib.contextmanager
def served(checkpoints: dict[str, str], name: str) -> Iterator[str]:
    """genart's Serve app for `checkpoints` ({served name: run or checkpoint}; one replica each, no API key) at
    /<name> on a fresh loopback port of the session's Ray: yields its base URL, deletes the app afterwards."""
    from ray import serve

    from genart.runtime import free_port
    from genart.serve.app import build
    from genart.serve.run import start_http

    host, port = start_http("127.0.0.1", free_port())
    serve.run(build({"models": checkpoints, "api_key_env": "GENART_TEST_" + name.upper().replace("-", "_") + "_NO_KEY",
                     "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}}),
              name=name, route_prefix=f"/{name}")
    try:
        yield f"http://{host}:{port}/{name}"
    finally:
        serve.delete(name)


def generated_frames(base: str, **body):
    """POST /v1/generate with `body` (format json) -> (its JSON reply, the images as (n, H, W, 3) uint8)."""
    import base64
    import io

    import numpy as np
    import requests
    from PIL import Image

    got = requests.post(base + "/v1/generate", json={**body, "format": "json"}, timeout=60)
    assert got.status_code == 200, got.text
    reply = got.json()
    return reply, np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in reply["images"]])


def check_served_generate(base: str, model, name: str) -> None:
    """/v1/models lists `name` as the conditional model `model` (labels a, b, c), and /v1/generate (2 images, seed 5,
    label "b") returns the very pixels of `model.sample([5, 6], labels=[1, 1])`."""
    import numpy as np
    import requests

    from genart.serve.inference import to_uint8

    cards = requests.get(base + "/v1/models", timeout=30).json()["models"]
    assert [(c["name"], c["family"], c["conditional"]) for c in cards] == [(name, model.family, True)]
    _, frames = generated_frames(base, n=2, seed=5, label="b")
    assert np.array_equal(frames, to_uint8(model.sample([5, 6], labels=[1, 1])))
