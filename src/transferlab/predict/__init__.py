"""One prediction engine for the CLI, the Python API and the HTTP server.

    sources (files, folders, globs) ─ lazy walk ─ chunks of paths ─ iter_decoded (decode threads)
        ─ body on its fastest runtime ─ head + softmax (temperature) ─ rows written per batch

Memory stays flat on any tree: folders are walked depth first holding one folder's listing per
level (never a full file list), each in name order, so the output order is the same on every
filesystem; globs are sorted; at most ``chunk_size`` paths are held at once. Results are
flushed after every batch, so an interrupted run loses at most one batch and ``resume=True``
continues it: paths already in the output are skipped (a torn last line is cut off first), so
every path ends up in the output exactly once.

The server uses the same engine through :meth:`PredictionEngine.decode` /
:meth:`PredictionEngine.infer` (uploads go through the same ``load_image`` geometry and guards
as files on disk), and ``predict_images`` is the in-memory entry point for Python callers.

    sources   files, folders, globs → paths      engine   PredictionEngine, its results
    output    csv / jsonl / json files, resume     inputs   what Classifier.predict accepts
    results   ImagePrediction / Predictions (typed results, to_pandas)
    exported  an exported .onnx file in place of a run folder (its metadata: labels, preprocessing)
"""

from __future__ import annotations

from transferlab.predict.engine import UNKNOWN, Prediction, PredictionEngine, RunSummary
from transferlab.predict.exported import ExportedClassifier, is_exported_file
from transferlab.predict.output import FORMATS, print_error, read_done
from transferlab.predict.sources import iter_sources

__all__ = [
    "FORMATS",
    "ExportedClassifier",
    "is_exported_file",
    "UNKNOWN",
    "Prediction",
    "PredictionEngine",
    "RunSummary",
    "iter_sources",
    "print_error",
    "read_done",
]
