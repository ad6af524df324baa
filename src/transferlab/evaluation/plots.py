"""Figures that show *why* a model scores what it scores: curves, confusion, calibration, ladders.

Every function returns a matplotlib ``Figure`` and, given ``out``, also writes it as a PNG.
Figures are built on ``Figure`` + an explicit Agg canvas rather than pyplot: nothing needs a
display, the global backend other code may rely on is never touched, and no figure stays
registered with pyplot (a report draws a dozen; pyplot would keep them all alive).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import expected_calibration_error, reliability_curve
from transferlab.figures import figure_bytes, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "figure_bytes",
    "new_figure",
    "plot_class_counts",
    "plot_compare",
    "plot_confusion",
    "plot_learning_curves",
    "plot_reliability",
    "save_figure",
]

_TRAIN, _VAL, _AFTER = "#1f77b4", "#ff7f0e", "#2ca02c"


def _finish(fig: Figure, out: str | os.PathLike[str] | None) -> Figure:
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out)
    return fig


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    # None (no validation data) becomes nan so matplotlib leaves a gap instead of failing.
    return [math.nan if r.get(key) is None else float(r[key]) for r in rows]


# --------------------------------------------------------------------------------------------
# learning curves


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """Two panels, accuracy | loss, train vs val.

    ``history`` rows are per epoch (``epoch``, ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc``) or, for a linear head, per L2 strength of its grid search (``l2`` instead of
    ``epoch``; the x axis is then log-scaled L2 and the selected strength is marked). Rows
    with a ``stage`` get a dotted line where the stage changes.
    """
    if not history:
        raise TransferlabError("no training history to plot")
    rows = list(history)
    grid = "epoch" not in rows[0] and "l2" in rows[0]
    if grid:
        rows = sorted(rows, key=lambda r: float(r["l2"]))
        x = [float(r["l2"]) for r in rows]
        xlabel = "L2 strength (linear head grid)"
    else:
        x = [float(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
        xlabel = "epoch"
    fig = new_figure((9.0, 3.6))
    ax_acc, ax_loss = fig.subplots(1, 2)
    marker = "o" if len(x) <= 30 else None
    for ax, metric, label in ((ax_acc, "acc", "accuracy"), (ax_loss, "loss", "loss")):
        for split, colour in (("train", _TRAIN), ("val", _VAL)):
            y = _values(rows, f"{split}_{metric}")
            if not all(math.isnan(v) for v in y):
                ax.plot(x, y, marker=marker, ms=3, color=colour, label=split)
        if grid:
            ax.set_xscale("log")
            for xi, r in zip(x, rows, strict=True):
                if r.get("selected"):
                    ax.axvline(xi, color="grey", ls="--", lw=1, label="selected")
        else:
            # staged training (e.g. finetune --gradual): mark where each new stage starts
            for k in range(1, len(rows)):
                stage = rows[k].get("stage")
                if stage is not None and stage != rows[k - 1].get("stage"):
                    ax.axvline(x[k] - 0.5, color="grey", ls=":", lw=1)
                    ax.annotate(
                        str(stage),
                        (x[k] - 0.5, 1),
                        xycoords=("data", "axes fraction"),
                        xytext=(2, -10),
                        textcoords="offset points",
                        fontsize=7,
                        color="grey",
                    )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_title(f"{label}: train vs val", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, out)


# --------------------------------------------------------------------------------------------
# confusion matrix


def plot_confusion(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    *,
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """Counts | row-normalised (recall per true class) side by side; rows are true classes."""
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(classes)
    if cm.shape != (c, c):
        raise TransferlabError(f"confusion matrix is {cm.shape} for {c} classes")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = min(14.0, 2.2 + 0.45 * c)  # room for class names without squeezing 2x2 matrices
    fig = new_figure((2 * side + 1.0, side))
    annotate = c <= 20  # beyond that the numbers are unreadable; colours still tell the story
    for ax, data, label in zip(
        fig.subplots(1, 2), (cm, norm), ("counts", "row-normalised"), strict=True
    ):
        vmax = 1.0 if data is norm else max(1, int(cm.max()))
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(
            range(c),
            [str(n) for n in classes],
            rotation=45 if c > 3 else 0,
            ha="right" if c > 3 else "center",
            fontsize=8,
        )
        ax.set_yticks(range(c), [str(n) for n in classes], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=10)
        if annotate:
            for i in range(c):
                for j in range(c):
                    v = data[i, j]
                    text = f"{v:.2f}" if data is norm else str(int(v))
                    dark = v > 0.6 * vmax
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, out)


# --------------------------------------------------------------------------------------------
# calibration


def plot_reliability(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    calibrated: np.ndarray | None = None,
    temperature: float | None = None,
    n_bins: int = 15,
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """Reliability diagram (accuracy vs confidence per bin) with the ECE in the legend; marker
    areas grow with the number of items in the bin.

    With ``calibrated`` (the same items' probabilities after temperature scaling) both curves
    are drawn, so the effect of the temperature is visible. A lower panel shows how many items
    fall in each confidence bin: a bin of three items says little, whatever its gap.
    """
    fig = new_figure((5.2, 5.6))
    ax, ax_n = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    width = 1.0 / n_bins
    curves = [("before" if calibrated is not None else "model", probs, _VAL)]
    if calibrated is not None:
        t = f" (T = {temperature:.2f})" if temperature is not None else ""
        curves.append((f"after{t}", calibrated, _AFTER))
    for i, (name, p, colour) in enumerate(curves):
        curve = reliability_curve(p, y_true, n_bins)
        ece = expected_calibration_error(p, y_true, n_bins)
        centres = np.array(curve["bin_edges"][:-1]) + width / 2
        keep = [k for k, m in enumerate(curve["bin_count"]) if m]
        conf = [curve["bin_confidence"][k] for k in keep]
        acc = [curve["bin_accuracy"][k] for k in keep]
        ax.plot(
            conf,
            acc,
            marker="o",
            ms=3,
            lw=1,
            alpha=0.6,
            color=colour,
            label=f"{name}: ECE {ece:.3f}",
        )
        # marker area ~ items in the bin: a bin of 2 images swinging to 0 or 1 is visibly small
        counts = np.array([curve["bin_count"][k] for k in keep], dtype=float)
        ax.scatter(conf, acc, s=12 + 240 * counts / counts.max(), color=colour, alpha=0.5, lw=0)
        offset = (i - (len(curves) - 1) / 2) * width / len(curves)
        ax_n.bar(centres + offset, curve["bin_count"], width=width / len(curves), color=colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title or "reliability diagram", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("items")
    ax_n.set_yscale("symlog")
    return _finish(fig, out)


# --------------------------------------------------------------------------------------------
# comparing models / ladder rungs


def plot_compare(
    rows: Sequence[Mapping[str, Any]],
    *,
    splits: Sequence[str] = ("val", "test"),
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """Accuracy with 95% CI error bars per model (ladder rung), one marker series per split.

    ``rows``: ``{"name": ..., "val": {"accuracy", "accuracy_ci95"}, "test": {...}}`` (either
    split may be missing). Horizontal, so long rung names stay readable.
    """
    if not rows:
        raise TransferlabError("nothing to compare")
    names = [str(r["name"]) for r in rows]
    n = len(names)
    fig = new_figure((8.0, 1.2 + 0.45 * n))
    ax = fig.subplots()
    present = [s for s in splits if any(isinstance(r.get(s), Mapping) for r in rows)]
    for k, (split, colour) in enumerate(zip(present, (_VAL, _TRAIN, _AFTER), strict=False)):
        ys, xs, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            m = r.get(split)
            if not isinstance(m, Mapping) or m.get("accuracy") is None:
                continue
            acc = float(m["accuracy"])
            ci = m.get("accuracy_ci95") or [acc, acc]
            ys.append(i + (k - (len(present) - 1) / 2) * 0.22)
            xs.append(acc)
            lo.append(max(0.0, acc - float(ci[0])))
            hi.append(max(0.0, float(ci[1]) - acc))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, color=colour, label=split)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{x:.3f}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.invert_yaxis()  # first rung on top, like the table below it
    ax.set_xlabel("accuracy (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "accuracy per model", fontsize=10)
    return _finish(fig, out)


# --------------------------------------------------------------------------------------------
# data


def plot_class_counts(
    counts: Mapping[str, Mapping[str, int]],
    *,
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """Grouped bars: images per class, one bar per split (imbalance is visible at a glance)."""
    splits = [s for s in counts if counts[s]]
    if not splits:
        raise TransferlabError("no class counts to plot")
    classes = sorted({c for s in splits for c in counts[s]})
    x = np.arange(len(classes))
    width = 0.8 / len(splits)
    fig = new_figure((min(12.0, 3.0 + 0.6 * len(classes) * len(splits) / 2), 3.2))
    ax = fig.subplots()
    for k, split in enumerate(splits):
        vals = [int(counts[split].get(c, 0)) for c in classes]
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, vals, width, label=split)
        if len(classes) * len(splits) <= 30:
            ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 4 else 0, fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title(title or "images per class and split", fontsize=10)
    return _finish(fig, out)
