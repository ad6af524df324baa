"""What stands between a request and the model: the body-size limit (enforced while reading,
before any parsing), the JSON error body every refusal gets, and the last-resort handler that
keeps the server up and quiet."""

from __future__ import annotations

import json
import logging
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


def error_response(method: str, path: str, status: int, error: str, detail: Any) -> JSONResponse:
    """``{"error": ..., "detail": ...}`` with ``status``, logged as one warning line."""
    # One line per refused request, no traceback: a log reader sees what happened at a glance.
    log.warning("%s %s -> %d %s: %s", method, path, status, error, _one_line(detail))
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


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
    """Refuse bodies over ``max_body`` (413) from Content-Length, then while reading; turn any
    unexpected exception into a one-line-logged JSON 500 instead of a traceback.

    Pure ASGI, so it runs before any parsing."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inner_receive = receive
        if scope.get("method", "") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send)
            if body is None:  # refused, or the client went away
                return
            inner_receive = _replay(body, receive)
        await self._run_guarded(scope, inner_receive, receive, send)

    async def _read_body(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Any
    ) -> bytes | None:
        """The whole body, or None once a refusal has been sent (or the client disconnected)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            await _refuse(
                scope, receive, send, 400, "bad request", "Content-Length is not a number"
            )
            return None
        if length is not None and length > self.max_body:
            await _refuse(scope, receive, send, 413, "body too large", self._too_large(length))
            return None
        # Read (and count) the whole body first: a chunked upload without Content-Length is
        # stopped at the limit instead of being spooled to disk by the form parser.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _refuse(scope, receive, send, 413, "body too large", self._too_large(None))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

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
                    {"error": "internal error", "detail": f"{type(exc).__name__}: {exc}"},
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


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then defers to the real one."""
    replayed = False

    async def inner_receive() -> MutableMapping[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner_receive
