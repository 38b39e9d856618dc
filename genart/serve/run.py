"""`genart serve`: run the app on the embedded local Ray or a cluster until Ctrl-C.

    genart serve --model dcgan=results/runs/dcgan --model starry=results/runs/style --port 8000
    genart serve --model critic=results/runs/critic --index indexes/art           # + /v1/similar and /v1/recommend
    genart serve --config cluster/serve.yaml --host 0.0.0.0       # a Serve config file, or just its app args
"""

from __future__ import annotations

import contextlib
import os
import re
import time

from genart.config import apply_overrides, read_yaml
from genart.errors import LINE_LIMIT, UserError, one_line
from genart.serve.config import ServeArgs, parse_args

APP_NAME = "genart"
IMPORT_PATH = "genart.serve.app:build"


def settings_from(config: str | None = None, models: tuple[str, ...] = (), overrides: tuple[str, ...] = (),
                  index: str | None = None) -> ServeArgs:
    """Args from a YAML file (app args, or a Serve config holding this app), then `--model NAME=CKPT` and
    `--index IDX`, then `--set`."""
    data: dict = {}
    source = "serve args"
    if config:
        data, source = _app_args(read_yaml(config), config), config
    if data.get("models") is None:  # absent, or `models:` left empty in the file
        data["models"] = {}
    if not isinstance(data["models"], dict):
        raise UserError(f"{source}: models must map names to checkpoints (name: CHECKPOINT), not {data['models']!r}")
    if index:
        data["index"] = index
    for item in models:
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            raise UserError(f"--model {item!r}: expected NAME=CHECKPOINT, e.g. --model dcgan=results/runs/dcgan")
        data["models"][name.strip()] = uri.strip()
    return parse_args(apply_overrides(data, overrides), source=source)


def _app_args(doc: dict, source: str) -> dict:
    """A full Serve config (applications: [...]) -> the args of its genart app; any other mapping is taken as args."""
    if "applications" not in doc:
        return doc
    for app in doc.get("applications") or []:
        if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH:
            args = app.get("args") or {}
            if not isinstance(args, dict):
                raise UserError(f"{source}: the args of {IMPORT_PATH} must be a mapping")
            return dict(args)
    raise UserError(f"{source}: the Serve config has no application with import_path {IMPORT_PATH}")


def start_http(host: str, port: int, request_timeout_s: float | None = None, access_log: bool = True) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port (a cluster-wide setting); returns where it really listens, which
    differs when Serve was already running with other options."""
    from ray import serve
    from ray.serve.context import _get_global_client

    http_options = {"host": host, "port": port}
    if request_timeout_s:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options, logging_config={"enable_access_log": access_log})
    # The one private Ray call left in genart (Ray 2.60): no public API reads a running Serve's HTTP options.
    # serve.status() lists proxies and apps without host/port; the dashboard's GET /api/serve/applications/ has
    # them but the embedded Ray runs without a dashboard; serve.start() keeps an earlier instance's options and
    # only logs a warning, so the address asked for is not necessarily the one that answers.
    config = _get_global_client().http_config
    return config.host, config.port


def serve_forever(settings: ServeArgs, host: str, port: int, address: str | None = None) -> None:
    """Deploy the app, print its URL, block until Ctrl-C or SIGTERM, then remove the app (and stop the embedded Ray)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from genart import runtime
    from genart.serve.app import index_card, model_card

    for name, uri in settings.models.items():  # a bad checkpoint or index fails here, before Ray starts
        model_card(name, uri)
    if settings.index:
        index_card(settings.index)
    runtime.init(address)
    try:
        _deploy_and_wait(settings, host, port)
        print("stopping: draining requests and removing the app", flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (runtime.Terminated) while the app was still deploying
        print("stopping: removing the app", flush=True)
    finally:
        # serve.delete waits until the app's replicas finished their requests and are gone; then the embedded
        # Ray (raylet, GCS, agents, workers) stops with this driver, so SIGTERM ends with exit code 0.
        with contextlib.suppress(RayServeException):  # stopped before Serve had started
            serve.delete(APP_NAME)
        if not address and not os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
        runtime.shutdown()


def _deploy_and_wait(settings: ServeArgs, host: str, port: int) -> None:
    # Serve's own proxy timeout is a backstop a little past the app's (which answers 504 with a JSON reason).
    real_host, real_port = start_http(host, port, settings.request_timeout_s + 5, settings.access_log)
    if (real_host, real_port) != (host, port):
        print(f"note: Serve was already running on {real_host}:{real_port}; using that (restart Ray to change it)")
    key_env = settings.api_key_env
    deploy(settings)
    shown = "127.0.0.1" if real_host in ("0.0.0.0", "::") else real_host
    search = " and a search index" if settings.index else ""
    print(f"genart is serving {len(settings.models)} model(s){search} at http://{shown}:{real_port}/  (API docs: /docs)")
    required = bool(os.environ.get(key_env, "").strip())  # as the app reads it (api_key_from_env): blank is no key
    print(f"API key: {'required (from $' + key_env + ')' if required else 'not required (set $' + key_env + ' to require one)'}")
    print("Ctrl-C to stop.", flush=True)
    wait_for_ctrl_c()


def deploy(settings: ServeArgs | dict, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """serve.run the app and wait until it runs. A deployment whose replicas cannot start (e.g. a checkpoint whose
    weights do not load, which reading its state.json beforehand cannot tell) is a UserError with their reason:
    Serve's own error names no reason, only the deployment."""
    from ray import serve

    from genart.serve.app import build

    try:
        serve.run(build(settings), name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        raise _deploy_failure(exc, name) from None


def _deploy_failure(exc: RuntimeError, app: str) -> UserError:
    """serve.run's failure -> one line with the reason a deployment's replicas gave, read from Serve's status."""
    from ray import serve

    try:
        deployments = serve.status().applications[app].deployments
    except Exception:  # noqa: BLE001 - no status to read: say what serve.run said
        deployments = {}
    for name, status in deployments.items():
        reason = _error_line(status.message or "")
        if reason:
            return UserError(f"deployment {name} failed to start: {reason}")
    return UserError(f"the app failed to deploy: {one_line(exc, with_type=False)}")


def _error_line(message: str) -> str | None:
    """The exception in a replica's traceback: a UserError's text, else the last "SomeError: ..." line."""
    lines = [line.strip() for line in message.splitlines()]
    for line in lines:
        if "UserError: " in line:
            return line.split("UserError: ", 1)[1][:LINE_LIMIT]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return errors[-1][:LINE_LIMIT] if errors else None


def wait_for_ctrl_c() -> None:
    """Block this driver (which keeps the embedded Ray, and so the app, alive) until Ctrl-C or SIGTERM."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # runtime.Terminated (SIGTERM) is one too
        pass
