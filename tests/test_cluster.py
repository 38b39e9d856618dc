"""genart on a real multi-node Ray cluster (tests/cluster.py: a head and two worker nodes on this machine, token
auth on), losing a worker node in the middle of a job. Drivers are `genart` subprocesses given `--address`.
"""

from __future__ import annotations

import json
import os
import signal
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
# After a lost node a job that goes on writes again within ~30 s here (three nodes on two cores); silence for this
# long means Ray could not recover the work in flight.
STALL_S = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One head (no CPUs: every task and actor runs on a worker node) and worker nodes node_a and node_b."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers={"node_a": 3, "node_b": 3}) as running:
        yield running


@pytest.fixture(scope="module")
def style_model(tmp_path_factory) -> str:
    from genart.models.tiny import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("cluster-model") / "style"), "style", 32, seed=7,
                           channels=4, num_res_blocks=1)


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


def _stylize(cluster, model: str, src: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = [GENART, "stylize", "--model", model, "--input", str(src), "--output", str(out), "--address", cluster.address,
            "--concurrency", "2", "--batch-size", "4", *extra]
    return subprocess.Popen(args, env=cluster.env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_cluster_has_two_worker_nodes_with_their_resources(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3
    assert sorted(name for n in nodes for name in n if name.startswith("node_")) == ["node_a", "node_b"]
    assert sum(n.get("CPU", 0) for n in nodes) == 6


def _busy_on(cluster, node: str) -> list[str]:
    """The node's Ray processes running job work now (workers go back to ray::IDLE between tasks)."""
    idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    return [p for p in ray_procs.describe(cluster.processes(node)) if "ray::" in p and not any(i in p for i in idle)]


@pytest.mark.slow
def test_stylize_survives_losing_a_worker_node(cluster, style_model, inputs, tmp_path):
    """node_b is SIGKILLed while it runs the job's work. The job either finishes, or (when Ray cannot recover the
    work in flight: a hang, seen once in about twenty kills) stops within --stall-timeout with its one line, and
    --resume finishes it. Either way: every input written once, byte for byte as an undisturbed run."""
    reference = tmp_path / "reference"
    run = _stylize(cluster, style_model, inputs, reference, tmp_path / "reference.log")
    assert run.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = _files(reference)
    assert len(expected) == NUM_IMAGES

    out, log = tmp_path / "disturbed", tmp_path / "disturbed.log"
    started = time.monotonic()
    run = _stylize(cluster, style_model, inputs, out, log, "--stall-timeout", str(STALL_S))
    # Lose node_b once the job is really under way (some outputs written, most still to come), at a moment it is
    # running the job's work: watched all along, since one look can fall between two of its tasks.
    while len(list(out.glob("*.png"))) < 10 or not _busy_on(cluster, "node_b"):
        assert run.poll() is None, f"the job ended before node_b was seen at work:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - started < 300, "the job never got going on both nodes"
        time.sleep(0.1)
    cluster.kill("node_b")
    try:
        written = len(list(out.glob("*.png")))
        assert run.poll() is None and written < NUM_IMAGES, f"the job finished as node_b was lost ({written} written)"
        try:
            code = run.wait(timeout=STALL_S + 300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job hung after node_b was lost ({len(list(out.glob('*.png')))} of {NUM_IMAGES} "
                                 f"written):\n{log.read_text()[-4000:]}\n{cluster.status()}")
        if code == 2 and "no output for" in log.read_text():
            import warnings

            warnings.warn(f"stylize stalled after node_b was lost ({len(_files(out))} written): finished by --resume")
            cluster.restore()
            run = _stylize(cluster, style_model, inputs, out, tmp_path / "resumed.log", "--resume")
            code, log = run.wait(timeout=300), tmp_path / "resumed.log"
    finally:
        if run.poll() is None:
            run.kill()  # a hung driver must not hold the cluster while it is restored
        cluster.restore()  # the shared cluster goes to the next test whole
    assert code == 0, log.read_text()[-3000:]

    got = _files(out)
    assert sorted(got) == sorted(expected), "same files"
    assert [name for name in got if got[name] != expected[name]] == [], "same bytes"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix not in (".png", ".jsonl", ".json")]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(Path(e.get("source") or e.get("input") or e.get("path") or "").name for e in errors) == sorted(BAD_INPUTS), errors
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == NUM_IMAGES and manifest["counts"]["errors"] == len(BAD_INPUTS), manifest


# ---------------------------------------------------------------- training loses a node


TRAIN_SETTINGS = ["model.latent_dim=16", "model.base_channels=8", "model.max_channels=32", "model.grid_size=16",
                  "model.eval_samples=16", "data.batch_size=8", "data.cache_max_mb=0", "train.max_steps=100000",
                  "train.checkpoint_every_steps=20", "train.log_every_steps=5", "train.keep_last=50",
                  # [1, 2] elastic; 2 CPUs per worker on 3-CPU nodes: one worker per node, 1 CPU left for Ray Data
                  "scaling.num_workers=[1, 2]", "scaling.cpus_per_worker=2", "scaling.elastic_resize_interval_s=5",
                  "run.max_failures=3", "run.name=elastic"]


def _registered(run_dir: Path) -> list[int]:
    """Checkpoint steps Ray's controller has taken in (its snapshot file; read, never written)."""
    import re

    try:
        text = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return []
    return sorted({int(m) for m in re.findall(r"step-(\d{6})", text)})


def _wait(what: str, predicate, run: subprocess.Popen, log: Path, timeout_s: float = 420):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert run.poll() is None, f"the run ended while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"never saw {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def _starts(log: Path) -> list[tuple[int, int]]:
    """(start step, workers) of every worker group rank 0 started, in order."""
    import re

    found = []
    # dict.fromkeys: the driver may get a worker's line once per node's log monitor (seen 3x here); the pid tells
    # two groups apart
    for line in dict.fromkeys(log.read_text().splitlines()):
        m = re.search(r"dcgan: (?:started|resumed from step-(\d+)) on (\d+) worker", line)
        if m:
            found.append((int(m.group(1) or 0), int(m.group(2))))
    return found


@pytest.mark.slow
def test_elastic_training_survives_a_lost_node_and_grows_back(cluster, tmp_path):
    """2 workers, one per worker node. node_b is SIGKILLed: the run goes on with 1 worker from its latest checkpoint;
    node_b comes back: the run grows to 2 workers again, again from its latest checkpoint. SIGTERM ends it."""
    from genart.data.synth import make_synth

    cluster.restore()  # both worker nodes up, whatever ran before
    make_synth(str(tmp_path / "raw"), num=120, size=32, seed=1)
    prep = subprocess.run([GENART, "prepare", str(tmp_path / "raw"), "--out", str(tmp_path / "synth"), "--size", "32",
                           "--val-fraction", "0.2", "--address", cluster.address], env=cluster.env(),
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    runs, log = tmp_path / "runs", tmp_path / "train.log"
    run_dir = runs / "elastic"
    config = str(Path(__file__).resolve().parent.parent / "workflows/configs/dcgan.yaml")
    args = [GENART, "train", config, "--address", cluster.address, "--set", f"data.path={tmp_path / 'synth'}",
            "--set", f"run.storage={runs}", *[a for s in TRAIN_SETTINGS for a in ("--set", s)]]
    started = time.monotonic()
    run = subprocess.Popen(args, env=cluster.env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        # The first group may get 1 worker, when node_b's CPUs are still held by the prepare job's last tasks (seen
        # once in CI): the elastic run grows to 2 as they free up. What follows counts from the first 2-worker group.
        def paired() -> list[int]:  # [index of the first 2-worker start] once that group has checkpointed
            starts = _starts(log)
            k = next((i for i, (_, workers) in enumerate(starts) if workers == 2), None)
            return [k] if k is not None and [c for c in _registered(run_dir) if c > starts[k][0]] else []

        k = _wait("2 workers and a checkpoint of theirs", paired, run, log)[0]
        before_kill = _registered(run_dir)[-1]
        cluster.kill("node_b")
        killed_at = time.monotonic()
        shrunk = _wait("a restart on 1 worker", lambda: [s for s in _starts(log)[k + 1:] if s[1] == 1], run, log)[0]
        assert shrunk[0] >= before_kill, f"resumed from {shrunk[0]}, but step {before_kill} was checkpointed"
        _wait("a checkpoint made by the survivor", lambda: [s for s in _registered(run_dir) if s > shrunk[0]], run, log)
        shrink_s = time.monotonic() - killed_at

        cluster.start_worker("node_b")
        back_at = time.monotonic()
        grown = _wait("a restart on 2 workers", lambda: [s for s in _starts(log)[k + 2:] if s[1] == 2], run, log)[0]
        grow_s = time.monotonic() - back_at
        assert grown[0] > shrunk[0], "the grown group resumed from the survivor's checkpoint"
        _wait("a checkpoint after growing", lambda: [s for s in _registered(run_dir) if s > grown[0]], run, log)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
        if "node_b" not in cluster.nodes:
            cluster.start_worker("node_b")
    out = log.read_text()
    assert code == 143, out[-3000:]
    starts = _starts(log)
    assert [w for _, w in starts[k:]] == [2, 1, 2] and all(w == 1 for _, w in starts[:k]), starts
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "each step logged once: rows after a resume point replace the lost ones"
    assert [r["start_step"] for r in rows] == sorted(r["start_step"] for r in rows)
    assert {r["start_step"] for r in rows} <= {0, *[s for s, _ in starts]}
    print(f"elastic: kill -> 1-worker checkpoint {shrink_s:.0f} s, node back -> 2 workers {grow_s:.0f} s, "
          f"total {time.monotonic() - started:.0f} s, starts {starts}, last step {steps[-1]}")
