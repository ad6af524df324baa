"""Classification metrics computed with numpy only (no scikit-learn / scipy at runtime).

Conventions (chosen to match scikit-learn where it has an answer):

* Predictions are ``argmax(probs)``; ties go to the lowest class index (numpy's argmax).
* Zero division gives 0.0 (precision of a never-predicted class, recall of an absent class),
  silently.
* ``balanced_accuracy`` is the mean recall over classes that occur in ``y_true``;
  ``macro_precision`` / ``macro_recall`` / ``macro_f1`` average over classes that occur in
  ``y_true`` or in the predictions (scikit-learn's default label set).
* Top-k accuracy counts a hit when fewer than ``k`` classes have a strictly larger probability
  than the true class (ties are resolved in the true class's favour).
* Every returned number is a plain Python ``int``/``float`` (or ``None``), so reports go straight
  to ``json.dumps``; dict keys are strings for the same reason.

The statistics underneath (intervals, calibration, McNemar) live in
:mod:`transferlab.evaluation.stats` and are re-exported here, the import path callers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from transferlab.errors import TransferlabError
from transferlab.evaluation.stats import (
    balanced_accuracy_from_cm,
    bootstrap_interval,
    check_probs,
    confusion,
    expected_calibration_error,
    fit_temperature,
    mcnemar,
    per_class_from_cm,
    reliability_curve,
    wilson_interval,
)

__all__ = [
    "bootstrap_interval",
    "classification_report",
    "expected_calibration_error",
    "fit_temperature",
    "format_report_table",
    "mcnemar",
    "reliability_curve",
    "roc_auc_binary",
    "wilson_interval",
]

_LOG_EPS = 1e-15  # probability floor for log-loss, so a confident miss costs ~34.5, not inf


def roc_auc_binary(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half); None if a class is absent."""
    y_true = np.asarray(y_true).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # average ranks (1-based) of tied scores: a tie between a positive and a negative then
    # contributes exactly 1/2 to U
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    ci: str = "wilson",
    top_k: int = 5,
) -> dict:
    """Everything the CLI and the saved ``metrics.json`` report about one evaluation set.

    ``probs`` are softmax probabilities ``(n, C)``, ``classes`` the ``C`` names in index order,
    ``ci`` is ``"wilson"`` or ``"bootstrap"`` (percentile, 2000 resamples, seed 0) for the
    accuracy interval.

    Keys: ``n``, ``classes``, ``accuracy``, ``accuracy_ci95`` [lo, hi], ``ci_method``,
    ``balanced_accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``weighted_f1``,
    ``per_class`` {name: {precision, recall, f1, support}}, ``confusion_matrix`` (rows = true),
    ``confusion_matrix_normalized`` (rows sum to 1; all-zero for a class absent from y_true),
    ``log_loss``, ``top_k_accuracy`` {"k": acc} for k = 2..min(top_k, C-1) (empty when C = 2),
    ``roc_auc`` (two classes: class 1 is positive, scored by its probability; else None),
    ``ece`` (15 bins).
    """
    y_true, probs = check_probs(y_true, probs)
    n, c = probs.shape
    classes = [str(name) for name in classes]
    if len(classes) != c:
        raise TransferlabError(f"{len(classes)} class names for {c} probability columns")
    if ci not in ("wilson", "bootstrap"):
        raise TransferlabError(f"ci must be 'wilson' or 'bootstrap'; got {ci!r}")

    y_pred = probs.argmax(axis=1)
    cm = confusion(y_true, y_pred, c)
    k_correct = int(np.trace(cm))
    acc_ci = wilson_interval(k_correct, n) if ci == "wilson" else bootstrap_interval(y_true, y_pred)
    pc = per_class_from_cm(cm)
    return {
        "n": int(n),
        "classes": classes,
        "accuracy": float(k_correct / n),
        "accuracy_ci95": [float(acc_ci[0]), float(acc_ci[1])],
        "ci_method": ci,
        "balanced_accuracy": balanced_accuracy_from_cm(cm),
        "macro_precision": pc["macro_precision"],
        "macro_recall": pc["macro_recall"],
        "macro_f1": pc["macro_f1"],
        "weighted_f1": pc["weighted_f1"],
        "per_class": _per_class_rows(pc, classes),
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": _row_normalized(cm).tolist(),
        "log_loss": _log_loss(y_true, probs),
        "top_k_accuracy": _top_k_accuracy(y_true, probs, top_k),
        "roc_auc": roc_auc_binary(y_true == 1, probs[:, 1]) if c == 2 else None,
        "ece": expected_calibration_error(probs, y_true),
    }


def _per_class_rows(pc: dict[str, Any], classes: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "precision": float(pc["precision"][i]),
            "recall": float(pc["recall"][i]),
            "f1": float(pc["f1"][i]),
            "support": int(pc["support"][i]),
        }
        for i, name in enumerate(classes)
    }


def _row_normalized(cm: np.ndarray) -> np.ndarray:
    row_sums = cm.sum(axis=1, keepdims=True)
    # rows of absent classes stay all-zero rather than 0/0
    return np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0)


def _log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    p_true = np.clip(probs[np.arange(len(probs)), y_true], _LOG_EPS, 1.0)
    return float(-np.mean(np.log(p_true)))


def _top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, top_k: int) -> dict[str, float]:
    """{"k": accuracy} for k = 2..min(top_k, C-1); empty for two classes (top-2 is always 1)."""
    n, c = probs.shape
    top_k_acc: dict[str, float] = {}
    if c > 2:
        # number of classes strictly more probable than the truth = 0-based rank of the truth
        rank = (probs > probs[np.arange(n), y_true][:, None]).sum(axis=1)
        for k in range(2, min(int(top_k), c - 1) + 1):
            top_k_acc[str(k)] = float(np.mean(rank < k))
    return top_k_acc


def format_report_table(report: dict, classes: Sequence[str], title: str) -> Group:
    """A rich Table: one row per class (P/R/F1/support), macro average and accuracy rows; then
    one line with accuracy, its 95% CI and balanced accuracy (a line, not a caption: a caption
    is wrapped and padded to the table's width, which breaks it into space-padded pieces)."""
    table = Table()
    table.add_column("class", style="bold")
    for name in ("precision", "recall", "f1", "support"):
        table.add_column(name, justify="right")
    for name in classes:
        row = report["per_class"][str(name)]
        table.add_row(
            str(name),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    table.add_section()
    n = report["n"]
    if "macro_precision" in report:
        table.add_row(
            "macro avg",
            f"{report['macro_precision']:.3f}",
            f"{report['macro_recall']:.3f}",
            f"{report['macro_f1']:.3f}",
            str(n),
        )
    table.add_row("accuracy", "", "", f"{report['accuracy']:.3f}", str(n))
    lo, hi = report["accuracy_ci95"]
    line = (
        f"accuracy {report['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}, "
        f"{report.get('ci_method', 'wilson')}) | balanced accuracy "
        f"{report['balanced_accuracy']:.1%} | n = {n}"
    )
    return Group(Text(title, style="bold"), table, Text(line))  # a title line, unpadded
