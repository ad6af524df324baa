"""The tutorial's experiment as one call: scratch CNNs → frozen features → fine-tuning, same data.

Every rung is a ``fit`` with a few config overrides, on the same prepared splits; each rung's
run folder is a normal, loadable model. ``--seeds N`` repeats the training (not the split) with
N seeds and reports mean ± sd.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transferlab.api import fit
from transferlab.config import FitConfig
from transferlab.data.prepared import prepare_data
from transferlab.errors import TransferlabError
from transferlab.evaluation.plots import plot_compare, plot_learning_curves
from transferlab.evaluation.report import write_report
from transferlab.progress import info
from transferlab.runs import CURVES_PNG, HISTORY_FILE, LADDER_FILE, LADDER_MD, LADDER_PNG
from transferlab.tracking import end_run, log_fit, start_run, tracking_uri

# The scratch rungs are the expensive ones on a CPU: 15 epochs at the tutorial's 150x150 show
# the overfitting story and keep the whole default ladder inside 30 min on 2 cores.
_SCRATCH_BUDGET = {"epochs": 15, "image_size": 150}

# name → (what it shows, FitConfig overrides). Order = the ladder's order.
RUNGS: dict[str, tuple[str, dict[str, Any]]] = {
    "scratch-basic": (
        "tutorial CNN from scratch",
        {"strategy": "scratch-basic", "augment": "none", **_SCRATCH_BUDGET},
    ),
    "scratch-regularized": (
        "+ dropout, one more conv block",
        {"strategy": "scratch-regularized", "augment": "none", **_SCRATCH_BUDGET},
    ),
    "scratch-basic-aug": (
        "tutorial CNN + augmentation",
        {"strategy": "scratch-basic", "augment": "tutorial", **_SCRATCH_BUDGET},
    ),
    "features-linear": (
        "frozen pretrained base, cached features, linear head",
        {"strategy": "features", "head": "linear"},
    ),
    "features-mlp": (
        "frozen pretrained base, cached features, tutorial MLP head",
        {"strategy": "features", "head": "mlp"},
    ),
    "frozen-aug": (
        "frozen base + head on augmented views",
        {"strategy": "frozen", "augment": "tutorial"},
    ),
    "finetune-aug": (
        "head, then top blocks unfrozen, with augmentation",
        {"strategy": "finetune", "augment": "light"},
    ),
}

# --quick: the same rungs with budgets that fit in a few minutes on 2 cores.
QUICK: dict[str, dict[str, Any]] = {
    "scratch-basic": {"epochs": 2, "image_size": 96},
    "scratch-regularized": {"epochs": 2, "image_size": 96},
    "scratch-basic-aug": {"epochs": 2, "image_size": 96},
    "frozen-aug": {"epochs": 10},
    "finetune-aug": {"epochs": 1},
}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def ladder(
    data: str | os.PathLike,
    *,
    out: str | os.PathLike,
    rungs: list[str] | None = None,
    seeds: int = 1,
    quick: bool = False,
    config: FitConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the rungs on the same prepared splits; write ladder.json, ladder.md and charts."""
    base = config or FitConfig(**options)
    names = rungs or list(RUNGS)
    unknown = [n for n in names if n not in RUNGS]
    if unknown:
        raise TransferlabError(
            f"unknown rung(s) {', '.join(unknown)}; choose from {', '.join(RUNGS)}"
        )
    if seeds < 1:
        raise TransferlabError("--seeds must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(data, base)
    parent = _start_parent(base, out, data)
    try:
        results = [
            _run_rung(name, data, prepared, base, out, seeds, quick, parent) for name in names
        ]
    except BaseException:
        if parent:
            end_run(parent, "FAILED")
        raise
    report = {
        "data": str(data),
        "backbone": base.backbone,
        "seeds": [base.seed + k for k in range(seeds)],
        "quick": quick,
        "rungs": results,
    }
    (out / LADDER_FILE).write_text(json.dumps(report, indent=2))
    (out / LADDER_MD).write_text(markdown_table(report))
    _charts(report, out)
    write_report(out)
    if parent:
        _finish_parent(parent, report, out)
    return report


def _run_rung(name, data, prepared, base, out, seeds, quick, parent) -> dict[str, Any]:
    """One rung, ``seeds`` times; each fit is a child of the ladder's MLflow run when tracked."""
    description, overrides = RUNGS[name]
    runs = []
    for k in range(seeds):
        cfg = replace(base, **{**overrides, **(QUICK.get(name, {}) if quick else {})})
        cfg.seed = base.seed + k
        cfg.track = None  # the child is logged below, after its report, under the parent
        run_dir = out / name if seeds == 1 else out / name / f"seed{cfg.seed}"
        info(f"[bold]{name}[/bold] ({description}), seed {cfg.seed}")
        t0 = time.perf_counter()
        clf = fit(data, out=run_dir, config=cfg, prepared=prepared)
        seconds = time.perf_counter() - t0
        write_report(run_dir, classifier=clf)
        if parent:
            child = log_fit(clf, run_dir, parent=parent, name=run_dir.relative_to(out).as_posix(),
                            overrides={"track": base.track})  # fmt: skip
            end_run(child)
        runs.append(_rung_record(clf.metrics, seconds, run_dir, cfg.seed))
        _say(name, runs[-1])
    return _combine(name, description, overrides, runs)


def _start_parent(base: FitConfig, out: Path, data: Any) -> str | None:
    if not base.track:
        return None
    return start_run(
        f"ladder {out.name}",
        tags={"ladder": "true", "dataset": Path(data).name, "backbone": base.backbone},
    )


def _finish_parent(parent: str, report: dict[str, Any], out: Path) -> None:
    """The ladder's own figures (each rung's val/test accuracy) and files on the parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    client.log_param(parent, "rungs", ",".join(r["name"] for r in report["rungs"]))
    client.log_param(parent, "seeds", len(report["seeds"]))
    for rung in report["rungs"]:
        for split in ("val", "test"):
            if split in rung:
                client.log_metric(parent, f"{rung['name']}.{split}_accuracy",
                                  rung[split]["accuracy"])  # fmt: skip
    for name in (LADDER_FILE, LADDER_MD, LADDER_PNG, "report.html"):
        if (out / name).is_file():
            client.log_artifact(parent, str(out / name))
    end_run(parent)


def _rung_record(metrics: dict[str, Any], seconds: float, run_dir: Path, seed: int):
    rec: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir), "seconds": seconds}
    for split in ("val", "test"):
        if split in metrics:
            rec[split] = {
                "accuracy": metrics[split]["accuracy"],
                "accuracy_ci95": metrics[split]["accuracy_ci95"],
            }
    rec["epochs"] = metrics.get("info", {}).get("epochs")
    rec["trainable_params"] = metrics.get("info", {}).get("trainable_params")
    return rec


def _combine(name: str, description: str, overrides: dict, runs: list[dict]) -> dict[str, Any]:
    first = runs[0]
    rung = {
        "name": name,
        "description": description,
        "config": overrides,
        "run_dir": first["run_dir"],
        "seconds": _summary([r["seconds"] for r in runs])["mean"],
        "epochs": first["epochs"],
        "trainable_params": first["trainable_params"],
        "runs": runs,
    }
    for split in ("val", "test"):
        if split in first:
            rung[split] = dict(first[split])
            if len(runs) > 1:
                rung[split]["across_seeds"] = _summary([r[split]["accuracy"] for r in runs])
    return rung


def _say(name: str, rec: dict[str, Any]) -> None:
    parts = [f"{name}:"]
    for split in ("val", "test"):
        if split in rec:
            parts.append(f"{split} {rec[split]['accuracy']:.4f}")
    parts.append(f"{rec['seconds']:.0f} s")
    info("  " + "  ".join(parts))


def _fmt_acc(rung: dict[str, Any], split: str) -> str:
    if split not in rung:
        return "–"
    m = rung[split]
    if "across_seeds" in m:
        s = m["across_seeds"]
        return f"{s['mean']:.1%} ± {s['sd']:.1%}"
    lo, hi = m["accuracy_ci95"]
    return f"{m['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]"


def markdown_table(report: dict[str, Any]) -> str:
    seeds = len(report["seeds"])
    acc_note = "mean ± sd over seeds" if seeds > 1 else "[95% CI]"
    lines = [
        f"# Ladder on `{report['data']}` with `{report['backbone']}`",
        "",
        f"| rung | what | val acc {acc_note} | test acc {acc_note} | time (s) | epochs "
        "| trainable params |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in report["rungs"]:
        params = r["trainable_params"]
        lines.append(
            f"| {r['name']} | {r['description']} | {_fmt_acc(r, 'val')} | {_fmt_acc(r, 'test')} "
            f"| {r['seconds']:.0f} | {r['epochs'] if r['epochs'] is not None else '–'} "
            f"| {f'{params:,}' if params is not None else '–'} |"
        )
    return "\n".join(lines) + "\n"


def _charts(report: dict[str, Any], out: Path) -> None:
    """Each rung's two-panel accuracy/loss curves (the tutorial's figure) and one comparison."""
    for rung in report["rungs"]:
        for run in rung["runs"]:
            history = Path(run["run_dir"]) / HISTORY_FILE
            if history.is_file():
                rows = json.loads(history.read_text())
                if rows:
                    plot_learning_curves(
                        rows, title=rung["name"], out=Path(run["run_dir"]) / CURVES_PNG
                    )
    plot_compare(report["rungs"], title="ladder: accuracy with 95% CI", out=out / LADDER_PNG)
