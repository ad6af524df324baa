"""The function every engine runs, and its ONNX export.

Every engine takes uint8 images (n, 3, H, W) and returns float32 pooled features (n, F). The
``/255 - mean) / std`` normalization is part of the exported graph, so decoding stays uint8 end to
end and the preprocessing travels inside the export.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.backbones import Backbone
from transferlab.model import eval_mode

__all__ = ["OPSET", "Uint8Input", "export_onnx", "feature_wrapper", "trace_onnx"]

OPSET = 17
_EXPORT_BATCH = 2


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


def feature_wrapper(backbone: Backbone) -> Uint8Input:
    """The backbone behind its uint8 input: uint8 images -> pooled features."""
    pp = backbone.preprocess
    return Uint8Input(backbone.model, pp.mean, pp.std)


def trace_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str, output_name: str
) -> None:
    """``torch.onnx.export`` as every transferlab graph is exported: traced on ``example`` with a
    dynamic batch axis, opset :data:`OPSET`, constant folding."""
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about shape-dependent Python ints (timm's 'same' padding) are
        # expected: the spatial size is fixed by the preprocessing, only the batch is dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )


def export_onnx(backbone: Backbone, path: Path) -> float:
    """Export the uint8 feature wrapper to ``path`` atomically; returns the seconds it took.

    Uses the legacy TorchScript exporter (``dynamo=False``): ~0.5 s for MobileNetV2 here versus
    ~10 s for the dynamo exporter, with a dynamic batch axis and opset 17.
    """
    h, w = backbone.preprocess.input_size
    wrapper = feature_wrapper(backbone)
    dummy = torch.zeros((_EXPORT_BATCH, 3, h, w), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=path.parent)
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache's export from others
    os.close(fd)
    start = time.perf_counter()
    try:
        with eval_mode(backbone.model), torch.inference_mode(False):
            trace_onnx(wrapper, dummy, Path(tmp), input_name="images", output_name="features")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return time.perf_counter() - start


def ort_session(path: Path, threads: int, *, spin: bool = True) -> Any:
    """A CPU ONNX Runtime session on ``threads`` threads, every graph optimisation on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        # Idle pool threads otherwise busy-wait after each run, stealing CPU from whatever runs
        # next (another engine in an interleaved benchmark).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
