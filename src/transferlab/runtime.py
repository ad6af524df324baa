"""Run the frozen backbone on the fastest available engine: OpenVINO, ONNX Runtime or PyTorch.

Every engine takes uint8 images (n, 3, H, W) and returns float32 pooled features (n, F). The
``/255 - mean) / std`` normalization is part of the exported graph, so decoding stays uint8 end to
end and the preprocessing travels inside the export.

The ONNX graph is exported once per backbone identity and cached; every engine is checked against
the PyTorch wrapper on a small fixed batch (max abs diff <= 1e-4) before it is used, and any
failure falls back to the next engine with a one-line warning.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import importlib.util
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from transferlab.backbones import Backbone
from transferlab.cache import FeatureCache
from transferlab.config import ENGINES  # one vocabulary, validated by FitConfig
from transferlab.errors import TransferlabError
from transferlab.model import eval_mode
from transferlab.system import available_cpus, tune_glibc_malloc

__all__ = [
    "ENGINES",
    "EngineFallbackWarning",
    "FeatureRuntime",
    "export_onnx",
    "make_runtime",
    "tune_glibc_malloc",
]

PARITY_ATOL = 1e-4
_PARITY_BATCH = (
    3  # odd on purpose: differs from the export's dummy batch, exercising the dynamic axis
)
_EXPORT_BATCH = 2
_MAX_CHUNK = 64  # bound activation memory when a caller passes thousands of images at once
OPSET = 17

Log = Callable[[str], None]


class EngineFallbackWarning(RuntimeWarning):
    """An engine could not be used (or disagreed with PyTorch) and the next one was chosen."""


@runtime_checkable
class FeatureRuntime(Protocol):
    engine: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) at preprocess.input_size -> float32 (n, num_features)."""
        ...


# --------------------------------------------------------------------------------------------
# the exported function


