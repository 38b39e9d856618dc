"""Pure-ASGI guards in front of the API: bearer-key auth, a request-body size cap, a per-request deadline.

They sit outside FastAPI so they hold whatever a route does (or a client sends), and every refusal is JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(error: str, detail: Any = None) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def send_error(send: Send, status: int, error: str, detail: Any = None, headers: list | None = None) -> None:
    """Answer with the app's JSON error shape, {"error": ..., "detail": ...}."""
    body = error_body(error, detail)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + list(headers or [])})
    await send({"type": "http.response.body", "body": body})


def app_path(scope: Scope) -> str:
    """The path inside the app: Serve mounts an app under its route_prefix (scope root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class BearerAuth:
    """With a key set, every /v1/* call needs `Authorization: Bearer <key>` (constant-time compare); else 401.

    The page, /healthz and the OpenAPI docs stay open: they hold no data, and the page must load to ask for the key.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, protected_prefix: str = "/v1/"):
        self.app = app
        self.key = (api_key or "").encode()
        self.prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.key or scope["type"] != "http" or not app_path(scope).startswith(self.prefix):
            return await self.app(scope, receive, send)
        given = header(scope, b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        # compare_digest on equal-purpose bytes: the time taken does not leak how much of the key matched
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        reason = "missing Authorization header" if not given else "wrong API key"
        await send_error(send, 401, "unauthorized", f"{reason}: send 'Authorization: Bearer <key>'",
                         headers=[(b"www-authenticate", b'Bearer realm="genart"')])


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413: early from Content-Length, and again while reading, so a chunked
    upload (no Content-Length) is cut off at the cap instead of being buffered.

    FastAPI turns an error raised while it parses a form into its own 400; the wrapped `send` drops that answer
    and the 413 goes out instead.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self, size: str) -> str:
        return f"request body {size} is over the {self.max_bytes / 2**20:g} MB limit (max_upload_mb); send a smaller image"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await send_error(send, 400, "bad request", "Content-Length is not a number")
            if length > self.max_bytes:
                return await send_error(send, 413, "payload too large", self._detail(f"of {length} bytes"))
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app says after the cut (e.g. FastAPI's 400) is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if over and not started:
            await send_error(send, 413, "payload too large", self._detail(f"past {self.max_bytes} bytes"),
                             headers=[(b"connection", b"close")])


class Deadline:
    """A request still running after `timeout_s` is cancelled (with the model calls it awaits) and gets 504."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if not deadline.expired():  # the app's own timeout (a socket, S3): an error of its own, not the deadline
                raise
            if not started:
                await send_error(send, 504, "timeout",
                                 f"the request took longer than {self.timeout_s:g} s (request_timeout_s) and was "
                                 f"cancelled; ask for fewer images or a smaller max_side, or retry later")
