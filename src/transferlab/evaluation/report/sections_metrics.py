"""How good the model is: learning curves, metrics with confidence intervals, the confusion
matrix and calibration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.evaluation import analysis, plots
from transferlab.evaluation.metrics import expected_calibration_error, fit_temperature
from transferlab.evaluation.report.context import RunContext
from transferlab.evaluation.report.render import pct


def curves_section(ctx: RunContext) -> dict[str, Any]:
    """The ``curves.html`` section: train vs val per epoch, or per L2 of a linear head."""
    h = ctx.history
    if not h:
        return {"png": None, "grid": False}
    return {
        "png": ctx.figure(plots.plot_learning_curves, h),
        "grid": "epoch" not in h[0] and "l2" in h[0],
    }


def _report_rows(m: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A classification report's summary rows after accuracy (the template shows it first)."""
    rows = [
        ("balanced accuracy", pct(m.get("balanced_accuracy"))),
        ("macro F1", f"{m.get('macro_f1', float('nan')):.3f}"),
        ("log loss", f"{m.get('log_loss', float('nan')):.3f}"),
        ("ECE (15 bins)", f"{m.get('ece', float('nan')):.3f}"),
        ("n", str(m.get("n"))),
    ]
    if m.get("roc_auc") is not None:
        rows.insert(2, ("ROC AUC", f"{m['roc_auc']:.3f}"))
    for k, v in (m.get("top_k_accuracy") or {}).items():
        rows.insert(1, (f"top-{k} accuracy", pct(v)))
    return rows


def _split_report(name: str, m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "m": m,
        "ci_method": m.get("ci_method", "wilson"),
        "rows": _report_rows(m),
        "per_class": [
            (c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
            for c, r in (m.get("per_class") or {}).items()
        ],
    }


def metrics_section(ctx: RunContext) -> dict[str, Any]:
    """The ``metrics.html`` section: the val/test reports as recorded at fit time (and TTA)."""
    metrics = ctx.metrics
    splits = [_split_report(name, metrics[name]) for name in ("val", "test") if metrics.get(name)]
    if not splits:
        raise TransferlabError("metrics.json has no val/test results")
    tta = metrics.get("tta")
    return {
        "splits": splits,
        "tta": tta or None,
        "tta_rows": [("plain", tta["plain"]), (tta["mode"], tta["tta"])] if tta else [],
        "temperature": ctx.clf.saved.temperature,
        "n": (metrics.get("test") or metrics.get("val"))["n"],
    }


def confusion_section(ctx: RunContext) -> dict[str, Any]:
    """The ``confusion.html`` section: the matrix of the test split (else val), worst pairs."""
    name = "test" if "test" in ctx.metrics else "val"
    m = ctx.metrics.get(name)
    if not m:
        raise TransferlabError("metrics.json has no confusion matrix")
    cm = m["confusion_matrix"]
    return {
        "name": name,
        "png": ctx.figure(plots.plot_confusion, cm, ctx.classes),
        "pairs": analysis.most_confused(cm, ctx.classes, k=10),
    }


def calibration_section(ctx: RunContext) -> dict[str, Any]:
    """The ``calibration.html`` section: the reliability diagram, before/after the model's
    temperature, and what temperature scaling would do when there is none."""
    name = ctx.eval_split()
    y = ctx.splits()[name].labels
    t = ctx.clf.saved.temperature
    raw = ctx.probs(name, 1.0)
    if t != 1.0:
        png = ctx.figure(
            plots.plot_reliability,
            raw,
            y,
            calibrated=ctx.probs(name, t),
            temperature=t,
            title=f"reliability on {name}: before / after temperature scaling",
        )
    else:
        png = ctx.figure(plots.plot_reliability, raw, y, title=f"reliability on {name}")
    data: dict[str, Any] = {
        "name": name,
        "t": t,
        "png": png,
        "cal": None,
        "would": None,
    }
    cal = ctx.metrics.get("calibration")
    if cal:
        data["cal"] = {
            "t": cal["temperature"],
            "splits": [(s, cal[s]) for s in ("val", "test") if s in cal],
        }
    elif t == 1.0 and "val" in ctx.splits() and name == "test":
        # What calibration would do, without changing the model: T from val, scored on test.
        tv = fit_temperature(ctx.split_logits("val"), ctx.splits()["val"].labels)
        before = expected_calibration_error(raw, y)
        after = expected_calibration_error(ctx.probs(name, tv), y)
        data["would"] = {"t": tv, "before": before, "after": after, "lowers": after < before}
    return data
