"""An exported ``.onnx`` file where a run folder is expected (as Ultralytics predicts from an
exported file): ``predict`` and ``evaluate`` read the labels and the preprocessing from the
file's own metadata (see ``transferlab.export``) and run the graph on ONNX Runtime. Nothing
else of the run is needed, so a model shipped as one file can be checked where it landed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.images import MAX_PIXELS
from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess
from transferlab.system import available_cpus

__all__ = ["ExportedClassifier", "is_exported_file"]

_METADATA_KEY = "transferlab"  # export.metadata.METADATA_KEY (the writer sits a layer above)
_INPUT = "images"


def is_exported_file(path: str | os.PathLike) -> bool:
    """An ``.onnx`` file (rather than a run folder)."""
    return Path(path).suffix.lower() == ".onnx" and not Path(path).is_dir()


class ExportedClassifier:
    """An exported ``.onnx`` classifier: ``classes``, ``preprocess`` and ``probs(images)``."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TransferlabError(f"{self.path}: no such file (pass a run folder or an .onnx)")
        self._session = _session(self.path, threads or available_cpus())
        meta = _metadata(self._session, self.path)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.max_pixels = MAX_PIXELS
        self.engine = "onnxruntime"

    def probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) → probabilities (n, C) float32 (the graph's own softmax)."""
        return self._session.run(None, {_INPUT: images})[0].astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"ExportedClassifier({str(self.path)!r}, classes={self.classes})"


def _session(path: Path, threads: int) -> Any:
    from transferlab.runtime.graph import ort_session  # torch comes with it

    try:
        return ort_session(path, threads)
    except Exception as e:  # onnxruntime raises its own (Fail, InvalidProtobuf, …) types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TransferlabError(f"{path}: not a loadable ONNX model ({first})") from None


def _metadata(session: Any, path: Path) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    if _METADATA_KEY not in props:
        raise TransferlabError(
            f"{path}: an ONNX file without transferlab metadata (labels, preprocessing); "
            "export it with `transferlab export RUN`"
        )
    try:
        meta = json.loads(props[_METADATA_KEY])
        meta["classes"], meta["preprocess"]  # noqa: B018 (the keys every consumer needs)
    except (ValueError, KeyError, TypeError) as e:
        raise TransferlabError(f"{path}: unreadable transferlab metadata ({e!r})") from None
    return meta