class Uint8Input(nn.Module):
    """uint8 NCHW -> float -> normalize -> ``model``: what exported files take as input.

    The feature runtime wraps the backbone (-> pooled features); ``transferlab export`` wraps
    the whole classifier (:class:`transferlab.export.ExportedModel`, -> probabilities).
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add: x * scale + shift.
        self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)
        self.register_buffer("shift", -m / s, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self.scale + self.shift
        return self.model(x)


def _wrapper(backbone: Backbone) -> Uint8Input:
    pp = backbone.preprocess
    return Uint8Input(backbone.model, pp.mean, pp.std)


def export_onnx(backbone: Backbone, path: Path) -> float:
    """Export the uint8 feature wrapper to ``path`` atomically; returns the seconds it took.

    Uses the legacy TorchScript exporter (``dynamo=False``): ~0.5 s for MobileNetV2 here versus
    ~10 s for the dynamo exporter, with a dynamic batch axis and opset 17.
    """
    h, w = backbone.preprocess.input_size
    wrapper = _wrapper(backbone)
    dummy = torch.zeros((_EXPORT_BATCH, 3, h, w), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=path.parent)
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache's export from others
    os.close(fd)
    start = time.perf_counter()
    try:
        with (
            warnings.catch_warnings(),
            eval_mode(backbone.model),
            torch.inference_mode(False),
            torch.no_grad(),
        ):
            # Tracer warnings about shape-dependent Python ints (timm's 'same' padding) are
            # expected: the spatial size is fixed by the preprocessing, only the batch is dynamic.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (dummy,),
                tmp,
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# engines


class _Runtime:
    engine = "base"

    def __init__(self, input_size: tuple[int, int], num_features: int) -> None:
        self.input_size = tuple(input_size)
        self.num_features = num_features
        self.parity: float | None = None  # max abs diff vs the PyTorch wrapper, once checked
        self.export_path: Path | None = None
        self.export_seconds: float | None = None  # None: the cached export was reused
        self.threads: int | None = None
        self.max_batch = _MAX_CHUNK

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        h, w = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise ValueError(
                f"{self.engine} runtime expects uint8 images of shape (n, 3, {h}, {w}), "
                f"got {images.dtype} {images.shape}"
            )
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.num_features), dtype=np.float32)
        if n <= self.max_batch:
            return self._run(np.ascontiguousarray(images))
        parts = [
            self._run(np.ascontiguousarray(images[i : i + self.max_batch]))
            for i in range(0, n, self.max_batch)
        ]
        return np.concatenate(parts)

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<FeatureRuntime engine={self.engine} parity={self.parity}>"


class TorchRuntime(_Runtime):
    engine = "torch"

    def __init__(self, backbone: Backbone, threads: int | None = None) -> None:
        super().__init__(backbone.preprocess.input_size, backbone.num_features)
        # torch's thread count is process-wide and left to the caller: resizing its pools while
        # another thread runs torch ops crashed the process (SIGSEGV) here.
        self.threads = torch.get_num_threads()
        self.malloc_tuned = tune_glibc_malloc()
        # A private copy: channels_last rewrites parameter layouts, which must not leak into the
        # caller's model (training code may fine-tune it); it also snapshots the weights like an
        # export does.
        wrapper = copy.deepcopy(_wrapper(backbone))
        self._wrapper = wrapper.to(memory_format=torch.channels_last).eval()
        self._lock = threading.Lock()

    def _run(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            out = self._wrapper(x)
        return out.float().numpy().astype(np.float32, copy=False)


class OnnxRuntime(_Runtime):
    engine = "onnxruntime"

    def __init__(self, backbone: Backbone, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        super().__init__(backbone.preprocess.input_size, backbone.num_features)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: keep the CLI quiet
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self.threads = threads

    def _run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: images})
        return np.asarray(out, dtype=np.float32)


class OpenVinoRuntime(_Runtime):
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


# --------------------------------------------------------------------------------------------
# make_runtime


def make_runtime(
    backbone: Backbone,
    *,
    engine: str = "auto",
    export_dir: Path | None = None,
    threads: int | None = None,
    log: Log | None = None,
) -> FeatureRuntime:
    """The fastest engine that reproduces the PyTorch features within 1e-4.

    ``engine``: auto (openvino if installed, else onnxruntime, else torch) or one of those names;
    a named engine that fails falls back to the ones after it, with an EngineFallbackWarning.
    ``export_dir``: where ``<identity_hash>.onnx`` is kept (default: the cache's exports/).
    ``threads``: engine threads (default: the CPUs this process may use). ``log``: receives
    one-line progress messages (export, chosen engine).
    """
    if engine not in ENGINES:
        raise TransferlabError(f"--engine {engine!r} is not one of: {', '.join(ENGINES)}")
    say: Log = log or (lambda _msg: None)
    n_threads = threads or available_cpus()
    chain = _engine_chain(engine)
    onnx_path = Path(export_dir or FeatureCache().exports_dir) / f"{backbone.identity_hash()}.onnx"

    reference: tuple[np.ndarray, np.ndarray] | None = None

    def expected() -> tuple[np.ndarray, np.ndarray]:
        nonlocal reference
        if reference is None:
            reference = _reference_batch(backbone)
        return reference

    export_failed = False
    export_seconds: float | None = None  # set once this call has (re-)exported

    def export() -> bool:
        nonlocal export_failed, export_seconds
        say(f"exporting {backbone.spec} to ONNX (once per backbone) ...")
        try:
            export_seconds = export_onnx(backbone, onnx_path)
        except Exception as exc:
            export_failed = True
            _warn_fallback(f"ONNX export failed ({_brief(exc)})", "torch")
            return False
        say(f"exported in {export_seconds:.1f}s -> {onnx_path}")
        return True

    for i, name in enumerate(chain):
        next_engine = chain[i + 1] if i + 1 < len(chain) else "torch"
        if name == "torch":
            runtime: _Runtime = TorchRuntime(backbone, threads=threads)
            # torch vs torch differs only by channels_last kernels, but record it like the others.
            images, ref = expected()
            runtime.parity = _max_diff(runtime(images), ref)
            say(f"engine: torch ({runtime.threads} threads)")
            return runtime
        if export_failed:
            continue  # warned once already; every remaining ONNX engine needs that export
        if not _importable(name):
            _warn_fallback(f"{name} is not installed", next_engine)
            continue
        if not onnx_path.is_file() and not export():
            continue
        result = _try_onnx_engine(name, backbone, onnx_path, n_threads, expected)
        if isinstance(result, str) and export_seconds is None:
            # A cached export can be stale or damaged (an older wrapper, weights edited in
            # place, a foreign file): re-export once before giving up on the engine.
            with contextlib.suppress(OSError):
                onnx_path.unlink()
            if not export():
                continue
            result = _try_onnx_engine(name, backbone, onnx_path, n_threads, expected)
        if isinstance(result, str):
            _warn_fallback(result, next_engine)
            continue
        result.export_path = onnx_path
        result.export_seconds = export_seconds
        say(f"engine: {name} ({n_threads} threads, max diff vs torch {result.parity:.1e})")
        return result
    raise AssertionError("unreachable: torch is always last in the chain")


def _try_onnx_engine(
    name: str,
    backbone: Backbone,
    onnx_path: Path,
    threads: int,
    expected: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> _Runtime | str:
    """A checked runtime, or a one-line reason why it can't be used."""
    cls = OpenVinoRuntime if name == "openvino" else OnnxRuntime
    try:
        runtime = cls(backbone, onnx_path, threads)
        images, ref = expected()
        got = runtime(images)
    except Exception as exc:
        return f"{name} failed to load or run the export ({_brief(exc)})"
    if got.shape != ref.shape:
        return f"{name} returned shape {got.shape}, torch {ref.shape}"
    diff = _max_diff(got, ref)
    if not diff <= PARITY_ATOL:  # also catches NaN
        return f"{name} features differ from torch by {diff:.2e} (> {PARITY_ATOL:g})"
    runtime.parity = diff
    return runtime


def _reference_batch(backbone: Backbone) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random uint8 batch and the plain (NCHW, float32) PyTorch features for it."""
    h, w = backbone.preprocess.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(_PARITY_BATCH, 3, h, w), dtype=np.uint8)
    with eval_mode(backbone.model), torch.inference_mode():
        ref = _wrapper(backbone)(torch.from_numpy(images)).float().numpy()
    return images, ref


def _engine_chain(engine: str) -> list[str]:
    order = ["openvino", "onnxruntime", "torch"]
    if engine == "auto":
        return order if _importable("openvino") else order[1:]
    return order[order.index(engine) :]


def _warn_fallback(reason: str, next_engine: str) -> None:
    # stacklevel=3 points the warning at the code that called make_runtime.
    warnings.warn(f"{reason}; using {next_engine} instead", EngineFallbackWarning, stacklevel=3)


_IMPORTABLE: dict[str, bool] = {}


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        _IMPORTABLE[module] = importlib.util.find_spec(module) is not None
    return _IMPORTABLE[module]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
