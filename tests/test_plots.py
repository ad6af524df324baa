"""Figures of transferlab.evaluation.plots: the data drawn is the data given, PNGs are written,
and nothing is left behind in pyplot's global state."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
from matplotlib import _pylab_helpers
from PIL import Image

from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import expected_calibration_error
from transferlab.evaluation.plots import (
    figure_bytes,
    plot_class_counts,
    plot_compare,
    plot_confusion,
    plot_learning_curves,
    plot_reliability,
)

EPOCHS = [
    {
        "epoch": e,
        "train_loss": 1 / e,
        "train_acc": 1 - 0.5 / e,
        "val_loss": 1.2 / e,
        "val_acc": 0.9 - 0.4 / e,
    }
    for e in range(1, 6)
]


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_learning_curves_two_panels_train_vs_val(tmp_path):
    out = tmp_path / "sub" / "curves.png"
    fig = plot_learning_curves(EPOCHS, out=out)
    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_ylabel() == "accuracy" and ax_loss.get_ylabel() == "loss"
    np.testing.assert_allclose(_line(ax_acc, "train").get_ydata(), [r["train_acc"] for r in EPOCHS])
    np.testing.assert_allclose(_line(ax_loss, "val").get_ydata(), [r["val_loss"] for r in EPOCHS])
    np.testing.assert_allclose(_line(ax_loss, "val").get_xdata(), [1, 2, 3, 4, 5])
    with Image.open(out) as im:  # written at the figure's size: 9 x 3.6 in at 100 dpi
        assert im.format == "PNG" and im.size == (900, 360)
    # No pyplot figure manager was created (reports draw many figures; none may leak).
    assert _pylab_helpers.Gcf.get_num_fig_managers() == 0
    assert matplotlib.get_backend()  # untouched, still resolvable


def test_learning_curves_of_a_linear_head_grid_are_per_l2_on_a_log_axis():
    grid = [
        {
            "l2": l2,
            "train_loss": 0.1 * i,
            "train_acc": 1 - 0.01 * i,
            "val_loss": 0.3 - 0.01 * i,
            "val_acc": 0.8,
            "selected": i == 2,
        }
        for i, l2 in enumerate([10.0, 1.0, 0.1, 0.01])
    ]
    fig = plot_learning_curves(grid)
    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_xscale() == "log"
    assert "L2" in ax_acc.get_xlabel()
    val = _line(ax_loss, "val")
    np.testing.assert_allclose(val.get_xdata(), [0.01, 0.1, 1.0, 10.0])  # sorted by L2
    np.testing.assert_allclose(val.get_ydata(), [0.27, 0.28, 0.29, 0.30])
    selected = _line(ax_loss, "selected")
    assert list(selected.get_xdata()) == [0.1, 0.1]


def test_learning_curves_without_validation_draw_train_only():
    rows = [dict(r, val_loss=None, val_acc=None) for r in EPOCHS]
    fig = plot_learning_curves(rows)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train"]
    with pytest.raises(TransferlabError):
        plot_learning_curves([])


def test_confusion_counts_and_row_normalised():
    cm = [[6, 2, 0], [1, 3, 0], [0, 0, 0]]  # class c absent: its normalised row stays 0
    fig = plot_confusion(cm, ["a", "b", "c"])
    counts_ax, norm_ax = [ax for ax in fig.axes if ax.images]  # the others are colorbars
    np.testing.assert_array_equal(counts_ax.images[0].get_array(), cm)
    np.testing.assert_allclose(
        norm_ax.images[0].get_array(), [[0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0, 0]]
    )
    assert {t.get_text() for t in norm_ax.texts} >= {"0.75", "0.25", "0.00"}
    assert {t.get_text() for t in counts_ax.texts} >= {"6", "2", "3"}
    assert [t.get_text() for t in counts_ax.get_yticklabels()] == ["a", "b", "c"]
    with pytest.raises(TransferlabError, match="3 classes"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"])


def test_reliability_diagram_shows_the_ece_before_and_after():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    conf = rng.uniform(0.55, 1.0, n)
    right = rng.random(n) < conf - 0.15  # overconfident by ~0.15
    pred = np.where(right, y, 1 - y)
    probs = np.zeros((n, 2))
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), 1 - pred] = 1 - conf
    softer = probs * 0.8 + 0.1
    fig = plot_reliability(probs, y, calibrated=softer, temperature=1.7)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    ece = expected_calibration_error(probs, y)
    assert f"before: ECE {ece:.3f}" in labels
    assert f"after (T = 1.70): ECE {expected_calibration_error(softer, y):.3f}" in labels
    assert ece > 0.08  # the constructed miscalibration is visible in the number drawn
    # points are (mean confidence, accuracy) of non-empty bins, all within [0, 1]
    xs = _line(ax, labels[1]).get_xdata()
    assert len(xs) > 3 and all(0.5 <= x <= 1 for x in xs)


def test_compare_chart_has_ci_error_bars(tmp_path):
    rows = [
        {
            "name": "features",
            "val": {"accuracy": 0.9, "accuracy_ci95": [0.85, 0.93]},
            "test": {"accuracy": 0.88, "accuracy_ci95": [0.82, 0.92]},
        },
        {"name": "finetune", "test": {"accuracy": 0.95, "accuracy_ci95": [0.91, 0.97]}},
    ]
    fig = plot_compare(rows, out=tmp_path / "c.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["features", "finetune"]
    # each errorbar container: (data line, caps, [LineCollection of the bars])
    spans = sorted(
        tuple(np.round(seg[:, 0], 6)) for c in ax.containers for seg in c.lines[2][0].get_segments()
    )
    assert spans == [(0.82, 0.92), (0.85, 0.93), (0.91, 0.97)]
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(TransferlabError):
        plot_compare([])


def test_class_count_bars_and_png_without_url_metadata():
    counts = {"train": {"cat": 350, "dog": 300}, "val": {"cat": 150, "dog": 150}, "test": {}}
    fig = plot_class_counts(counts)
    heights = sorted(int(p.get_height()) for p in fig.axes[0].patches)
    assert heights == [150, 150, 300, 350]  # the empty split draws nothing
    png = figure_bytes(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # matplotlib would stamp "matplotlib.org" into the PNG: reports must hold no URL at all
    assert b"http" not in png and b"matplotlib.org" not in png
    assert not math.isnan(heights[0])


def test_learning_curves_mark_where_a_new_training_stage_starts():
    rows = [dict(r, stage="head" if r["epoch"] <= 2 else "unfreeze-2") for r in EPOCHS]
    fig = plot_learning_curves(rows)
    ax = fig.axes[0]
    boundaries = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert boundaries == [2.5]  # between epoch 2 (last "head") and epoch 3
    assert "unfreeze-2" in [t.get_text() for t in ax.texts]
