"""An HTTP prediction service for a run folder: FastAPI + one micro-batching inference thread.

    POST /predict   multipart (field ``file``, repeatable) or JSON ``{"images": [base64, ...]}``
                    ?top_k=3&threshold=0.7 → {"predictions": [{label, probability, top_k}, ...]}
    GET  /health    liveness + batching counters
    GET  /model     classes, backbone, metrics summary, preprocessing
    GET  /docs      OpenAPI UI (schema at /openapi.json)

Requests are decoded in the thread pool (bounded by a semaphore, so a burst of large images
cannot exhaust memory), then their images join one asyncio queue; a single task takes up to
``max_batch`` images or whatever arrived within ``batch_wait_ms`` and runs them as one batch on
one inference thread (the runtime is fastest on whole batches and is not shared between threads).

Untrusted input is refused before it costs anything: the body size from Content-Length and again
while reading (413), the file type from its magic bytes, never the name or content type (415),
the pixel count from the image header before decoding (413), damaged images (422). Every error
is a JSON body ``{"error": ..., "detail": ...}`` plus one log line, never a traceback, and the
server keeps serving. Clients cannot name files on the server; the model is loaded with
``transferlab.load`` (safetensors + JSON, no code executed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from transferlab.errors import ImageError, TransferlabError
from transferlab.system import available_cpus

__all__ = ["MicroBatcher", "create_app", "run_server", "sniff_image"]

log = logging.getLogger("transferlab.serve")

MB = 1024 * 1024
DEFAULT_MAX_BODY = 20 * MB
DEFAULT_MAX_PIXELS = 40_000_000

# Magic bytes of the formats Pillow decodes for us; anything else is refused unread.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
)

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
    Awaitable[None],
]


def sniff_image(data: bytes) -> str | None:
    """The image format named by ``data``'s first bytes, or None when it is not an image."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


# --------------------------------------------------------------------------------------------
# errors


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


def _error_response(method: str, path: str, status: int, error: str, detail: Any) -> JSONResponse:
    # One line per refused request, no traceback: a log reader sees what happened at a glance.
    log.warning("%s %s -> %d %s: %s", method, path, status, error, _one_line(detail))
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, in a few words.")
    detail: Any = Field(None, description="Which input and why; what to send instead.")


class RankedLabel(BaseModel):
    label: str
    probability: float


class PredictionOut(BaseModel):
    label: str = Field(description="Top class, or 'unknown' below the threshold.")
    probability: float = Field(description="Probability of the top class.")
    top_k: list[RankedLabel]


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


class HealthResponse(BaseModel):
    status: str
    engine: str | None
    queued: int
    batches: int
    images: int
    mean_batch: float


_ERRORS = {
    413: {"model": ErrorBody, "description": "Body, image count or image pixels over the limit"},
    415: {"model": ErrorBody, "description": "Not an image (magic bytes) or unsupported body type"},
    422: {"model": ErrorBody, "description": "Missing/misnamed field, bad base64, damaged image"},
    500: {"model": ErrorBody, "description": "Unexpected server error (logged on one line)"},
    504: {"model": ErrorBody, "description": "The request took longer than the server's timeout"},
}

_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One or more images (repeat the field).",
                    }
                },
                "required": ["file"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "byte"},
                        "minItems": 1,
                        "description": "Base64-encoded image files (data: URLs accepted).",
                    }
                },
                "required": ["images"],
            }
        },
    },
}


# --------------------------------------------------------------------------------------------
# body-size limit and last-resort error handling (pure ASGI: runs before any parsing)


