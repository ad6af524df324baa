"""What an exported file says about itself: classes, the input contract, the preprocessing.

ONNX carries it in ``metadata_props`` (key ``transferlab``, plus ``classes`` and ``preprocess``
as their own keys), TorchScript in ``_extra_files`` (``transferlab.json``).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import transferlab
from transferlab.errors import TransferlabError
from transferlab.export.torchscript import TORCHSCRIPT_EXTRA, jit_load

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = ["INPUT_NAME", "METADATA_KEY", "OUTPUT_NAME", "build_metadata", "read_metadata"]

METADATA_KEY = "transferlab"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def build_metadata(clf: Classifier, fmt: str) -> dict[str, Any]:
    """Everything a consumer needs to feed the file and read its output, JSON-able."""
    saved = clf.saved
    h, w = saved.preprocess.input_size
    test = (clf.metrics or {}).get("test") or {}
    meta = {
        "format": f"transferlab-{fmt}",
        "format_version": 1,
        "classes": list(saved.classes),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": "RGB",
            "shape": ["batch", 3, h, w],
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(saved.classes)],
            "kind": "probabilities (softmax over classes)",
            "temperature": float(saved.temperature),
        },
        "preprocess": _preprocess_contract(clf),
        "backbone": saved.body.get("spec"),
        "strategy": saved.strategy,
        "metrics": {
            k: test[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "n") if k in test
        },
        "transferlab_version": transferlab.__version__,
        "torch_version": torch.__version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if saved.body.get("members"):
        meta["ensemble"] = _ensemble_contract(saved.body["members"])
        meta["preprocess"]["in_graph"] = (
            "uint8 → float x/255; per member: bilinear resize to its input size, its own "
            "(x − mean)/std, its network, softmax; the members' probabilities averaged with "
            "the ensemble's weights"
        )
    return meta


def _ensemble_contract(members: list[dict[str, Any]]) -> dict[str, Any]:
    """What the one graph of an ensemble runs: each member, its input size and its weight."""
    keys = ("spec", "strategy", "input_size", "weight")
    return {
        "kind": "weighted average of the members' probabilities (weights chosen on val)",
        "members": [{k: m[k] for k in keys if k in m} for m in members],
    }


def _preprocess_contract(clf: Classifier) -> dict[str, Any]:
    """The preprocessing, and which of its steps the graph does and which the consumer does."""
    pre = clf.saved.preprocess
    h, w = pre.input_size
    rh, rw = pre.resize_size
    if pre.crop_mode == "squash":
        resize = f"resize to {rw}×{rh} ({pre.interpolation})"
    else:
        resize = f"resize the shorter side to {min(rh, rw)} ({pre.interpolation}, aspect kept)"
    return {
        **pre.to_dict(),
        "resize_size": [rh, rw],
        "in_graph": "uint8 → float, (x/255 − mean)/std, softmax",
        "outside_graph": (
            "decode to RGB (EXIF orientation applied, alpha over white); "
            f"{resize}; centre-crop {w}×{h}; HWC → CHW; batch"
        ),
    }


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The transferlab metadata of an exported ONNX or TorchScript file (plain JSON)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise TransferlabError(f"{path}: no transferlab metadata in this ONNX file")
        return json.loads(props[METADATA_KEY])
    extra = {TORCHSCRIPT_EXTRA: ""}
    jit_load(path, extra)
    if not extra[TORCHSCRIPT_EXTRA]:
        raise TransferlabError(f"{path}: no transferlab metadata in this TorchScript file")
    return json.loads(extra[TORCHSCRIPT_EXTRA])
