"""ONNX: the traced classifier with its metadata inside, and ONNX Runtime sessions to check it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.export.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAME
from transferlab.runtime.graph import ort_session, trace_onnx

__all__ = [
    "export_onnx", "ort_session", "run_batched", "set_onnx_metadata", "time_session",
]  # fmt: skip


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    """Trace ``model`` on ``example`` (batch axis dynamic) into ``path``, ``meta`` included."""
    import onnx

    trace_onnx(model, example, path, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    proto = onnx.load(str(path))
    set_onnx_metadata(proto, meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the model's ``metadata_props`` (classes and preprocess also apart)."""
    import onnx

    proto.producer_name = "transferlab"
    proto.doc_string = (
        "uint8 RGB NCHW images at the model's input size → class probabilities; "
        "see metadata_props['transferlab']"
    )
    onnx.helper.set_model_props(
        proto,
        {
            METADATA_KEY: json.dumps(meta, ensure_ascii=False),
            "classes": json.dumps(meta["classes"], ensure_ascii=False),
            "preprocess": json.dumps(meta["preprocess"], ensure_ascii=False),
            "input_layout": "NCHW uint8 RGB",
        },
    )


def run_batched(session: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The session's output on ``images``, ``batch`` at a time."""
    outs = [
        session.run(None, {INPUT_NAME: images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs)


def time_session(session: Any, batch: np.ndarray, reps: int = 5) -> float:
    """Median seconds per batch after one warm-up call."""
    session.run(None, {INPUT_NAME: batch})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - t)
    return statistics.median(times)
