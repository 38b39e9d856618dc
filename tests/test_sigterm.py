"""SIGTERM (what Kubernetes, systemd and `docker stop` send) to real `genart` processes on their embedded Ray.

Each command runs as a subprocess with its own RAY_TMPDIR, so the processes of its Ray session (raylet, GCS,
DashboardAgent, RuntimeEnvAgent, workers) are found by that folder on their command lines and by the process tree.
"""

from __future__ import annotations

import os
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
from helpers import free_port  # noqa: E402

GENART = str(Path(sys.executable).parent / "genart")
START_TIMEOUT_S = 240  # the box is shared and often loaded
STOP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def style_model(tmp_path_factory) -> str:
    from genart.serve.tiny import make_checkpoint

    return make_checkpoint(str(tmp_path_factory.mktemp("sigterm-model") / "style"), "style",
                           {"channels": 4, "num_res_blocks": 1}, 32, seed=7)


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
        self.seen: set[int] = set()

    def look(self) -> set[int]:
        self.seen |= ray_procs.descendants(self.proc.pid) | ray_procs.mentioning(self.temp_dir)
        return self.seen

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
        time.sleep(2)  # children that are exiting get a moment
        return ray_procs.still_alive(self.seen) | ray_procs.mentioning(self.temp_dir)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        ray_procs.kill_all(ray_procs.still_alive(self.seen) | ray_procs.mentioning(self.temp_dir))
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
