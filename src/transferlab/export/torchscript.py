"""TorchScript: the traced (and, where it works, frozen) classifier with its metadata inside."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TORCHSCRIPT_EXTRA", "export_torchscript", "jit_load"]

TORCHSCRIPT_EXTRA = "transferlab.json"


def export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]
) -> None:
    """Trace ``model`` on ``example`` and save it to ``path`` with ``meta`` as an extra file."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # same tracer warnings as for ONNX
        traced = torch.jit.trace(model, (example,), check_trace=False)
        with contextlib.suppress(Exception):
            # Folds BatchNorm and constants; purely an optimisation, parity is checked anyway.
            traced = torch.jit.freeze(traced)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # "use torch.export": TorchScript is asked for
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def jit_load(path: Path, extra: dict[str, Any] | None = None) -> Any:
    """A saved TorchScript module on the CPU; ``extra`` receives the named extra files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra or {})
