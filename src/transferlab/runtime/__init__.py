"""Run the frozen backbone on the fastest available engine: OpenVINO, ONNX Runtime or PyTorch.

Every engine takes uint8 images (n, 3, H, W) and returns float32 pooled features (n, F); the
normalization is part of the exported graph (:mod:`~transferlab.runtime.graph`).

The ONNX graph is exported once per backbone identity and cached; every engine is checked against
the PyTorch wrapper on a small fixed batch (max abs diff <= 1e-4, :mod:`~.parity`) before it is
used, and any failure falls back to the next engine with a one-line warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from transferlab.backbones import Backbone
from transferlab.cache import FeatureCache
from transferlab.config import ENGINES  # one vocabulary, validated by FitConfig
from transferlab.errors import TransferlabError
from transferlab.runtime.engines import EngineRuntime, TorchRuntime
from transferlab.runtime.graph import Uint8Input, export_onnx
from transferlab.runtime.parity import brief, check_onnx_engine, max_diff, reference_batch
from transferlab.system import available_cpus

__all__ = [
    "ENGINES",
    "EngineFallbackWarning",
    "FeatureRuntime",
    "Uint8Input",
    "export_onnx",
    "make_runtime",
]

Log = Callable[[str], None]


class EngineFallbackWarning(RuntimeWarning):
    """An engine could not be used (or disagreed with PyTorch) and the next one was chosen."""


@runtime_checkable
class FeatureRuntime(Protocol):
    engine: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) at preprocess.input_size -> float32 (n, num_features)."""
        ...

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """``self(batch)`` for each batch, in order, batches possibly overlapping: a batch may
        still be read after the next one is pulled, so it must not be changed until its
        features have been yielded."""
        ...


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
    onnx_path = Path(export_dir or FeatureCache().exports_dir) / f"{backbone.identity_hash()}.onnx"
    # Every engine is checked against the network, so build it now: a body that cannot be built
    # (a run's damaged weights) fails with its own message, not as engine fallbacks that
    # would also delete a valid cached export.
    backbone.model  # noqa: B018
    selection = _Selection(backbone, onnx_path, threads or available_cpus(), log)
    chain = _engine_chain(engine)
    for i, name in enumerate(chain):
        if name == "torch":
            return selection.torch(threads)
        runtime = selection.onnx_engine(name, chain[i + 1] if i + 1 < len(chain) else "torch")
        if runtime is not None:
            return runtime
    raise AssertionError("unreachable: torch is always last in the chain")


class _Selection:
    """What the engines tried by one make_runtime call share: one export, one reference batch."""

    def __init__(self, backbone: Backbone, onnx_path: Path, threads: int, log: Log | None) -> None:
        self.backbone = backbone
        self.onnx_path = onnx_path
        self.threads = threads
        self.say: Log = log or (lambda _msg: None)
        self.export_failed = False
        self.export_seconds: float | None = None  # set once this call has (re-)exported
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    def expected(self) -> tuple[np.ndarray, np.ndarray]:
        if self._reference is None:
            self._reference = reference_batch(self.backbone)
        return self._reference

    def torch(self, threads: int | None) -> EngineRuntime:
        runtime = TorchRuntime(self.backbone, threads=threads)
        # torch vs torch differs only by channels_last kernels, but record it like the others.
        images, ref = self.expected()
        runtime.parity = max_diff(runtime(images), ref)
        self.say(f"engine: torch ({runtime.threads} threads)")
        return runtime

    def onnx_engine(self, name: str, next_engine: str) -> EngineRuntime | None:
        """A checked ONNX-based engine, or None (with a warning naming ``next_engine``)."""
        if self.export_failed:
            return None  # warned once already; every remaining ONNX engine needs that export
        if not _importable(name):
            _warn_fallback(f"{name} is not installed", next_engine)
            return None
        if not self.onnx_path.is_file() and not self.export():
            return None
        result = self._check(name)
        if isinstance(result, str) and self.export_seconds is None:
            # A cached export can be stale or damaged (an older wrapper, weights edited in
            # place, a foreign file): re-export once before giving up on the engine.
            with contextlib.suppress(OSError):
                self.onnx_path.unlink()
            if not self.export():
                return None
            result = self._check(name)
        if isinstance(result, str):
            _warn_fallback(result, next_engine)
            return None
        result.export_path = self.onnx_path
        result.export_seconds = self.export_seconds
        self.say(f"engine: {name} ({self.threads} threads, max diff vs torch {result.parity:.1e})")
        return result

    def _check(self, name: str) -> EngineRuntime | str:
        return check_onnx_engine(name, self.backbone, self.onnx_path, self.threads, self.expected)

    def export(self) -> bool:
        self.say(f"exporting {self.backbone.spec} to ONNX (once per backbone) ...")
        try:
            self.export_seconds = export_onnx(self.backbone, self.onnx_path)
        except Exception as exc:
            self.export_failed = True
            _warn_fallback(f"ONNX export failed ({brief(exc)})", "torch")
            return False
        self.say(f"exported in {self.export_seconds:.1f}s -> {self.onnx_path}")
        return True


def _engine_chain(engine: str) -> list[str]:
    order = ["openvino", "onnxruntime", "torch"]
    if engine == "auto":
        return order if _importable("openvino") else order[1:]
    return order[order.index(engine) :]


def _warn_fallback(reason: str, next_engine: str) -> None:
    # Called from _Selection.onnx_engine, stacklevel=4 points the warning at the code that called
    # make_runtime (an export failure, one frame deeper, is reported at make_runtime itself).
    warnings.warn(f"{reason}; using {next_engine} instead", EngineFallbackWarning, stacklevel=4)


_IMPORTABLE: dict[str, bool] = {}


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        _IMPORTABLE[module] = importlib.util.find_spec(module) is not None
    return _IMPORTABLE[module]
