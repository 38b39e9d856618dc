"""genart on a real multi-node Ray cluster (tests/cluster.py: a head and two worker nodes on this machine, token
auth on), losing a worker node in the middle of a job. Drivers are `genart` subprocesses given `--address`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import ray_procs  # noqa: E402
from cluster import LocalCluster  # noqa: E402

GENART = str(Path(sys.executable).parent / "genart")
NUM_IMAGES = 160
BAD_INPUTS = {"empty.png": b"", "notes.png": b"not an image at all\n"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One head (no CPUs: every task and actor runs on a worker node) and worker nodes node_a and node_b."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers={"node_a": 3, "node_b": 3}) as running:
        yield running


@pytest.fixture(scope="module")
def style_model(tmp_path_factory) -> str:
    from genart.serve.tiny import make_checkpoint

    return make_checkpoint(str(tmp_path_factory.mktemp("cluster-model") / "style"), "style",
                           {"channels": 4, "num_res_blocks": 1}, 32, seed=7)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cluster-inputs")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        pixels = rng.integers(0, 256, size=(48 + i % 5, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"img{i:03d}.png")
    for name, data in BAD_INPUTS.items():
        (src / name).write_bytes(data)
    return src


def _stylize(cluster, model: str, src: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [GENART, "stylize", "--model", model, "--input", str(src), "--output", str(out), "--address", cluster.address,
            "--concurrency", "2", "--batch-size", "4"]
    return subprocess.Popen(args, env=cluster.env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_cluster_has_two_worker_nodes_with_their_resources(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3
    assert sorted(name for n in nodes for name in n if name.startswith("node_")) == ["node_a", "node_b"]
    assert sum(n.get("CPU", 0) for n in nodes) == 6


@pytest.mark.slow
def test_stylize_survives_losing_a_worker_node(cluster, style_model, inputs, tmp_path):
    reference = tmp_path / "reference"
    run = _stylize(cluster, style_model, inputs, reference, tmp_path / "reference.log")
    assert run.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = _files(reference)
    assert len(expected) == NUM_IMAGES

    out = tmp_path / "disturbed"
    started = time.monotonic()
    run = _stylize(cluster, style_model, inputs, out, tmp_path / "disturbed.log")
    # Lose node_b once the job is really under way: some outputs written, most still to come.
    while len(list(out.glob("*.png"))) < 10:
        assert run.poll() is None, (tmp_path / "disturbed.log").read_text()[-3000:]
        assert time.monotonic() - started < 300, "the job never started writing"
        time.sleep(0.2)
    written_before = len(list(out.glob("*.png")))
    idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    busy = [p for p in ray_procs.describe(cluster.processes("node_b")) if "ray::" in p and not any(i in p for i in idle)]
    assert busy, "node_b ran none of the job's work"
    cluster.kill("node_b")
    assert run.poll() is None and written_before < NUM_IMAGES, "the job finished before the node was lost"
    code = run.wait(timeout=400)
    log = (tmp_path / "disturbed.log").read_text()
    assert code == 0, log[-3000:]

    got = _files(out)
    assert sorted(got) == sorted(expected), "same files"
    assert [name for name in got if got[name] != expected[name]] == [], "same bytes"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix not in (".png", ".jsonl", ".json")]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(Path(e.get("source") or e.get("input") or e.get("path") or "").name for e in errors) == sorted(BAD_INPUTS), errors
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == NUM_IMAGES and manifest["counts"]["errors"] == len(BAD_INPUTS), manifest
