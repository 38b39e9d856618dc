"""Run genart commands on a Ray cluster as Ray jobs, through the Jobs API on the head's dashboard port.

    genart submit --address http://127.0.0.1:8265 -- genart train workflows/configs/dcgan.yaml
    genart jobs list | status ID | logs ID [--follow] | stop ID
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

from genart.errors import UserError, one_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Left out of the uploaded working_dir: environments, history, outputs and caches are large and never needed
# by a job (Ray also skips whatever .gitignore lists). gitignore patterns: "/out/" is the top folder only (a bare
# "data" would drop the genart/data package too, so data/ is uploaded: a job may read a small prepared set from it);
# _genart_cache holds evaluation reference statistics (~115 MB each with Inception), rebuilt where they are needed.
WORKING_DIR_EXCLUDES = [".venv", ".git", "results", "runs", "__pycache__", "_genart_cache", "/out/", "/indexes/",
                        "/audit/"]
TERMINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
# Seconds to wait for the head to answer at all before saying it is unreachable.
CONNECT_TIMEOUT_S = 10.0
# Polling interval while waiting for a terminal status after the log stream closed.
STATUS_POLL_S = 0.5
# The SDK's own INFO lines (package uploads, websocket closed) would interleave with the job's logs.
QUIET_LOGGERS = [
    "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging",
]


# ---------------------------------------------------------------- address and token


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local default.

    Same environment precedence as `ray job submit`; only HTTP(S) addresses of the dashboard make sense here.
    """
    url = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    url = url.strip().rstrip("/")
    if url in ("", "auto", "local"):
        return DEFAULT_ADDRESS
    if url.startswith("ray://"):
        raise UserError(
            f"{url} is a Ray Client address, but jobs go through the Jobs API on the dashboard port; "
            f"pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)"
        )
    if "://" not in url:
        if url.rsplit(":", 1)[-1] == "6379":  # RAY_ADDRESS as the other commands take it
            raise UserError(f"{url} is the cluster's GCS address (what `--address` of train, prepare and the batch "
                            f"jobs takes); jobs go through the dashboard's Jobs API: --address http://HEAD:8265")
        url = "http://" + url
    return url


def find_token() -> tuple[str | None, str]:
    """The cluster's auth token and where it came from, found where Ray 2.60 looks, in Ray's order.

    RAY_AUTH_TOKEN, then the file in RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. Unlike Ray's own client,
    this does not also require RAY_AUTH_MODE=token; RAY_AUTH_MODE=disabled still means "send nothing".
    """
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return value, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as a misconfiguration rather than falling back.
        where = f"RAY_AUTH_TOKEN_PATH={path}"
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"{where} cannot be read ({exc.strerror}); point it at the cluster's token file") from None
        if not token:
            raise UserError(f"{where} is an empty file; put the cluster's token in it")
        return token, where
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None, "no token found"
    return (token, str(default)) if token else (None, f"{default} is empty")


# ---------------------------------------------------------------- connecting