class _GuardMiddleware:
    """Refuse bodies over ``max_body`` (413) from Content-Length, then while reading; turn any
    unexpected exception into a one-line-logged JSON 500 instead of a traceback."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        started = False

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def refuse(status: int, error: str, detail: str) -> None:
            await _error_response(method, path, status, error, detail)(scope, receive, send)

        inner_receive = receive
        if method in ("POST", "PUT", "PATCH"):
            declared = dict(scope.get("headers") or []).get(b"content-length")
            try:
                length = int(declared) if declared is not None else None
            except ValueError:
                await refuse(400, "bad request", "Content-Length is not a number")
                return
            if length is not None and length > self.max_body:
                await refuse(413, "body too large", self._too_large(length))
                return
            # Read (and count) the whole body first: a chunked upload without Content-Length is
            # stopped at the limit instead of being spooled to disk by the form parser.
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await refuse(413, "body too large", self._too_large(None))
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def inner_receive() -> MutableMapping[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

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


# --------------------------------------------------------------------------------------------
# micro-batching


class MicroBatcher:
    """Collect images from concurrent requests into batches for one inference thread.

    ``infer``: uint8 (n, 3, H, W) → probabilities (n, C), called on a single dedicated thread.
    A batch closes at ``max_batch`` images or ``wait_s`` after its first image arrived.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, wait_s: float
    ) -> None:
        self.infer = infer
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_s)
        self.batches = 0
        self.images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferlab-infer")
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Bind to the running event loop (idempotent; also done by the first ``submit``)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(), name="transferlab-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for ``images`` (n, 3, H, W), computed together with other requests'."""
        self.start()
        assert self._queue is not None and self._loop is not None
        futures = []
        for image in images:
            fut: asyncio.Future[np.ndarray] = self._loop.create_future()
            self._queue.put_nowait((image, fut))
            futures.append(fut)
        try:
            return np.stack(await asyncio.gather(*futures))
        finally:
            for fut in futures:  # a timed-out request: its images are dropped, not computed
                fut.cancel()

    async def _run(self) -> None:
        assert self._queue is not None and self._loop is not None
        queue, loop = self._queue, self._loop
        while True:
            items = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    items.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Short polls instead of wait_for(queue.get()): a cancelled get can lose an item.
                await asyncio.sleep(min(remaining, 0.001))
            live = [(im, fut) for im, fut in items if not fut.done()]
            if not live:
                continue
            batch = np.stack([im for im, _ in live])
            try:
                probs = await loop.run_in_executor(self._executor, self.infer, batch)
            except Exception as exc:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(live)
            for (_, fut), p in zip(live, probs, strict=True):
                if not fut.done():
                    fut.set_result(p)


# --------------------------------------------------------------------------------------------
# the app


