"""Shared fixtures: one local Ray for the whole session, a real S3 API server (moto) on loopback, tiny data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from genart.runtime import free_port

# Quiet, deterministic, CPU-only defaults for every test process and the Ray workers it starts.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the standard AWS variables pointing at it (as users set for MinIO)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test S3 server."""
    import boto3

    name = f"genart-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One embedded Ray for the whole session, started the way genart starts it (S3 variables already set,
    so Ray workers inherit the test endpoint)."""
    import ray

    from genart import runtime

    runtime.init(num_cpus=6)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small labelled synthetic image folder (5 genres), shared by the session."""
    from genart.data.synth import make_synth

    out = tmp_path_factory.mktemp("synth")
    make_synth(str(out), num=100, size=32, seed=0)
    return str(out)


SEARCH_GENRES = ("stripes", "grid", "noise", "gradient")  # synth's genres but circles (they collide: test_search.py)


@pytest.fixture(scope="session")
def search_index(ray_session, tmp_path_factory) -> dict:
    """A real `genart index` (the Ray Data job) over 40 tiny synth pictures, embedded by an untrained critic of the
    default width (a deterministic feature map); shared by the serving and playground tests.
    {"index": folder, "images": the indexed folder, "critic": checkpoint}"""
    from genart.data.synth import make_synth
    from genart.infer import RunOptions
    from genart.search.index import build_index
    from genart.models.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("search")
    critic = tiny_checkpoint(root / "critic", "critic", 32, ("a", "b"), base_channels=32, num_stages=3, embed_dim=128)
    make_synth(str(root / "art"), num=40, size=32, seed=3, genres=SEARCH_GENRES)
    out = str(root / "index")
    build_index(str(root / "art"), out, features=f"critic:{critic}", run=RunOptions(batch_size=32, progress=False))
    return {"index": out, "images": str(root / "art"), "critic": critic}


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium (`make browser` installs it); missing = a failure, never a skip."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
