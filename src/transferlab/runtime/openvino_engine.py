"""The OpenVINO engine, and the signal-stack guard its CPU plugin needs."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transferlab.backbones import Backbone
from transferlab.runtime.engines import EngineRuntime

__all__ = ["OpenVinoRuntime", "keep_signal_stack"]


class OpenVinoRuntime(EngineRuntime):
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
            self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: serialize concurrent callers
        self.threads = threads

    def _run(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self._request.infer({0: images})
            # Copy: the output tensor's memory belongs to the request and is reused next call.
            return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


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
    with a Python handler (SIGCHLD from a decode worker) then cannot be delivered and the
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