def create_app(
    run_dir: str | os.PathLike[str],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = 10.0,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    max_images: int = 64,
    threshold: float | None = None,
    decode_concurrency: int | None = None,
) -> FastAPI:
    """A FastAPI app serving the model in ``run_dir`` (see the module docstring).

    ``max_images``: images per request. ``threshold``: default for the ``threshold`` query
    parameter. ``decode_concurrency``: images decoded at once (default: usable CPUs), which bounds
    the memory a burst of large uploads can take.
    """
    import transferlab
    from transferlab.predict import PredictionEngine

    clf = transferlab.load(run_dir)  # safetensors + JSON: loading runs no code from the folder
    engine = PredictionEngine(
        clf, batch_size=max_batch, workers=0, max_pixels=max_pixels, threshold=threshold
    )
    batcher = MicroBatcher(engine.infer, max_batch=max_batch, wait_s=batch_wait_ms / 1000.0)
    # A thread semaphore (taken inside the decode thread): unlike asyncio's, it is not bound to
    # one event loop, and test clients may run each request on a fresh loop.
    decode_slots = threading.BoundedSemaphore(decode_concurrency or available_cpus())
    # Pillow warns (on several lines) between its own limits; ours is lower and answers with 413.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    state: dict[str, Any] = {"engine": None}
    model_info = _model_info(clf, Path(run_dir), engine, max_pixels, max_body_bytes, max_images)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Build the runtime (export + parity check) before the first request, not during it.
        state["engine"] = await run_in_threadpool(engine.warm_up)
        batcher.start()
        log.info("serving %s (%s, classes: %s)", run_dir, state["engine"], ", ".join(clf.classes))
        yield
        await batcher.stop()

    app = FastAPI(
        title="transferlab",
        summary=f"Image classifier: {', '.join(clf.classes)}",
        version=transferlab.__version__,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not found", 405: "method not allowed"}
        error = names.get(exc.status_code, "request refused")
        return _error_response(request.method, request.url.path, exc.status_code, error, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return _error_response(request.method, request.url.path, 422, "invalid request", detail)

    @app.get("/health", response_model=HealthResponse, summary="Liveness and batching counters")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": state["engine"],
            "queued": batcher.queued,
            "batches": batcher.batches,
            "images": batcher.images,
            "mean_batch": batcher.images / batcher.batches if batcher.batches else 0.0,
        }

    @app.get("/model", summary="Classes, backbone, metrics summary and preprocessing")
    async def model() -> dict[str, Any]:
        return {**model_info, "engine": state["engine"]}

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": _PREDICT_BODY},
        summary="Classify one or more images",
    )
    async def predict(
        request: Request,
        top_k: int = Query(1, ge=1, le=1000, description="Ranked labels per image."),
        threshold: float | None = Query(
            None, ge=0.0, le=1.0, description="Label 'unknown' below this top probability."
        ),
    ) -> Any:
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(_predict(request, top_k, threshold), timeout_s)
        except ApiError as exc:
            return _error_response(
                request.method, request.url.path, exc.status, exc.error, exc.detail
            )
        except TimeoutError:
            return _error_response(
                request.method,
                request.url.path,
                504,
                "timeout",
                f"the request took longer than {timeout_s:g} s; send fewer or smaller images",
            )
        log.debug(
            "predicted %d image(s) in %.1f ms",
            len(result["predictions"]),
            1e3 * (time.perf_counter() - t0),
        )
        return result

    async def _predict(request: Request, top_k: int, threshold: float | None) -> dict[str, Any]:
        blobs = await _read_images(request, max_images)
        images = []
        for i, blob in enumerate(blobs):
            images.append(
                await run_in_threadpool(_decode_upload, engine, blob, i, max_pixels, decode_slots)
            )
        probs = await batcher.submit(np.stack(images))
        cut = engine.threshold if threshold is None else threshold
        out = []
        for p in probs:
            i = int(np.argmax(p))
            top = float(p[i])
            label = "unknown" if cut is not None and top < cut else engine.classes[i]
            out.append(
                {
                    "label": label,
                    "probability": top,
                    "top_k": [
                        {"label": lab, "probability": q} for lab, q in engine.top_k(p, top_k)
                    ],
                }
            )
        return {"predictions": out}

    # Inside Starlette's ServerErrorMiddleware, so no exception ever reaches its traceback logger.
    app.add_middleware(_GuardMiddleware, max_body=max_body_bytes)
    return app


# --------------------------------------------------------------------------------------------
# request parsing and decoding


