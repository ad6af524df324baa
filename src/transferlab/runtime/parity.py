"""Check an engine against the PyTorch wrapper before it is used (max abs diff <= 1e-4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from transferlab.backbones import Backbone
from transferlab.model import eval_mode
from transferlab.runtime.engines import EngineRuntime, OnnxRuntime
from transferlab.runtime.graph import feature_wrapper
from transferlab.runtime.openvino_engine import OpenVinoRuntime

__all__ = ["PARITY_ATOL", "brief", "check_onnx_engine", "max_diff", "reference_batch"]

PARITY_ATOL = 1e-4
_PARITY_BATCH = 3  # odd on purpose: differs from the export's dummy batch (the dynamic axis)

Reference = Callable[[], tuple[np.ndarray, np.ndarray]]


def check_onnx_engine(
    name: str, backbone: Backbone, onnx_path: Path, threads: int, expected: Reference
) -> EngineRuntime | str:
    """A checked runtime for the export at ``onnx_path``, or a one-line reason why it can't be
    used. ``expected`` returns the reference batch (computed once, shared by the engines)."""
    cls = OpenVinoRuntime if name == "openvino" else OnnxRuntime
    try:
        runtime = cls(backbone, onnx_path, threads)
        images, ref = expected()
        got = runtime(images)
        # One image takes another path in some engines (OpenVINO's latency compilation).
        one = runtime(images[:1])
    except Exception as exc:
        return f"{name} failed to load or run the export ({brief(exc)})"
    if got.shape != ref.shape:
        return f"{name} returned shape {got.shape}, torch {ref.shape}"
    diff = max(max_diff(got, ref), max_diff(one, ref[:1]))
    if not diff <= PARITY_ATOL:  # also catches NaN
        return f"{name} features differ from torch by {diff:.2e} (> {PARITY_ATOL:g})"
    runtime.parity = diff
    return runtime


def reference_batch(backbone: Backbone) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random uint8 batch and the plain (NCHW, float32) PyTorch features for it."""
    h, w = backbone.preprocess.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(_PARITY_BATCH, 3, h, w), dtype=np.uint8)
    with eval_mode(backbone.model), torch.inference_mode():
        ref = feature_wrapper(backbone)(torch.from_numpy(images)).float().numpy()
    return images, ref


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def brief(exc: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a one-line warning."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
