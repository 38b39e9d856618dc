"""`genart submit` and `genart jobs` against a real Ray head started here, with token auth on and its own HOME.

The head runs as `ray start --head --block` in its own process group, temp dir and ports, so it never touches
the other Ray instances on this machine; every CLI call is a subprocess of .venv/bin/genart, so exit codes are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from genart import ray_jobs
from genart.errors import UserError
from genart.runtime import free_port

sys.path.insert(0, os.path.dirname(__file__))
import ray_procs  # noqa: E402

BIN = Path(sys.executable).parent
GENART = str(BIN / "genart")
RAY = str(BIN / "ray")
HEAD_START_TIMEOUT_S = 180  # as tests/cluster.py's nodes: the box is shared and often loaded
HEAD_START_ATTEMPTS = 3  # `ray start` gives its raylet a fixed 30 s to register; under load that can be missed


def _clean_env(**extra: str) -> dict:
    """This process's environment without any RAY_* setting (the session's own Ray sets RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


@dataclass
class Head:
    url: str
    home: Path  # HOME whose ~/.ray/auth_token is this head's token
    token_file: Path


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-head")
    home = root / "home"
    home.mkdir()
    # Ray's own way to make a token; `ray start --head` then turns token auth on because a token exists.
    subprocess.run([RAY, "get-auth-token", "--generate"], env=_clean_env(HOME=str(home)), check=True,
                   capture_output=True, timeout=60)
    token_file = home / ".ray" / "auth_token"
    assert token_file.read_text().strip()
    for attempt in range(1, HEAD_START_ATTEMPTS + 1):
        started = _start_head(root, home, attempt)
        if started is not None:
            break
    else:
        raise AssertionError(f"ray start --head failed {HEAD_START_ATTEMPTS} times:\n{(root / 'head.log').read_text()[-3000:]}")
    proc, url, temp_dir, log = started
    try:
        # Token auth is really on: the Jobs API refuses a request without the token.
        assert requests.get(f"{url}/api/version", timeout=10).status_code == 401
        yield Head(url=url, home=home, token_file=token_file)
    finally:
        _stop_head(proc, log, temp_dir)


