"""``evaluate`` on an exported ``.onnx`` file: the same splits, the same report, computed by the
graph that ships (labels and preprocessing from its metadata) instead of the run folder."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from transferlab.data.prepared import PreparedData
from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import classification_report
from transferlab.evaluation.run_data import evaluation_data
from transferlab.predict import ExportedClassifier, PredictionEngine

__all__ = ["evaluate_exported"]


def evaluate_exported(
    path: str | os.PathLike, data: str | os.PathLike, split: str = "test"
) -> tuple[ExportedClassifier, PreparedData, dict[str, Any], str]:
    """Score the exported file ``path`` on ``split`` of ``data`` (``"all"``: every image; an
    unsplit folder is scored whole). The file carries no fit configuration, so the folder is
    split with the default seed and fractions. Returns (model, data, report, split)."""
    model = ExportedClassifier(path)
    prepared, split = evaluation_data(data, None, model.classes, split)
    if split not in prepared.splits:
        have = ", ".join(prepared.splits) or "none"
        raise TransferlabError(
            f"{data}: no {split!r} split (it has: {have}); pick one with --split"
        )
    part = prepared.splits[split]
    probs, failed = [], []
    for pred in PredictionEngine(model).iter_predict(part.paths):
        if pred.probs is None:
            failed.append(f"{pred.path}: {pred.error}")
        probs.append(pred.probs)
    if failed:  # the scan read them a moment ago: a file changed underneath
        raise TransferlabError("could not score every image:\n  " + "\n  ".join(failed[:10]))
    return (
        model,
        prepared,
        classification_report(part.labels, np.stack(probs), model.classes),
        split,
    )