class JobsClient:
    """A JobSubmissionClient for one cluster that turns connection, auth and unknown-job errors into UserError."""

    def __init__(self, address: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.url = resolve_address(address)
        token, self.token_source = find_token()
        self.sent_token = token is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # The SDK has no timeout of its own: probe first so an unreachable head fails fast, not never.
        try:
            requests.get(f"{self.url}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
        except requests.RequestException:
            raise self._unreachable() from None
        # Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; hide them
        # so the address resolved above is the one used.
        with _env_removed("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            try:
                self.client = JobSubmissionClient(self.url, headers=headers)
            except AuthenticationError:
                raise self._auth_refused() from None
            except ConnectionError:
                raise self._unreachable() from None
            except (RuntimeError, requests.HTTPError):  # an HTTP server, but no Jobs API (e.g. Serve's port 8000)
                raise UserError(f"no Ray Jobs API at {self.url}: give the head's dashboard address, usually "
                                f"http://HEAD:8265") from None

    def _auth_refused(self) -> UserError:
        # Names where the token came from, never the token itself.
        detail = f"sent the token from {self.token_source}" if self.sent_token else f"sent none: {self.token_source}"
        return UserError(
            f"Ray at {self.url} refused the request: missing or wrong auth token ({detail}); set RAY_AUTH_TOKEN or "
            f"RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token"
        )

    def _unreachable(self) -> UserError:
        return UserError(f"cannot reach Ray at {self.url}: is the head running? is --address right?")

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        """Translate the SDK's exceptions for a call about `job_id` into one-line UserErrors."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            raise self._auth_refused() from None
        except aiohttp.WSServerHandshakeError as exc:  # the log stream's websocket
            if exc.status in (401, 403):
                raise self._auth_refused() from None
            if exc.status == 404 and job_id:
                raise self._unknown(job_id) from None
            raise
        except (requests.ConnectionError, aiohttp.ClientConnectionError):
            raise self._unreachable() from None
        except RuntimeError as exc:
            # The SDK reports HTTP errors as RuntimeError("Request failed with status code 404: ...").
            if job_id and "status code 404" in str(exc):
                raise self._unknown(job_id) from None
            if "status code" in str(exc):  # the cluster's own answer (400: a bad runtime_env, 500): one line
                raise UserError(f"Ray at {self.url}: {one_line(exc, with_type=False)}") from None
            raise
        except requests.HTTPError as exc:
            raise UserError(f"Ray at {self.url}: {one_line(exc, with_type=False)}") from None

    def _unknown(self, job_id: str) -> UserError:
        return UserError(f"no job {job_id!r} on the Ray cluster at {self.url}; see `genart jobs list`")

    def info(self, job_id: str):
        with self.errors(job_id):
            return self.client.get_job_info(job_id)


@contextlib.contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------- submit


def build_entrypoint(command: Sequence[str]) -> str:
    """The job's shell command: the words shell-quoted; a single argument is taken as a shell line as is."""
    if not command:
        raise UserError("no command to submit; put it after `--`, e.g. genart submit -- genart train cfg.yaml")
    if len(command) == 1:
        return command[0]
    return shlex.join(command)


def build_runtime_env(working_dir: str | os.PathLike = ".", pip: Sequence[str] = ()) -> dict:
    """runtime_env for the job: the working dir to upload (minus WORKING_DIR_EXCLUDES) and pip requirements."""
    folder = Path(working_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a folder; pass the project folder to upload")
    runtime_env: dict = {"working_dir": str(folder.resolve()), "excludes": list(WORKING_DIR_EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def submit(
    command: Sequence[str],
    address: str | None = None,
    working_dir: str | os.PathLike = ".",
    pip: Sequence[str] = (),
    gpus: float | None = None,
    wait: bool = True,
) -> int:
    """Submit `command` as a Ray job; with `wait`, stream its logs and return 0 if it SUCCEEDED, else 1."""
    entrypoint = build_entrypoint(command)
    runtime_env = build_runtime_env(working_dir, pip)
    jobs = JobsClient(address)
    with jobs.errors():
        try:
            job_id = jobs.client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, entrypoint_num_gpus=gpus or None
            )
        except ValueError as exc:  # e.g. a working dir over Ray's upload size limit
            raise UserError(f"Ray rejected the job: {one_line(exc, with_type=False)}") from None
    if not wait:
        print(job_id)
        return 0
    _say(f"submitted {job_id} to {jobs.url}")
    return follow(jobs, job_id)


def follow(jobs: JobsClient, job_id: str) -> int:
    """Stream the job's logs to stdout until it ends; 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED."""

    async def stream() -> None:
        async for chunk in jobs.client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        with jobs.errors(job_id):
            try:
                asyncio.run(stream())
            except RuntimeError as exc:  # the SDK's websocket closed or failed: the job itself may be fine
                _say(f"lost the log stream from Ray at {jobs.url} ({one_line(exc)}); waiting for the job to end "
                     f"(`genart jobs logs {job_id}` shows its logs)")
        # The stream closes when the job ends; the status can lag a moment behind.
        info = jobs.info(job_id)
        while str(info.status) not in TERMINAL_STATUSES:
            time.sleep(STATUS_POLL_S)
            info = jobs.info(job_id)
    except KeyboardInterrupt:
        _say(f"stopped following; {job_id} keeps running (stop it with `genart jobs stop {job_id}`)")
        return 130
    status = str(info.status)
    if status == "SUCCEEDED":
        _say(f"job {job_id} SUCCEEDED")
        return 0
    _say(f"job {job_id} {status}: {_first_line(info.message)}")
    return 1


# ---------------------------------------------------------------- genart jobs ...


def list_jobs(address: str | None = None) -> None:
    jobs = JobsClient(address)
    with jobs.errors():
        details = jobs.client.list_jobs()
    if not details:
        print(f"no jobs on {jobs.url}")
        return
    details.sort(key=lambda job: job.start_time or 0)
    print(f"{'JOB':<30} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for job in details:
        entrypoint = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
        print(f"{job.submission_id or job.job_id:<30} {str(job.status):<10} {_time(job.start_time):<19} {entrypoint}")


def status(job_id: str, address: str | None = None) -> None:
    info = JobsClient(address).info(job_id)
    print(f"{job_id}: {info.status}")
    if info.message:
        print(info.message.rstrip())


def logs(job_id: str, address: str | None = None, follow_logs: bool = False) -> int:
    jobs = JobsClient(address)
    if follow_logs:
        jobs.info(job_id)  # a clear error for an unknown id before opening the stream
        return follow(jobs, job_id)
    with jobs.errors(job_id):
        sys.stdout.write(jobs.client.get_job_logs(job_id))
    return 0


def stop(job_id: str, address: str | None = None) -> None:
    jobs = JobsClient(address)
    with jobs.errors(job_id):
        stopped = jobs.client.stop_job(job_id)
    if stopped:
        print(f"stopping {job_id}")
    else:
        print(f"{job_id} was not running ({jobs.info(job_id).status})")


def _say(message: str) -> None:
    print(f"genart: {message}", file=sys.stderr, flush=True)


def _first_line(message: str | None) -> str:
    """Ray's one-line reason; its failure message goes on with the job's last logs, already streamed above."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[0].split(", last available logs")[0] if lines else "no message from Ray"


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"
