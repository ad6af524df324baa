"""What stands between a request and the model: the body-size limit (enforced while reading,
before any parsing), the cap on body bytes held by all requests together and the body-read
timeout, the JSON error body every refusal gets (scrubbed of server paths and object reprs), and
the last-resort handler that keeps the server up and quiet."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# One logger for the whole service, named after the package: log filters (and the tests)
# select the server's lines by this name.
log = logging.getLogger("transferlab.serve")

MB = 1024 * 1024
DEFAULT_MAX_BODY = 20 * MB
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_IN_FLIGHT = 256 * MB
DEFAULT_BODY_TIMEOUT = 20.0
BODY_GRACE_BYTES = 256 * 1024  # a body earns one more second per this many bytes received

# What a response must not show: where files live on the server, and Python object reprs
# (``<_io.BytesIO object at 0x7f...>`` from Pillow's messages).
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+([\w.@+-]*)")

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
    Awaitable[None],
]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ApiError(Exception):
    """A refused request: its HTTP status, a short error name and a one-line detail."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def _one_line(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scrub(value: Any) -> Any:
    """``value`` (str, or lists/dicts of them) without object reprs or absolute paths."""
    if isinstance(value, str):
        return _ABS_PATH.sub(r"\1", _OBJECT_REPR.sub("the upload", value))
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    return value


def error_response(
    method: str, path: str, status: int, error: str, detail: Any, headers: dict | None = None
) -> JSONResponse:
    """``{"error": ..., "detail": ...}`` with ``status``, logged as one warning line."""
    detail = scrub(detail)
    # One line per refused request, no traceback: a log reader sees what happened at a glance.
    log.warning("%s %s -> %d %s: %s", method, path, status, error, _one_line(detail))
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method) in the service's error format."""
    names = {404: "not found", 405: "method not allowed"}
    error = names.get(exc.status_code, "request refused")
    return error_response(request.method, request.url.path, exc.status_code, error, exc.detail)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Query parameters FastAPI refused (e.g. ``top_k=0``), as a 422 in the service's format."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return error_response(request.method, request.url.path, 422, "invalid request", detail)


class GuardMiddleware:
    """Refuse bodies over ``max_body`` (413) from Content-Length, then while reading; refuse a
    body that would take the bytes held by all requests over ``max_in_flight`` (503, before any
    of it is read); stop a body that arrives slower than ``body_timeout_s`` plus one second per
    :data:`BODY_GRACE_BYTES` received (408: a trickle, not a big upload on a busy link); turn
    any unexpected exception into a one-line-logged JSON 500 instead of a traceback.

    Pure ASGI, so it runs before any parsing."""

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_in_flight = max_in_flight
        self.body_timeout_s = body_timeout_s
        self.on_idle = on_idle
        self.in_flight = 0  # bytes reserved by requests being read or handled

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "HEAD":
            # HEAD wherever GET exists: the app answers a GET; the server (which still sees
            # HEAD in its own scope) sends the headers only.
            scope = {**scope, "method": "GET"}
        inner_receive = receive
        reserved = [0]
        try:
            if scope.get("method", "") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, send, reserved)
                if body is None:  # refused, or the client went away
                    return
                inner_receive = _replay(body, receive)
                del body
            await self._run_guarded(scope, inner_receive, receive, send)
        finally:
            self.in_flight -= reserved[0]
            if reserved[0] and self.in_flight == 0 and self.on_idle is not None:
                self.on_idle()

    def _reserve(self, n: int, reserved: list[int]) -> bool:
        if self.in_flight + n > self.max_in_flight and self.in_flight > 0:
            return False
        self.in_flight += n
        reserved[0] += n
        return True

    async def _read_body(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Any, reserved: list[int]
    ) -> bytes | None:
        """The whole body, or None once a refusal has been sent (or the client disconnected)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            length = int(declared) if declared is not None else None
            if length is not None and length < 0:
                raise ValueError(length)
        except ValueError:
            await _refuse(
                scope, receive, send, 400, "bad request", "Content-Length is not a number"
            )
            return None
        if length is not None and length > self.max_body:
            await _refuse(scope, receive, send, 413, "body too large", self._too_large(length))
            return None
        if length is not None and not self._reserve(length, reserved):
            await self._busy(scope, receive, send)
            return None
        # Read (and count) the whole body first: a chunked upload without Content-Length is
        # stopped at the limit instead of being spooled to disk by the form parser.
        chunks, size = [], 0
        start = time.monotonic()
        while True:
            try:
                deadline = start + self.body_timeout_s + size / BODY_GRACE_BYTES
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                took = time.monotonic() - start
                detail = (
                    f"the body arrived too slowly ({size} bytes in {took:.0f} s; allowed: "
                    f"{self.body_timeout_s:g} s + 1 s per {BODY_GRACE_BYTES} bytes)"
                )
                await _refuse(scope, receive, send, 408, "request timeout", detail)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _refuse(scope, receive, send, 413, "body too large", self._too_large(None))
                return None
            if length is None and not self._reserve(len(chunk), reserved):
                await self._busy(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _busy(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        detail = (
            f"the server is holding {self.in_flight} bytes of uploads (limit "
            f"{self.max_in_flight}); retry in a moment"
        )
        method, path = scope.get("method", ""), scope.get("path", "")
        response = error_response(method, path, 503, "server busy", detail, {"retry-after": "1"})
        await response(scope, receive, send)

    async def _run_guarded(
        self, scope: MutableMapping[str, Any], inner_receive: Any, receive: Any, send: Any
    ) -> None:
        method, path = scope.get("method", ""), scope.get("path", "")
        started = False

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, inner_receive, tracking_send)
        except Exception as exc:  # last resort: the server must stay up and quiet
            log.warning(
                "%s %s -> 500 internal error: %s",
                method,
                path,
                _one_line(f"{type(exc).__name__}: {exc}"),
            )
            if not started:
                response = JSONResponse(
                    {"error": "internal error", "detail": scrub(f"{type(exc).__name__}: {exc}")},
                    status_code=500,
                )
                await response(scope, receive, send)

    def _too_large(self, length: int | None) -> str:
        got = f"{length} bytes" if length is not None else "the body"
        return f"{got} is over the limit of {self.max_body} bytes ({self.max_body / MB:.1f} MiB)"


async def _refuse(
    scope: MutableMapping[str, Any], receive: Any, send: Any, status: int, error: str, detail: str
) -> None:
    method, path = scope.get("method", ""), scope.get("path", "")
    await error_response(method, path, status, error, detail)(scope, receive, send)


_REPLAY_CHUNK = 1024 * 1024


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then defers to the real one.

    In 1 MiB pieces: the form parser works through each piece on the event loop, and smaller
    pieces let /health and other requests in between those of a 20 MB upload."""
    view = memoryview(body)
    offset = 0
    done = False

    async def inner_receive() -> MutableMapping[str, Any]:
        nonlocal offset, done
        if done:
            return await receive()
        piece = bytes(view[offset : offset + _REPLAY_CHUNK])
        offset += len(piece)
        done = offset >= len(view)
        if not done:
            await asyncio.sleep(0)  # yield to the loop between pieces
        return {"type": "http.request", "body": piece, "more_body": not done}

    return inner_receive
