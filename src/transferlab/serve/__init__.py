"""An HTTP prediction service for a run folder: FastAPI + one micro-batching inference thread.

    POST /predict   multipart (field ``file``, repeatable), JSON ``{"images": [base64, ...]}``
                    or one raw image body (``Content-Type: image/jpeg``, …)
                    ?top_k=3&threshold=0.7 → {"predictions": [{label, probability, top_k}, ...]}
    GET  /health    liveness + batching counters
    GET  /model     classes, backbone, metrics summary, preprocessing
    GET  /docs      OpenAPI UI, served from the package: works offline (schema at /openapi.json)

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

Modules: :mod:`.app` (the routes and ``create_app``), :mod:`.guards` (body limit, error bodies),
:mod:`.decode` (uploads to pixels), :mod:`.batcher` (micro-batching), :mod:`.schemas` (OpenAPI
shapes); ``python -m transferlab.serve`` runs :mod:`.__main__`.
"""

from __future__ import annotations

from transferlab.serve.app import create_app, run_server
from transferlab.serve.batcher import MicroBatcher
from transferlab.serve.decode import sniff_image
from transferlab.serve.guards import MB

__all__ = [
    "MB",
    "MicroBatcher",
    "create_app",
    "run_server",
    "sniff_image",
]
