"""The FastAPI app: routes at module level that read what they need from ``app.state.serve``
(one :class:`ServeState` per app, built by :func:`create_app`), and ``run_server`` for uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from transferlab.serve.batcher import MicroBatcher
from transferlab.serve.decode import decode_upload, read_images
from transferlab.serve.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PIXELS,
    ApiError,
    GuardMiddleware,
    error_response,
    http_error,
    log,
    validation_error,
)
from transferlab.serve.limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    guarded_protocol,
    install_log_limits,
    release_memory,
    tune_process,
)
from transferlab.serve.schemas import (
    ERROR_RESPONSES,
    PREDICT_BODY,
    HealthResponse,
    PredictResponse,
)
from transferlab.system import available_cpus

if TYPE_CHECKING:
    from transferlab.api import Classifier
    from transferlab.predict import PredictionEngine


@dataclass
class ServeState:
    """What the route handlers share: the model, the batcher and the request limits."""

    run_dir: str | os.PathLike[str]
    engine: PredictionEngine
    batcher: MicroBatcher
    model_info: dict[str, Any]
    timeout_s: float
    max_images: int
    max_pixels: int
    decode_slots: threading.BoundedSemaphore
    runtime: str | None = None  # which runtime the engine built; set at startup


router = APIRouter()


def _state(request: Request) -> ServeState:
    return request.app.state.serve


@router.get("/health", response_model=HealthResponse, summary="Liveness and batching counters")
async def health(request: Request) -> dict[str, Any]:
    state = _state(request)
    batcher = state.batcher
    return {
        "status": "ok",
        "engine": state.runtime,
        "queued": batcher.queued,
        "batches": batcher.batches,
        "images": batcher.images,
        "mean_batch": batcher.images / batcher.batches if batcher.batches else 0.0,
    }


@router.get("/model", summary="Classes, backbone, metrics summary and preprocessing")
async def model(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {**state.model_info, "engine": state.runtime}


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    top_k: int = Query(1, ge=1, le=1000, description="Ranked labels per image."),
    threshold: float | None = Query(
        None, ge=0.0, le=1.0, description="Label 'unknown' below this top probability."
    ),
) -> Any:
    state = _state(request)
    t0 = time.perf_counter()
    method, path = request.method, request.url.path
    try:
        result = await asyncio.wait_for(_predict(state, request, top_k, threshold), state.timeout_s)
    except ApiError as exc:
        return error_response(method, path, exc.status, exc.error, exc.detail)
    except TimeoutError:
        detail = f"the request took longer than {state.timeout_s:g} s; send fewer or smaller images"
        return error_response(method, path, 504, "timeout", detail)
    log.debug(
        "predicted %d image(s) in %.1f ms",
        len(result["predictions"]),
        1e3 * (time.perf_counter() - t0),
    )
    return result


async def _predict(
    state: ServeState, request: Request, top_k: int, threshold: float | None
) -> dict[str, Any]:
    blobs = await read_images(request, state.max_images)
    images = []
    for i, blob in enumerate(blobs):
        images.append(
            await run_in_threadpool(
                decode_upload, state.engine, blob, i, state.max_pixels, state.decode_slots
            )
        )
    probs = await state.batcher.submit(np.stack(images))
    cut = state.engine.threshold if threshold is None else threshold
    return {"predictions": [_prediction(state.engine, p, cut, top_k) for p in probs]}


def _prediction(
    engine: PredictionEngine, p: np.ndarray, cut: float | None, top_k: int
) -> dict[str, Any]:
    i = int(np.argmax(p))
    top = float(p[i])
    label = "unknown" if cut is not None and top < cut else engine.classes[i]
    return {
        "label": label,
        "probability": top,
        "top_k": [{"label": lab, "probability": q} for lab, q in engine.top_k(p, top_k)],
    }


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServeState = app.state.serve
    # Build the runtime (export + parity check) before the first request, not during it.
    state.runtime = await run_in_threadpool(state.engine.warm_up)
    state.batcher.start()
    classes = ", ".join(state.engine.classes)
    log.info("serving %s (%s, classes: %s)", state.run_dir, state.runtime, classes)
    yield
    await state.batcher.stop()


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
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """A FastAPI app serving the model in ``run_dir`` (see the package docstring).

    ``max_images``: images per request. ``threshold``: default for the ``threshold`` query
    parameter. ``decode_concurrency``: images decoded at once (default: usable CPUs), which bounds
    the memory a burst of large uploads can take. ``max_in_flight_bytes``: request bodies held
    at once by all requests together (beyond it: 503). ``body_timeout_s``: time for a body to
    arrive (beyond it: 408).
    """
    import transferlab
    from transferlab.predict import PredictionEngine

    clf = transferlab.load(run_dir)  # safetensors + JSON: loading runs no code from the folder
    engine = PredictionEngine(
        clf, batch_size=max_batch, workers=0, max_pixels=max_pixels, threshold=threshold
    )
    batcher = MicroBatcher(engine.infer, max_batch=max_batch, wait_s=batch_wait_ms / 1000.0)
    # Pillow warns (on several lines) between its own limits; ours is lower and answers with 413.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    app = FastAPIOffline(  # /docs works without network: Swagger UI from the package
        title="transferlab",
        summary=f"Image classifier: {', '.join(clf.classes)}",
        version=transferlab.__version__,
        lifespan=_lifespan,
    )
    app.state.serve = ServeState(
        run_dir=run_dir,
        engine=engine,
        batcher=batcher,
        model_info=_model_info(clf, Path(run_dir), engine, max_pixels, max_body_bytes, max_images),
        timeout_s=timeout_s,
        max_images=max_images,
        max_pixels=max_pixels,
        # A thread semaphore (taken inside the decode thread): unlike asyncio's, it is not bound
        # to one event loop, and test clients may run each request on a fresh loop.
        decode_slots=threading.BoundedSemaphore(decode_concurrency or available_cpus()),
    )
    # Also on their own: callers (and the tests) compare against the engine and swap the
    # batcher's inference function.
    app.state.engine = engine
    app.state.batcher = batcher
    _install_routes(app, max_body_bytes, max_in_flight_bytes, body_timeout_s)
    return app


def _install_routes(app: FastAPI, max_body: int, max_in_flight: int, body_timeout_s: float) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(router)
    # Inside Starlette's ServerErrorMiddleware, so no exception ever reaches its traceback logger.
    app.add_middleware(
        GuardMiddleware,
        max_body=max_body,
        max_in_flight=max_in_flight,
        body_timeout_s=body_timeout_s,
        on_idle=_release_soon,
    )


def _model_info(
    clf: Classifier,
    run_dir: Path,
    engine: PredictionEngine,
    max_pixels: int,
    max_body: int,
    max_images: int,
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
            "spec": _public_spec(saved.body.get("spec")),
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


def _public_spec(spec: Any) -> Any:
    """A spec without the server's folders (``local-dir:/a/b/name`` → ``local-dir:name``)."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    kind, _, rest = spec.partition(":")
    if kind.startswith("local") or os.path.isabs(rest) or rest.startswith((".", "~")):
        return f"{kind}:{os.path.basename(rest.rstrip('/'))}"
    return spec


def _release_soon() -> None:
    """After a burst (no upload held any more): return freed memory to the OS, once."""
    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, release_memory)


def run_server(
    run_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT,
    **limits: Any,
) -> None:
    """Serve ``run_dir`` with uvicorn (one process; batching happens inside it), behind the
    connection cap and request-head timeout of :mod:`.limits`."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_limits()
    if host in ("0.0.0.0", "::", ""):
        log.warning(
            "binding %s exposes the model to every network this machine is on; "
            "use --host 127.0.0.1 unless that is intended",
            host or "all interfaces",
        )
    max_connections = tune_process(max_connections)
    app = create_app(run_dir, **limits)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # uvicorn's records go to the root handler and its rate limit
        access_log=log_level == "debug",
        http=guarded_protocol(max_connections, header_timeout_s),
        backlog=min(max_connections, 4096),
        timeout_keep_alive=5,
    )
