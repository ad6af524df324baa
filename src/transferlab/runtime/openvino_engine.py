"""The OpenVINO engine, and the signal-stack guard its CPU plugin needs."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import Backbone
from transferlab.runtime.engines import EngineRuntime

__all__ = ["REQUEST_IMAGES", "OpenVinoRuntime", "keep_signal_stack"]

# Images per throughput request. A small request's activations stay in the core's cache: on the
# 2-core box MobileNetV2 ran 260-271 img/s model-only in requests of 1 or 2 images, 251-255 in 4,
# 228-237 in 8 and 200 in 32 (2 streams x 1 thread, static or dynamic shape alike).
REQUEST_IMAGES = 2


class OpenVinoRuntime(EngineRuntime):
    """Two compilations of one model: a latency one (one stream on every thread) for a batch
    of up to :data:`REQUEST_IMAGES`, and a throughput one (several streams of fewer threads,
    OpenVINO's choice) that larger batches go to in requests of :data:`REQUEST_IMAGES`.

    Streams share no barriers: when a decode thread preempts one stream's thread the others
    go on, where one stream on every thread waits at each layer for its slowest thread. On
    the 2-core box, 2 streams x 1 thread ran MobileNetV2 1.32x faster model-only and 1.19x
    faster end to end (decode worker processes running) than 1 stream x 2 threads, medians of 6
    alternated passes measured under contention (benchmarks/extract.py re-measures it).
    """

    engine = "openvino"

    def __init__(self, backbone: Backbone, onnx_path: Path, threads: int) -> None:
        import openvino as ov

        super().__init__(backbone.preprocess.input_size, backbone.num_features)
        core = ov.Core()
        model = core.read_model(str(onnx_path))
        # INFERENCE_PRECISION_HINT=f32 is essential: on CPUs with AVX-512 BF16/AMX OpenVINO
        # otherwise silently runs bf16 (2x faster here, but features off by ~0.5).
        config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"}
        with keep_signal_stack():
            latency = core.compile_model(model, "CPU", config)
            # One thread makes one stream: the latency compilation is all there is then.
            bulk = (
                core.compile_model(model, "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT"})
                if threads > 1
                else latency
            )
        self._request = latency.create_infer_request()
        self.streams = max(1, int(bulk.get_property("NUM_STREAMS"))) if threads > 1 else 1
        self._bulk = [bulk.create_infer_request() for _ in range(2 * self.streams)]
        if self.streams > 1:
            # Requests of REQUEST_IMAGES already bound activation memory: a large batch streams
            # through whole rather than in max_batch chunks that each drain every stream.
            self.max_batch = sys.maxsize
        self._compiled = (latency, bulk)
        self._lock = threading.Lock()  # one set of requests: serialize concurrent callers
        self.threads = threads

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Each batch's features, in order, the batches cut into requests of
        :data:`REQUEST_IMAGES` that the streams take as they free up, the next batch pulled
        while earlier ones run. Holds the runtime for the whole iteration: other callers
        wait."""
        if self.streams == 1:
            yield from super().map(batches)
            return
        with self._lock:
            yield from self._stream(batches)

    def _stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        # Two requests per stream: when a stream finishes one, the next is already queued
        # for it, so no stream waits on this thread to notice and refill it.
        free, running, parts = deque(self._bulk), deque(), []

        def finish_oldest() -> np.ndarray | None:
            request, last, _pixels = running.popleft()
            request.wait()
            parts.append(_output(request))
            free.append(request)
            if not last:
                return None
            out = np.concatenate(parts)
            parts.clear()
            return out

        try:
            for images in batches:
                images = self.checked(images)
                if len(images) == 0:
                    while running:  # the empty result keeps its place in the order
                        if (out := finish_oldest()) is not None:
                            yield out
                    yield np.zeros((0, self.num_features), dtype=np.float32)
                    continue
                starts = range(0, len(images), REQUEST_IMAGES)
                for start in starts:
                    while not free:
                        if (out := finish_oldest()) is not None:
                            yield out
                    request = free.popleft()
                    # The request reads the caller's pixels in place, kept referenced until it
                    # is done (map's contract: a batch is not changed before its features are
                    # out). Skipping the 300 KB copy per request on this thread gave +1.2% end
                    # to end: 236 vs 233 img/s over 4 alternated passes. OpenVINO itself keeps
                    # each request's last input (a view of its batch) until the request's next
                    # use: at most 2 x streams batches stay alive after map, ~25 MB at 256 px.
                    pixels = images[start : start + REQUEST_IMAGES]
                    request.start_async({0: pixels}, share_inputs=True)
                    running.append((request, start == starts[-1], pixels))
            while running:
                if (out := finish_oldest()) is not None:
                    yield out
        finally:
            for request, _, _ in running:  # a consumer that stopped early: let them end
                request.wait()

    def _run(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.streams == 1 or len(images) <= REQUEST_IMAGES:
                self._request.infer({0: images})
                return _output(self._request)
            return next(self._stream([images]))


def _output(request: Any) -> np.ndarray:
    # Copy: the output tensor's memory belongs to the request and is reused next call.
    return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)


class _StackT(ctypes.Structure):  # C's stack_t
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Put this thread's alternate signal stack back as it was when the block ends.

    OpenVINO's CPU plugin (2026.4) installs a stack of its own in the thread that compiles a
    model and, when the model is freed, re-installs the one it found. Two models freed out of
    order (A, B compiled; A freed, then B) leave A's unmapped stack installed; the next signal
    with a Python handler (SIGCHLD from a worker process) then cannot be delivered and the
    process dies with SIGSEGV (si_code SI_KERNEL) far from any OpenVINO call. With the caller's
    stack restored right after compiling, every model compiled in a thread saves and restores
    that thread's own valid stack (a model freed in another thread installs the compiling
    thread's saved stack there: valid memory, or "disabled"). Linux only; elsewhere, or if libc
    refuses, a no-op.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    try:
        sigaltstack = ctypes.CDLL(None).sigaltstack
    except (OSError, AttributeError):
        yield
        return
    sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
    sigaltstack.restype = ctypes.c_int
    saved = _StackT()
    ok = sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if ok:
            sigaltstack(ctypes.byref(saved), None)
