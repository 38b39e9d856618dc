"""SIGTERM (what Kubernetes, systemd and `docker stop` send) to real `genart` processes on their embedded Ray.

Each command runs as a subprocess with its own RAY_TMPDIR, so the processes of its Ray session (raylet, GCS,
DashboardAgent, RuntimeEnvAgent, workers) are found by that folder on their command lines and by the process tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import ray_procs  # noqa: E402
from genart.runtime import free_port  # noqa: E402

GENART = str(Path(sys.executable).parent / "genart")
START_TIMEOUT_S = 240  # the box is shared and often loaded
STOP_TIMEOUT_S = 90
EXIT_GRACE_S = 20


@pytest.fixture(scope="module")
def style_model(tmp_path_factory) -> str:
    from genart.models.tiny import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("sigterm-model") / "style"), "style", 32, seed=7,
                           channels=4, num_res_blocks=1)


class Command:
    """`genart ARGS` in its own session and Ray temp dir; remembers every process its Ray started."""

    def __init__(self, args: list[str], log: Path):
        # Short path: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="gsig-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=self.temp_dir, PYTHONPATH=os.pathsep.join(sys.path))
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([GENART, *args], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen = ray_procs.Seen()

    def look(self) -> set[int]:
        """This command's Ray processes alive now (every one seen is remembered for the leftover check)."""
        self.seen.add(ray_procs.descendants(self.proc.pid) | ray_procs.mentioning(self.temp_dir))
        return self.seen.alive()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def sigterm_and_wait(self) -> int:
        self.look()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return -999

    def leftovers(self) -> set[int]:
        """Processes of this command's Ray still alive EXIT_GRACE_S after it exited. Ray's agents notice that their
        raylet is gone by polling it; on a loaded machine that took over 2 s."""
        deadline = time.monotonic() + EXIT_GRACE_S
        while True:
            left = self.seen.alive() | ray_procs.mentioning(self.temp_dir)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        ray_procs.kill_all(self.seen.alive() | ray_procs.mentioning(self.temp_dir))
        self.log.close()
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)