async def _read_images(request: Request, max_images: int) -> list[bytes]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except StarletteHTTPException as exc:  # malformed multipart, too many parts
            if "Too many files" in str(exc.detail):
                raise ApiError(
                    413, "too many images", f"at most {max_images} images per request"
                ) from None
            raise ApiError(422, "bad multipart body", exc.detail) from None
        items = form.getlist("file")
        if not items:
            fields = sorted(set(form.keys()))
            raise ApiError(
                422,
                "missing file",
                "send the image(s) in multipart form field 'file'"
                + (f"; got field(s): {', '.join(fields)}" if fields else "; the form is empty"),
            )
        blobs = []
        for item in items:
            if isinstance(item, str):  # a text field named 'file': its bytes, sniffed like any
                blobs.append(item.encode("utf-8"))
            else:
                blobs.append(await item.read())
                await item.close()
    elif ctype == "application/json" or ctype.endswith("+json"):
        blobs = _json_images(await request.body())
    else:
        raise ApiError(
            415,
            "unsupported content type",
            f"got {ctype or 'no content type'}; send multipart/form-data with field 'file', "
            'or application/json {"images": [base64, ...]}',
        )
    if len(blobs) > max_images:
        raise ApiError(
            413, "too many images", f"{len(blobs)} images; at most {max_images} per request"
        )
    return blobs


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid JSON", str(exc)) from None
    if not isinstance(doc, dict) or "images" not in doc:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ApiError(422, "missing images", f'expected {{"images": [base64, ...]}}; got {got}')
    items = doc["images"]
    if not isinstance(items, list) or not items:
        raise ApiError(422, "missing images", "'images' must be a non-empty list of base64 strings")
    blobs = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(
                422, "invalid base64", f"images[{i}] is a {type(item).__name__}, not a string"
            )
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            blobs.append(base64.b64decode("".join(text.split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(422, "invalid base64", f"images[{i}]: {exc}") from None
    return blobs


def _decode_upload(
    engine: Any, data: bytes, index: int, max_pixels: int, slots: threading.BoundedSemaphore
) -> np.ndarray:
    """Sniff → header size check → full decode with the model's preprocessing (a thread)."""
    with slots:
        return _decode_checked(engine, data, index, max_pixels)


def _decode_checked(engine: Any, data: bytes, index: int, max_pixels: int) -> np.ndarray:
    which = f"image {index + 1}"
    if not data:
        raise ApiError(422, "empty file", f"{which} is empty (0 bytes)")
    fmt = sniff_image(data[:16])
    if fmt is None:
        raise ApiError(
            415,
            "not an image",
            f"{which} is not a JPEG/PNG/GIF/BMP/TIFF/WebP/PNM file (first bytes {data[:8]!r}); "
            "the file's content is checked, not its name or content type",
        )
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            w, h = header.size
    except Image.DecompressionBombError:
        # Pillow's own ceiling (2 × MAX_IMAGE_PIXELS) tripped on the header: far over ours.
        raise ApiError(
            413,
            "image too large",
            f"{which}: its header claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
            f"over the limit of {max_pixels}",
        ) from None
    except Exception as exc:
        raise ApiError(422, "corrupt image", f"{which}: damaged {fmt} header ({exc})") from None
    if w * h > max_pixels:
        raise ApiError(
            413,
            "image too large",
            f"{which} is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}",
        )
    try:
        return engine.decode(data)
    except ImageError as exc:
        raise ApiError(422, "corrupt image", f"{which} ({fmt}): {exc.reason}") from None
    except TransferlabError as exc:
        raise ApiError(422, "unreadable image", f"{which} ({fmt}): {exc}") from None


def _model_info(
    clf: Any, run_dir: Path, engine: Any, max_pixels: int, max_body: int, max_images: int
) -> dict[str, Any]:
    saved = clf.saved
    pre = saved.preprocess
    summary = {}
    for split in ("val", "test"):
        m = (clf.metrics or {}).get(split)
        if m:
            summary[split] = {
                k: m[k]
                for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "n")
                if k in m
            }
    return {
        "run": run_dir.name,
        "classes": list(saved.classes),
        "backbone": {
            "spec": saved.body.get("spec"),
            "architecture": (saved.body.get("recipe") or {}).get("architecture"),
            "trained": bool(saved.body.get("trained", False)),
        },
        "head": saved.head.get("kind"),
        "strategy": saved.strategy,
        "temperature": saved.temperature,
        "metrics": summary,
        "preprocess": {**pre.to_dict(), "resize_size": list(pre.resize_size)},
        "limits": {
            "max_body_bytes": max_body,
            "max_pixels": max_pixels,
            "max_images_per_request": max_images,
            "threshold": engine.threshold,
        },
    }


# --------------------------------------------------------------------------------------------
# running it


def run_server(
    run_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **limits: Any,
) -> None:
    """Serve ``run_dir`` with uvicorn (one process; batching happens inside it)."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if host in ("0.0.0.0", "::", ""):
        log.warning(
            "binding %s exposes the model to every network this machine is on; "
            "use --host 127.0.0.1 unless that is intended",
            host or "all interfaces",
        )
    app = create_app(run_dir, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")


def _main(argv: list[str] | None = None) -> None:
    """``python -m transferlab.serve RUN [--host H] [--port P] ...`` (used by the benchmarks)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m transferlab.serve")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / MB)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    try:
        run_server(
            a.run,
            host=a.host,
            port=a.port,
            log_level=a.log_level,
            max_batch=a.max_batch,
            batch_wait_ms=a.batch_wait_ms,
            timeout_s=a.timeout,
            max_body_bytes=int(a.max_body_mb * MB),
            max_pixels=a.max_pixels,
        )
    except TransferlabError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    _main()
