"""Experiment tracking through MLflow (optional: ``pip install mlflow-skinny``).

``fit(..., track="mlflow")`` / ``--track mlflow`` logs one MLflow run per fit: params (the whole
FitConfig, the backbone's identity, a digest of the input manifest), the history as per-epoch
metrics, the final val/test figures with their 95% CIs, tags (strategy, dataset, backbone) and
the run folder's files as artifacts. The ladder logs a parent run with one child per rung.

The store is ``$MLFLOW_TRACKING_URI`` when set, else ``./mlruns`` (a local file store: works
offline). ``tracking.json`` in the run folder records where the run went.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.runs import CURVES_PNG, REPORT_FILE
from transferlab.storage import read_json, write_json
from transferlab.system import is_rank_zero

__all__ = [
    "TRACKING_FILE", "attach_files", "data_digest", "end_run", "finish_fit", "log_fit",
    "start_run", "tracking_uri",
]  # fmt: skip

TRACKING_FILE = "tracking.json"
EXPERIMENT = "transferlab"
# Whatever sits in a run folder except checkpoints/ (resumable training state, large).
_ARTIFACT_SKIP = (".tmp",)


def _client() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TransferlabError(
            "--track mlflow needs MLflow: pip install mlflow-skinny (or mlflow), or drop --track"
        ) from None
    return MlflowClient(tracking_uri=tracking_uri())


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a file store in ./mlruns."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store but asks for an opt-in; it is the offline default here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def finish_fit(clf: Any, out: Path | None) -> None:
    """After ``fit``'s save: log the run when the config asks for tracking."""
    if not is_rank_zero() or not clf.saved.config.get("track"):
        return
    try:
        end_run(log_fit(clf, out))
    except TransferlabError:
        raise
    except Exception as e:  # an unreachable server, a full store: the trained run is kept
        saved = f"the run itself is saved in {out}" if out is not None else "nothing was saved"
        raise TransferlabError(
            f"--track mlflow: logging to {tracking_uri()} failed ({type(e).__name__}: {e}); "
            f"{saved}; check MLFLOW_TRACKING_URI"
        ) from e


def data_digest(inputs: dict[str, Any] | None) -> str | None:
    """One sha256 over the manifest's (path, sha256, split, label): the data's identity."""
    if not inputs:
        return None
    h = hashlib.sha256()
    for f in inputs["files"]:
        h.update(f"{f['path']}\0{f['sha256']}\0{f['split']}\0{f['label']}\n".encode())
    return h.hexdigest()


def start_run(name: str, *, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new MLflow run (a child of ``parent`` when given) in the transferlab experiment."""
    client = _client()
    exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status)


def log_fit(
    clf: Any,
    out: Path | None,
    *,
    parent: str | None = None,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    """Log one fitted classifier (and its run folder, if any) as an MLflow run; its id."""
    from mlflow.entities import Metric, Param

    config = {**clf.saved.config, **(overrides or {})}
    inputs = getattr(clf, "inputs", None)
    root = (inputs or {}).get("root") or clf.data_summary.get("index", {}).get("root", "")
    tags = {
        "strategy": str(clf.saved.strategy),
        "dataset": Path(root).name if root else "",
        "backbone": str(clf.saved.body.get("spec")),
        "transferlab.run_dir": str(Path(out).resolve()) if out else "",
    }
    run_name = name or (Path(out).name if out else clf.saved.strategy)
    run_id = start_run(run_name, parent=parent, tags=tags)
    client = _client()
    try:
        params = {f"config.{k}": v for k, v in config.items()}
        params.update(
            {
                "backbone.spec": clf.saved.body.get("spec"),
                "backbone.weights_hash": clf.saved.body.get("weights_hash"),
                "backbone.trained": clf.saved.body.get("trained", False),
                "data.root": root,
                "data.images": len(inputs["files"]) if inputs else None,
                "data.digest": data_digest(inputs),
                "classes": ",".join(clf.classes),
            }
        )
        plist = [Param(k, _param(v)) for k, v in params.items()]
        for i in range(0, len(plist), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=plist[i : i + 100])
        metrics = [Metric(k, v, 0, step) for k, v, step in _metric_rows(clf)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        if out is not None:
            _curves(clf, Path(out))
            attach_files(Path(out), run_id)
            write_json(
                Path(out) / TRACKING_FILE,
                {"tracker": "mlflow", "tracking_uri": tracking_uri(), "run_id": run_id},
            )
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's param value limit


def _metric_rows(clf: Any) -> list[tuple[str, float, int]]:
    """(name, value, step): every numeric history column per epoch (step = row), then the
    final figures of each split at step 0."""
    rows: list[tuple[str, float, int]] = []
    for i, row in enumerate(clf.history or []):
        step = int(row["epoch"]) if isinstance(row.get("epoch"), int) else i
        for k, v in row.items():
            if k != "epoch" and _number(v):
                rows.append((k, float(v), step))
    for split in ("val", "test"):
        report = clf.metrics.get(split)
        if not isinstance(report, dict):
            continue
        for k, v in report.items():
            if _number(v):
                rows.append((f"{split}_{k}", float(v), 0))
            elif k.endswith("_ci95") and isinstance(v, list) and len(v) == 2:
                rows.append((f"{split}_{k}_low", float(v[0]), 0))
                rows.append((f"{split}_{k}_high", float(v[1]), 0))
    for k, v in (clf.metrics.get("timings") or {}).items():
        if _number(v):
            rows.append((f"time_{k}", float(v), 0))
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def _curves(clf: Any, out: Path) -> None:
    if clf.history and not (out / CURVES_PNG).is_file():
        from transferlab.evaluation.plots import plot_learning_curves

        plot_learning_curves(clf.history, out=out / CURVES_PNG)


def attach_files(run_dir: Path, run_id: str | None = None) -> None:
    """Log the run folder's files (model, records, provenance, curves, report) as artifacts of
    ``run_id`` (default: the run recorded in ``tracking.json``); call again after the report."""
    if run_id is None:
        record = read_json(run_dir / TRACKING_FILE)
        if not record:
            return
        run_id = record["run_id"]
    client = _client()
    for path in sorted(run_dir.iterdir()):
        skip = path.name == TRACKING_FILE or any(s in path.name for s in _ARTIFACT_SKIP)
        if path.is_file() and not skip:
            client.log_artifact(run_id, str(path))


def attach_report(run_dir: Path) -> None:
    """The report and curves written after fit, added to the run's artifacts (if tracked)."""
    record = read_json(run_dir / TRACKING_FILE)
    if not record:
        return
    client = _client()
    for name in (REPORT_FILE, CURVES_PNG):
        if (run_dir / name).is_file():
            client.log_artifact(record["run_id"], str(run_dir / name))