def test_serve_sigterm_drains_removes_the_app_and_exits_zero(style_model, tmp_path):
    port = free_port()
    cmd = Command(["serve", "--model", f"starry={style_model}", "--port", str(port)], tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert cmd.proc.poll() is None, cmd.output()[-3000:]
            assert time.monotonic() < deadline, "genart serve never answered"
            if "Ctrl-C to stop." in cmd.output():
                break
            time.sleep(1)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        session = cmd.look()
        names = " ".join(ray_procs.describe(session))
        assert "raylet" in names and "ray::DashboardAgent" in names and "ray::RuntimeEnvAgent" in names, names

        code = cmd.sigterm_and_wait()
        out = cmd.output()
        assert code == 0, f"exit {code}\n{out[-3000:]}"
        assert "stopping: draining requests and removing the app" in out
        assert "Deleting app ['genart']" in out
        left = cmd.leftovers()
        assert not left, "\n".join(ray_procs.describe(left))
    finally:
        cmd.cleanup()


def test_batch_command_sigterm_leaves_nothing_and_reruns(style_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(120):
        Image.new("RGB", (64, 48), (i * 4, 255 - i * 4, 90)).save(src / f"img{i:03d}.png")
    out_dir = tmp_path / "out"
    args = ["stylize", "--model", style_model, "--input", str(src), "--output", str(out_dir)]
    cmd = Command(args, tmp_path / "stylize.log")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        # SIGTERM mid-run: once a Ray worker runs a Data task (its title is no longer ray::IDLE). Before ray.init
        # has returned, SIGTERM is still Ray's own C++ handler's (an abort); see runtime.stop_on_sigterm.
        idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
        while not any("ray::" in p and not any(name in p for name in idle) for p in ray_procs.describe(cmd.look())):
            assert cmd.proc.poll() is None, cmd.output()[-3000:]
            assert time.monotonic() < deadline, "Ray never started its workers"
            time.sleep(0.5)
        code = cmd.sigterm_and_wait()
        out = cmd.output()
        assert code == 143, f"exit {code}\n{out[-3000:]}"  # 128 + SIGTERM: cut short, not done
        assert "genart: stopped by SIGTERM; run the same command again to resume" in out
        assert "Traceback" not in out, out[-3000:]
        left = cmd.leftovers()
        assert not left, "\n".join(ray_procs.describe(left))
    finally:
        cmd.cleanup()

    rerun = Command([*args, "--resume"] if out_dir.exists() else args, tmp_path / "rerun.log")
    try:
        code = rerun.proc.wait(timeout=START_TIMEOUT_S)
        assert code == 0, rerun.output()[-3000:]
        assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(p.name for p in src.iterdir())
    finally:
        rerun.cleanup()


# ---------------------------------------------------------------- training preempted


TRAIN_MAX_STEPS = 300
TINY_DCGAN = ["model.latent_dim=16", "model.base_channels=8", "model.max_channels=32", "model.grid_size=16",
              "model.eval_samples=16", "data.batch_size=8", f"train.max_steps={TRAIN_MAX_STEPS}",
              "train.checkpoint_every_steps=1000", "train.log_every_steps=5", "train.keep_last=5",
              "scaling.num_workers=2", "scaling.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> str:
    """Prepared by `genart prepare` in its own Ray, which has stopped before any training starts."""
    from genart.data.synth import make_synth

    root = tmp_path_factory.mktemp("sigterm-train-data")
    make_synth(str(root / "raw"), num=120, size=32, seed=1)
    prepare = Command(["prepare", str(root / "raw"), "--out", str(root / "synth"), "--size", "32", "--val-fraction", "0.2"],
                      root / "prepare.log")
    try:
        assert prepare.proc.wait(timeout=START_TIMEOUT_S) == 0, prepare.output()[-3000:]
    finally:
        prepare.cleanup()
    return str(root / "synth")


def _no_driver_traceback(out: str) -> bool:
    """No traceback from the driver itself. (Ray's actors' lines are prefixed by their name and pid; on a machine
    running other Ray instances, Train V2's PlacementGroupCleaner prints one: "Found multiple active Ray instances".)"""
    return not any(line.startswith("Traceback") for line in out.splitlines())


def _metrics_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _preempt(args: list[str], run_dir: Path, after_step: int, log: Path) -> tuple[int, str]:
    """Run `genart train`, SIGTERM it once metrics.jsonl passes `after_step`; its exit code and output. No process of
    its Ray may be left."""
    cmd = Command(args, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _metrics_step(run_dir) < after_step:
            assert cmd.proc.poll() is None, cmd.output()[-3000:]
            assert time.monotonic() < deadline, "training never got under way"
            time.sleep(0.2)
        code = cmd.sigterm_and_wait()
        left = cmd.leftovers()
        assert not left, "\n".join(ray_procs.describe(left))
        return code, cmd.output()
    finally:
        cmd.cleanup()


def _complete(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("step-*/state.json"))


@pytest.mark.slow
def test_train_sigterm_checkpoints_and_rerun_resumes(train_data, tmp_path):
    """SIGTERM to the driver: the workers save a checkpoint at their next log step and the command exits 143 with
    nothing left running; the same command resumes there. A checkpoint Ray knows but storage lost (no state.json)
    is skipped for the newest complete one."""
    runs = tmp_path / "runs"
    run_dir = runs / "pre"
    args = ["train", "workflows/configs/dcgan.yaml", "--set", f"data.path={train_data}", "--set", f"run.storage={runs}",
            "--set", "run.name=pre", *[a for s in TINY_DCGAN for a in ("--set", s)]]
    cwd = Path(__file__).resolve().parent.parent
    args[1] = str(cwd / args[1])

    code, out = _preempt(args, run_dir, 10, tmp_path / "train1.log")
    assert code == 143, f"exit {code}\n{out[-3000:]}"
    assert "SIGTERM: saving a checkpoint at the next log step" in out and _no_driver_traceback(out), out[-3000:]
    first = _complete(run_dir)
    assert len(first) == 1 and 10 < first[0] < TRAIN_MAX_STEPS, first
    stopped = first[0]
    assert f"stopped by SIGTERM at step {stopped}; latest checkpoint step-{stopped:06d}" in out
    state = json.loads((run_dir / f"step-{stopped:06d}" / "state.json").read_text())
    assert state["step"] == stopped
    assert not (run_dir / "stop-requested").exists()

    # the same command resumes from the SIGTERM checkpoint; preempted again
    code, out = _preempt(args, run_dir, stopped + 10, tmp_path / "train2.log")
    assert code == 143, f"exit {code}\n{out[-3000:]}"
    assert f"resumed from step-{stopped:06d}" in out, out[-3000:]
    second = _complete(run_dir)
    assert len(second) == 2 and second[0] == stopped and second[1] > stopped + 10, second

    # storage loses the newest checkpoint's state.json (Ray's snapshot still names it): resume from the one before
    (run_dir / f"step-{second[1]:06d}" / "state.json").unlink()
    rerun = Command(args, tmp_path / "train3.log")
    try:
        code = rerun.proc.wait(timeout=START_TIMEOUT_S * 2)
        out = rerun.output()
        assert code == 0, out[-3000:]
        assert f"is missing; resuming from step-{stopped:06d}" in out, out[-3000:]
        # the embedded instance runs no preemption watcher (runtime.init), so no Ray error line about it either
        assert "PreemptionWatcher" not in out, out[-3000:]
        assert not rerun.leftovers(), "\n".join(ray_procs.describe(rerun.leftovers()))
    finally:
        rerun.cleanup()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == TRAIN_MAX_STEPS
    assert {r["start_step"] for r in rows if r["step"] > stopped} == {stopped}, "the rerun continued from the SIGTERM step"
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "no step logged twice"


@pytest.mark.slow
def test_train_worker_sigterm_restarts_from_the_latest_checkpoint(train_data, tmp_path):
    """SIGTERM to one Ray Train worker process (not the driver): Ray Train counts it as a worker failure and restarts
    the group from the latest checkpoint (FailureConfig); the run finishes with every step counted once."""
    runs = tmp_path / "runs"
    run_dir = runs / "wk"
    max_steps = 60
    settings = [s for s in TINY_DCGAN if not s.startswith(("train.max_steps", "train.checkpoint_every_steps"))]
    args = ["train", str(Path(__file__).resolve().parent.parent / "workflows/configs/dcgan.yaml"),
            "--set", f"data.path={train_data}", "--set", f"run.storage={runs}", "--set", "run.name=wk",
            "--set", f"train.max_steps={max_steps}", "--set", "train.checkpoint_every_steps=20",
            *[a for s in settings for a in ("--set", s)]]
    cmd = Command(args, tmp_path / "train.log")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        while not (snapshot.exists() and "step-000020" in snapshot.read_text() and _metrics_step(run_dir) >= 25):
            assert cmd.proc.poll() is None, cmd.output()[-3000:]
            assert time.monotonic() < deadline, "training never got under way"
            time.sleep(0.2)
        workers = [int(p.split(":")[0]) for p in ray_procs.describe(cmd.look()) if "ray::RayTrainWorker" in p]
        assert workers, ray_procs.describe(cmd.seen.alive())
        os.kill(workers[-1], signal.SIGTERM)
        code = cmd.proc.wait(timeout=START_TIMEOUT_S * 2)
        out = cmd.output()
        assert code == 0, out[-3000:]
        assert not cmd.leftovers(), "\n".join(ray_procs.describe(cmd.leftovers()))
    finally:
        cmd.cleanup()
    restarts = sorted({int(s) for s in re.findall(r"resumed from step-(\d+) on", out)})
    assert restarts and restarts[0] >= 20, f"the group restarted from a checkpoint: {restarts}\n{out[-3000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == max_steps
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "no step logged twice"
