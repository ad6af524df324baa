"""The PyTorch and ONNX Runtime engines, and the input checks and chunking every engine shares."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from transferlab.backbones import Backbone
from transferlab.runtime.graph import feature_wrapper
from transferlab.system import tune_glibc_malloc

__all__ = ["EngineRuntime", "OnnxRuntime", "TorchRuntime"]

_MAX_CHUNK = 64  # bound activation memory when a caller passes thousands of images at once


class EngineRuntime:
    """uint8 (n, 3, H, W) -> float32 (n, F), checked and chunked; subclasses run one chunk."""

    engine = "base"

    def __init__(self, input_size: tuple[int, int], num_features: int) -> None:
        self.input_size = tuple(input_size)
        self.num_features = num_features
        self.parity: float | None = None  # max abs diff vs the PyTorch wrapper, once checked
        self.export_path: Path | None = None
        self.export_seconds: float | None = None  # None: the cached export was reused
        self.threads: int | None = None
        self.max_batch = _MAX_CHUNK

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The features of each batch, in order. An engine with several streams overrides it to
        run batches concurrently, pulling the next one while the earlier ones run."""
        for images in batches:
            yield self(images)

    def checked(self, images: np.ndarray) -> np.ndarray:
        """``images`` as the contiguous uint8 ``(n, 3, H, W)`` array the engine takes."""
        images = np.asarray(images)
        h, w = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise ValueError(
                f"{self.engine} runtime expects uint8 images of shape (n, 3, {h}, {w}), "
                f"got {images.dtype} {images.shape}"
            )
        return np.ascontiguousarray(images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = self.checked(images)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.num_features), dtype=np.float32)
        if n <= self.max_batch:
            return self._run(images)
        parts = [
            self._run(np.ascontiguousarray(images[i : i + self.max_batch]))
            for i in range(0, n, self.max_batch)
        ]
        return np.concatenate(parts)

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<FeatureRuntime engine={self.engine} parity={self.parity}>"


class TorchRuntime(EngineRuntime):
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
        wrapper = copy.deepcopy(feature_wrapper(backbone))
        self._wrapper = wrapper.to(memory_format=torch.channels_last).eval()
        self._lock = threading.Lock()

    def _run(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            out = self._wrapper(x)
        return out.float().numpy().astype(np.float32, copy=False)


class OnnxRuntime(EngineRuntime):
    engine = "onnxruntime"

    def __init__(self, backbone: Backbone, onnx_path: Path, threads: int) -> None:
        from transferlab.runtime.graph import ort_session

        super().__init__(backbone.preprocess.input_size, backbone.num_features)
        self._session = ort_session(onnx_path, threads)
        self._input = self._session.get_inputs()[0].name
        self.threads = threads

    def _run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: images})
        return np.asarray(out, dtype=np.float32)
