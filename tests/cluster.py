"""A real multi-node Ray cluster on this machine for tests: a head and worker nodes, each a `ray start --block`
subprocess in its own process group, with token auth on (a private HOME holds the token) and a private temp dir,
so it never meets the session's embedded Ray (tests/conftest.py) nor anyone else's.

    with LocalCluster(tmp, workers={"node_a": 3, "node_b": 3}) as cluster:   # custom resource name -> CPUs
        subprocess.run([GENART, "stylize", "--address", cluster.address, ...], env=cluster.env())
        cluster.kill("node_b")                                                   # SIGKILL the node's processes
Drivers connect from subprocesses (`--address`), so a test process that already holds the shared embedded Ray
needs no second connection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray_procs
from genart.runtime import free_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 180
NODE_START_ATTEMPTS = 3


def clean_env(**extra: str) -> dict:
    """This process's environment without RAY_* settings (the session's own Ray sets some), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    return env


class LocalCluster:
    def __init__(self, root: Path, workers: dict[str, int], head_cpus: int = 0):
        self.root = Path(root)
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.workers = dict(workers)
        self.head_cpus = head_cpus
        self.seen = ray_procs.Seen()
        self._new_session()

    def _new_session(self) -> None:
        """A fresh Ray temp dir and no nodes yet: before the first start, and before a rebuild."""
        # Short path: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="gclu-", dir="/tmp")
        self.address = ""  # the GCS address, once the head is up
        self.nodes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ start / stop

    def __enter__(self) -> "LocalCluster":
        try:
            subprocess.run([RAY, "get-auth-token", "--generate"], env=self._ray_env(), check=True,
                           capture_output=True, timeout=60)
            self._start("head", lambda: ["--head", f"--port={free_port()}", f"--num-cpus={self.head_cpus}",
                                         "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                                         f"--ray-client-server-port={free_port()}"])
            self.address = self._head_address()
            for name in self.workers:
                self.start_worker(name)
            self._wait_for_nodes(len(self.nodes))
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_worker(self, name: str) -> None:
        resources = json.dumps({name: 1})
        self._start(name, lambda: [f"--address={self.address}", f"--num-cpus={self.workers[name]}",
                                   f"--resources={resources}", f"--dashboard-agent-listen-port={free_port()}",
                                   f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                                   f"--runtime-env-agent-port={free_port()}"])

    def _start(self, name: str, make_args) -> None:
        """`ray start --block` until it says the node runs; retried with new ports, since on a loaded machine a raylet
        can miss Ray's fixed 30 s registration window, and a free port can be taken before Ray binds it."""
        # A joining node sends the token only in token mode; the head turns it on itself (the token exists).
        env = self._ray_env() if name == "head" else {**self._ray_env(), "RAY_AUTH_MODE": "token"}
        log_path = self.root / f"{name}.log"
        for attempt in range(NODE_START_ATTEMPTS):
            log = open(log_path, "w")
            command = [RAY, "start", "--block", "--disable-usage-stats", *make_args()]
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.nodes[name] = proc
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and "Ray runtime started" not in log_path.read_text():
                assert time.monotonic() < deadline, f"ray start ({name}) hung:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
            if proc.poll() is None:
                return
            self.processes(name)
            ray_procs.kill_all(self.seen.alive())
        raise AssertionError(f"ray start ({name}) failed {NODE_START_ATTEMPTS} times:\n{log_path.read_text()[-3000:]}")

    def _head_address(self) -> str:
        """GCS address as the head advertises it (its node IP, which need not be 127.0.0.1), from its log. Ray prints
        it a few lines after "Ray runtime started", which may reach the log first: wait for it."""
        log_path = self.root / "head.log"
        deadline = time.monotonic() + 30
        while True:
            for line in log_path.read_text().splitlines():
                if "ray start --address='" in line:
                    return line.split("--address='", 1)[1].split("'", 1)[0]
            assert time.monotonic() < deadline, f"the Ray head did not say its address:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)

    def _ray_env(self) -> dict:
        # No 30 s drain on SIGTERM at teardown: nothing here needs a graceful Serve hand-over. Ray Train gives a worker
        # group 60 s to start; after a node is killed it first tries the old size and waits all of that out before
        # going elastic: 30 s is still ample for tiny workers on live nodes and halves that wait.
        # The GCS marks a node dead after 5 failed health checks; each check waits 10 s by default. Three nodes share
        # 2 cores here, and when a node is killed the survivor's raylet can stall longer than that while it starts
        # workers: 30 s per check spares a live node, while a killed one refuses at once and is dropped as before.
        return clean_env(HOME=str(self.home), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                         RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30", RAY_health_check_timeout_ms="30000")

    def env(self, **extra: str) -> dict:
        """Environment for a driver subprocess: the cluster's token, sent in token mode (as Ray's client wants)."""
        return clean_env(HOME=str(self.home), RAY_AUTH_TOKEN_PATH=str(self.home / ".ray" / "auth_token"),
                         RAY_AUTH_MODE="token", **extra)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes and their resources, asked through a subprocess driver (public ray.nodes())."""
        script = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); "
                  "print('NODES ' + json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % self.address)
        result = subprocess.run([sys.executable, "-c", script], env=self.env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        # Ray may print its own notes (e.g. a dead node's "lagging heartbeats") around ours: take the marked line.
        lines = [line for line in result.stdout.splitlines() if line.startswith("NODES ")]
        assert lines, result.stdout[-2000:]
        return json.loads(lines[-1][len("NODES "):])

    def _wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for name, proc in self.nodes.items():
                assert proc.poll() is None, f"ray start ({name}) exited:\n{(self.root / f'{name}.log').read_text()[-3000:]}"
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except AssertionError:
                pass
            assert time.monotonic() < deadline, f"the cluster never reached {count} nodes"
            time.sleep(1)

    def restore(self) -> None:
        """Make the cluster exactly head + workers again, so the next test starts whole: rejoin the lost worker nodes
        or, if the cluster cannot be brought back (seen once in CI, cause unknown), start a new one in its place and
        say why on stderr (a new address: tests read `cluster.address` after restoring)."""
        try:
            self._rejoin()
        except (AssertionError, subprocess.TimeoutExpired) as failure:
            print(f"LocalCluster: started afresh, since {failure}", file=sys.stderr)
            self.__exit__()
            self._new_session()
            self.__enter__()

    def _rejoin(self) -> None:
        """Bring back every worker node a test killed (or whose `ray start` has exited since), and wait until the
        cluster is exactly head + workers again (a killed node stays "alive" in the GCS until its heartbeats time
        out). A node that exits while rejoining is started again."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for name in self.workers:
                if name not in self.nodes or self.nodes[name].poll() is not None:
                    self.start_worker(name)
            seen = self._try_alive_nodes()
            if (isinstance(seen, list) and len(seen) == 1 + len(self.workers)
                    and all(sum(name in n for n in seen) == 1 for name in self.workers)):
                return
            assert time.monotonic() < deadline, f"the cluster never came back to head + workers\n{self.status(seen)}"
            time.sleep(1)

    def status(self, nodes: list[dict] | str | None = None) -> str:
        """What a failing test should show: each `ray start`'s state and log tail, and the live nodes."""
        lines = [f"alive nodes: {nodes if nodes is not None else self._try_alive_nodes()}"]
        for name in ["head", *self.workers]:
            proc = self.nodes.get(name)
            state = "not started" if proc is None else ("running" if proc.poll() is None else f"exited {proc.returncode}")
            log = self.root / f"{name}.log"
            tail = log.read_text()[-800:] if log.exists() else ""
            lines.append(f"--- {name}: {state}\n{tail}")
        return "\n".join(lines)

    def _try_alive_nodes(self) -> list[dict] | str:
        """alive_nodes(), or why there was no answer."""
        try:
            return self.alive_nodes()
        except (AssertionError, subprocess.TimeoutExpired) as e:
            return f"no answer: {e}"

    def processes(self, name: str) -> set[int]:
        proc = self.nodes[name]
        return self.seen.add({proc.pid} | ray_procs.descendants(proc.pid))

    def kill(self, name: str) -> None:
        """Lose the node: SIGKILL its `ray start`, raylet, agents and workers at once (no drain, no goodbye)."""
        pids = self.processes(name)
        ray_procs.kill_all(pids)
        self.nodes[name].wait(timeout=30)
        del self.nodes[name]

    def __exit__(self, *exc) -> None:
        for name in list(self.nodes)[::-1]:
            proc = self.nodes[name]
            self.processes(name)
            ray_procs.stop_group(proc)
        time.sleep(1)
        ray_procs.kill_all(self.seen.alive() | ray_procs.mentioning(self.temp_dir))
        # Keep Ray's own logs beside the test's (pytest keeps the last runs' tmp dirs): a failure can be read later.
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        try:
            shutil.copytree(logs, self.root / f"ray-logs-{Path(self.temp_dir).name}", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        except (OSError, shutil.Error):
            pass  # a missing or half-copied log dir must not fail the teardown
        shutil.rmtree(self.temp_dir, ignore_errors=True)
