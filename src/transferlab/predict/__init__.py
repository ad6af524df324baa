"""One prediction engine for the CLI, the Python API and the HTTP server.

    sources (files, folders, globs) ─ lazy walk ─ chunks of paths ─ iter_decoded (worker processes)
        ─ body on its fastest runtime ─ head + softmax (temperature) ─ rows written per batch

Memory stays flat on any folder size: folders are walked with ``os.scandir`` one directory
entry at a time (never a full file list; order is the filesystem's, stable for an unchanged
tree), globs with ``glob.iglob``, and at most ``chunk_size`` paths are held at once. Results are
flushed after every batch, so an interrupted run loses at most one batch and ``resume=True``
continues it: paths already in the output are skipped (a torn last line is cut off first), so
every path ends up in the output exactly once.

The server uses the same engine through :meth:`PredictionEngine.decode` /
:meth:`PredictionEngine.infer` (uploads go through the same ``load_image`` geometry and guards
as files on disk), and ``predict_images`` is the in-memory entry point for Python callers.

    sources   files, folders, globs → paths      engine   PredictionEngine, its results
    output    csv / jsonl / json files, resume     inputs   what Classifier.predict accepts
    results   ImagePrediction / Predictions (typed results, to_pandas)
"""

from __future__ import annotations

from transferlab.predict.engine import UNKNOWN, Prediction, PredictionEngine, RunSummary
from transferlab.predict.output import FORMATS, print_error, read_done
from transferlab.predict.sources import iter_sources

__all__ = [
    "FORMATS",
    "UNKNOWN",
    "Prediction",
    "PredictionEngine",
    "RunSummary",
    "iter_sources",
    "print_error",
    "read_done",
]