def _start_head(root: Path, home: Path, attempt: int):
    """`ray start --head --block` on new free ports: (process, dashboard URL, temp dir, log) once its dashboard
    answers, or None (everything of this attempt stopped) if it exited first."""
    # Short private temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="genart-head-", dir="/tmp")
    dashboard_port = free_port()
    command = [
        RAY, "start", "--head", "--block", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    # No 30 s node drain on SIGTERM: nothing here needs a graceful Serve hand-over.
    env = _clean_env(HOME=str(home), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(root / "head.log", "a")
    log.write(f"---- attempt {attempt}\n")
    log.flush()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while proc.poll() is None:
        if time.monotonic() > deadline:
            _stop_head(proc, log, temp_dir)
            raise AssertionError(f"the Ray head's dashboard never answered:\n{(root / 'head.log').read_text()[-3000:]}")
        try:
            requests.get(f"{url}/api/version", timeout=2)
            return proc, url, temp_dir, log
        except requests.RequestException:
            time.sleep(0.5)
    _stop_head(proc, log, temp_dir)  # exited early (a raylet that missed its 30 s, a port taken): try again
    return None


def _stop_head(proc: subprocess.Popen, log, temp_dir: str) -> None:
    ray_procs.stop_group(proc)
    log.close()
    # only processes of this head (they name its private temp dir); its agents notice the raylet is gone by
    # polling it, which took over 2 s on a loaded machine (test_sigterm's EXIT_GRACE_S)
    deadline = time.monotonic() + 20
    while (leftovers := ray_procs.mentioning(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    ray_procs.kill_all(leftovers)
    subprocess.run(["rm", "-rf", temp_dir], check=False)
    assert not leftovers, f"Ray processes outlived the head: {leftovers}"


def _api(head: Head, path: str) -> dict | None:
    """GET `path` of the head's HTTP API with the token, as JSON; None for an answer that is not one yet (a slow or
    failed request on a loaded machine, a dashboard error page in plain text): the callers poll to their deadline."""
    headers = {"Authorization": f"Bearer {head.token_file.read_text().strip()}"}
    try:
        answer = requests.get(f"{head.url}{path}", headers=headers, timeout=10).json()
    except (requests.RequestException, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def genart(*args: str, env: dict, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([GENART, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _job_dir(tmp_path: Path) -> Path:
    """A tiny working dir: the job script plus folders the upload must leave out."""
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "big.bin").write_bytes(b"\0" * 1024)
    (work / ".venv").mkdir()
    (work / "job.py").write_text(
        "import os, sys\n"
        "print('hello from job', flush=True)\n"
        "seen = sorted(name for name in os.listdir('.') if not name.startswith('_'))\n"
        "open(sys.argv[1], 'w').write(' '.join(seen))\n"
    )
    return work


# ---------------------------------------------------------------- against the real head


@pytest.mark.slow
def test_submit_runs_the_command_and_exits_zero(head, tmp_path):
    work = _job_dir(tmp_path)
    out = tmp_path / "out.txt"
    env = _clean_env(HOME=str(head.home))  # the token comes from ~/.ray/auth_token
    result = genart("submit", "--address", head.url, "--working-dir", str(work), "--", "python", "job.py", str(out),
                    env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hello from job" in result.stdout
    assert "SUCCEEDED" in result.stderr
    # The job ran in the uploaded working dir, without the excluded folders.
    assert out.read_text().split() == ["job.py"]
    token = head.token_file.read_text().strip()
    assert token not in result.stdout + result.stderr


@pytest.mark.slow
def test_submit_a_genart_workflow_and_check_its_outputs(head, tmp_path):
    """A real two-step genart pipeline as one job: Ray Data runs `prepare` on the head's cluster."""
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "data"
    script = (f"{GENART} datasets synth --out {data}/raw --num 30 --size 16 && "
              f"{GENART} prepare {data}/raw --out {data}/prepared --size 16")
    result = genart("submit", "--address", head.url, "--working-dir", str(work), "--", script,
                    env=_clean_env(HOME=str(head.home)), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "SUCCEEDED" in result.stderr and "prepared 30 images" in result.stdout
    manifest = json.loads((data / "prepared" / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 30 and list(manifest["labels"]) == sorted(p.name for p in (data / "raw").iterdir())


@pytest.mark.slow
def test_failing_command_exits_one_with_the_reason(head, tmp_path):
    env = _clean_env(HOME=str(head.home))
    result = genart("submit", "--address", head.url, "--working-dir", str(_job_dir(tmp_path)), "--",
                    "python", "-c", "import sys; print('about to fail'); sys.exit(3)", env=env)
    assert result.returncode == 1
    assert "about to fail" in result.stdout
    assert "FAILED" in result.stderr and "exit code 3" in result.stderr


@pytest.mark.slow
def test_submission_without_the_token_is_refused(head, tmp_path):
    elsewhere = tmp_path / "other-home"
    elsewhere.mkdir()
    result = genart("submit", "--address", head.url, "--working-dir", str(_job_dir(tmp_path)), "--no-wait", "--",
                    "python", "job.py", "x", env=_clean_env(HOME=str(elsewhere)))
    assert result.returncode == 2
    assert "refused the request: missing or wrong auth token" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_wrong_token_refused_and_token_path_accepted(head, tmp_path):
    elsewhere = tmp_path / "other-home"
    elsewhere.mkdir()
    wrong = genart("jobs", "list", "--address", head.url, env=_clean_env(HOME=str(elsewhere), RAY_AUTH_TOKEN="not-it"))
    assert wrong.returncode == 2
    assert "sent the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert "not-it" not in wrong.stderr
    # --address wins over the environment (Ray's client alone would let RAY_ADDRESS override it).
    right = genart("jobs", "list", "--address", head.url,
                   env=_clean_env(HOME=str(elsewhere), RAY_AUTH_TOKEN_PATH=str(head.token_file),
                                  RAY_ADDRESS="http://127.0.0.1:1", RAY_API_SERVER_ADDRESS="http://127.0.0.1:2"))
    assert right.returncode == 0, right.stderr
    assert right.stdout.startswith(("JOB", "no jobs"))


@pytest.mark.slow
def test_jobs_list_status_logs_stop(head, tmp_path):
    env = _clean_env(HOME=str(head.home))
    submitted = genart("submit", "--address", head.url, "--working-dir", str(_job_dir(tmp_path)), "--no-wait", "--",
                       "python", "-c", "import time; print('started', flush=True); time.sleep(120)", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("raysubmit_")

    # Wait (over plain HTTP, with the token) until the job is running and has printed.
    deadline = time.monotonic() + 60
    while "started" not in str((_api(head, f"/api/jobs/{job_id}/logs") or {}).get("logs")):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)

    listed = genart("jobs", "list", "--address", head.url, env=env)
    assert listed.returncode == 0 and job_id in listed.stdout
    status = genart("jobs", "status", job_id, "--address", head.url, env=env)
    assert status.returncode == 0 and f"{job_id}: RUNNING" in status.stdout
    logs = genart("jobs", "logs", job_id, "--address", head.url, env=env)
    assert logs.returncode == 0 and "started" in logs.stdout

    stopped = genart("jobs", "stop", job_id, "--address", head.url, env=env)
    assert stopped.returncode == 0 and f"stopping {job_id}" in stopped.stdout
    followed = genart("jobs", "logs", job_id, "--follow", "--address", head.url, env=env)
    assert followed.returncode == 1 and "STOPPED" in followed.stderr


@pytest.mark.slow
def test_gpus_reserve_gpus_for_the_entrypoint(head, tmp_path):
    env = _clean_env(HOME=str(head.home))
    submitted = genart("submit", "--address", head.url, "--working-dir", str(_job_dir(tmp_path)), "--gpus", "1",
                       "--no-wait", "--", "echo", "never runs here", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    # The job's supervisor actor (which runs the entrypoint) asks for the GPU; this head has none, so the job
    # waits for one (on a cluster the autoscaler would add a GPU node). Read both over Ray's HTTP APIs.
    supervisor = f"_ray_internal_job_actor_{job_id}"
    deadline = time.monotonic() + 60
    while True:
        actors = _api(head, "/api/v0/actors?detail=1&limit=100") or {}
        listed = ((actors.get("data") or {}).get("result") or {}).get("result") or []
        found = [a for a in listed if a.get("name") == supervisor]
        if found:
            break
        assert time.monotonic() < deadline, "the job's supervisor actor never appeared"
        time.sleep(0.5)
    assert found[0]["required_resources"] == {"GPU": 1.0}
    assert (_api(head, f"/api/jobs/{job_id}") or {}).get("status") == "PENDING"
    assert genart("jobs", "stop", job_id, "--address", head.url, env=env).returncode == 0


@pytest.mark.slow
def test_unknown_job_id_is_one_clear_line(head):
    result = genart("jobs", "status", "raysubmit_doesnotexist", "--address", head.url,
                    env=_clean_env(HOME=str(head.home)))
    assert result.returncode == 2
    assert "no job 'raysubmit_doesnotexist'" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- without a head


def test_unreachable_address_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = genart("jobs", "list", "--address", url, env=_clean_env(HOME=str(tmp_path)))
    assert result.returncode == 2
    expected = f"genart: error: cannot reach Ray at {url}: is the head running? is --address right?"
    assert result.stderr.strip() == expected


def test_a_misspelt_submit_option_or_a_server_without_the_jobs_api_is_one_clear_line(tmp_path):
    """`submit --adress URL -- genart train` sent the job, with `--adress URL` as its command, to the default
    cluster; a Serve port (404), an HTTP error or RAY_ADDRESS=HEAD:6379 gave a traceback or a wrong hint."""
    import http.server
    import threading

    env = _clean_env(HOME=str(tmp_path))
    result = genart("submit", "--adress", "http://127.0.0.1:1", "--", "genart", "train", env=env)
    assert result.returncode == 2 and "No such option '--adress'" in result.stderr
    result = genart("submit", "--gpus", "-1", "--", "genart", "--help", env=env)
    assert result.returncode == 2 and "--gpus" in result.stderr

    class NotJobs(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotJobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        result = genart("jobs", "list", "--address", url, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"genart: error: no Ray Jobs API at {url}: give the head's dashboard address, "
                                         f"usually http://HEAD:8265")
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="GCS address"):
        ray_jobs.resolve_address("head:6379")


def test_an_http_ray_address_for_a_local_command_is_one_clear_line(tmp_path):
    """RAY_ADDRESS=http://HEAD:8265 (Ray's docs set it so for `ray job submit`) made every other command print
    ray.init's ValueError traceback; so did a malformed address."""
    code = "from genart import runtime\nfrom genart.errors import UserError\n" \
           "for a in ('http://127.0.0.1:8265', '127.0.0.1:6379x'):\n" \
           "    try: runtime.init(a)\n    except UserError as e: print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_clean_env(HOME=str(tmp_path))).stdout.splitlines()
    assert out[0].startswith("Ray address http://127.0.0.1:8265: that is a Jobs API (dashboard) URL")
    assert out[1].startswith("cannot connect to Ray at 127.0.0.1:6379x: ")


def test_address_precedence(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert ray_jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert ray_jobs.resolve_address() == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com/")
    assert ray_jobs.resolve_address() == "https://ray.example.com"
    assert ray_jobs.resolve_address("http://head:8265") == "http://head:8265"
    with pytest.raises(UserError, match="Ray Client address"):
        ray_jobs.resolve_address("ray://head:10001")


def test_token_lookup_order(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_jobs.find_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_jobs.find_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    path_file = tmp_path / "token"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert ray_jobs.find_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_jobs.find_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_jobs.find_token()[0] is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot be read"):
        ray_jobs.find_token()


def test_entrypoint_and_runtime_env(tmp_path):
    assert ray_jobs.build_entrypoint(["genart", "train", "cfg.yaml", "--set", "run.name=a b"]) == (
        "genart train cfg.yaml --set 'run.name=a b'"
    )
    assert ray_jobs.build_entrypoint(["python train.py && echo done"]) == "python train.py && echo done"
    runtime_env = ray_jobs.build_runtime_env(tmp_path, pip=["genart==0.1.0"])
    assert runtime_env == {"working_dir": str(tmp_path.resolve()), "excludes": ray_jobs.WORKING_DIR_EXCLUDES,
                           "pip": ["genart==0.1.0"]}
    with pytest.raises(UserError, match="not a folder"):
        ray_jobs.build_runtime_env(tmp_path / "nope")
    # Matched as Ray matches them (gitwildmatch, relative to the working dir): outputs and caches stay home,
    # the package and a small prepared dataset go up.
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", ray_jobs.WORKING_DIR_EXCLUDES)
    left_out = ["data/synth/_genart_cache/ref-inception-abc.npz", "indexes/synth/vectors.npy", "out/samples/a.png",
                "audit/dcgan/pairs.png", "results/quickstart/index.html", ".venv/bin/python"]
    uploaded = ["genart/data/sources.py", "genart/infer/output.py", "data/synth/part-00000.parquet", "workflows/x.py"]
    assert [p for p in left_out if not spec.match_file(p)] == [] and [p for p in uploaded if spec.match_file(p)] == []
