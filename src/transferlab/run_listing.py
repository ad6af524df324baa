"""``transferlab runs``: the run folders under a root, finished and interrupted, one row each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.runs import DATA_FILE, INCOMPLETE_FILE, METRICS_FILE, MODEL_FILE
from transferlab.storage import read_json

__all__ = ["run_rows"]


def run_rows(root: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per run folder under ``root`` (any depth): when, strategy, backbone, data,
    val/test accuracy with its 95% CI, and training time; unreadable records leave blanks."""
    rows = []
    for run in _run_folders(Path(root)):
        if (run / INCOMPLETE_FILE).is_file():
            rows.append(_incomplete_row(run))
            continue
        meta_path = run / MODEL_FILE
        try:
            meta = read_json(meta_path) or {}
            metrics = read_json(run / METRICS_FILE) or {}
            data = read_json(run / DATA_FILE) or {}
        except TransferlabError:
            meta, metrics, data = {}, {}, {}
        row: dict[str, Any] = {
            "run": str(run),
            "status": "complete",
            "date": _iso(meta_path.stat().st_mtime),
            "strategy": meta.get("strategy"),
            "backbone": (meta.get("body") or {}).get("spec"),
            "data": (data.get("index") or {}).get("root"),
            "time_s": (metrics.get("timings") or {}).get("total_s"),
        }
        for split in ("val", "test"):
            m = metrics.get(split) or {}
            ci = m.get("accuracy_ci95") or [None, None]
            row.update({f"{split}_acc": m.get("accuracy"), f"{split}_lo": ci[0],
                        f"{split}_hi": ci[1]})  # fmt: skip
        rows.append(row)
    return rows


def _incomplete_row(run: Path) -> dict[str, Any]:
    """An interrupted run's row: where it is and the command that resumes it."""
    try:
        marker = read_json(run / INCOMPLETE_FILE) or {}
    except TransferlabError:
        marker = {}
    return {
        "run": str(run),
        "status": "incomplete",
        "date": _iso((run / INCOMPLETE_FILE).stat().st_mtime),
        "data": marker.get("data"),
        "resume": marker.get("resume"),
    }


def _run_folders(root: Path) -> list[Path]:
    """Run folders (finished, or interrupted ones in OUT.partial) under root, not descending
    into one (checkpoints/) nor into an MLflow store or hidden folder, whose artifact copies of
    runs would be listed twice."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if MODEL_FILE in filenames or INCOMPLETE_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
        dirnames[:] = [d for d in dirnames if d != "mlruns" and not d.startswith(".")]
    return sorted(found)


def _iso(timestamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(timestamp).isoformat(timespec="seconds")
