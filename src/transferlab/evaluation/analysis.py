"""Error analysis on a trained run: what it gets wrong, and which training labels to doubt.

* :func:`top_losses` / :func:`most_confused` / :func:`suspect_labels`: where to look first
  (:func:`stratified_sample` bounds the label-error search on large training sets);
* :func:`save_predictions` / :func:`load_predictions`: per-image results in ``predictions.csv``,
  so runs can be compared image by image (:mod:`transferlab.evaluation.compare`).

Scoring itself (logits, TTA, calibration) is :mod:`transferlab.evaluation.scoring`, the splits
:mod:`transferlab.evaluation.run_data`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.evaluation.scoring import split_features
from transferlab.heads import DEFAULT_L2, fit_head
from transferlab.model import softmax
from transferlab.runs import PREDICTIONS_FILE
from transferlab.storage import atomic_write_text, printable_path

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "load_predictions", "most_confused", "out_of_fold_probs", "save_predictions",
    "stratified_sample", "suspect_labels", "top_losses", "train_out_of_fold_probs",
]  # fmt: skip

_EPS = 1e-15  # probability floor for -log p (a confident miss costs ~34.5, not inf)


# --------------------------------------------------------------------------------------------
# a run's files, splits and predictions


def save_predictions(
    run_dir: str | os.PathLike[str],
    predictions: Mapping[str, tuple[Split, np.ndarray]],
    classes: Sequence[str],
) -> Path:
    """Write ``predictions.csv`` (split, path, label, predicted, one probability per class):
    per-image results, so runs can be compared image by image without re-running them."""
    path = Path(run_dir) / PREDICTIONS_FILE
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["split", "path", "label", "predicted", *(f"p_{c}" for c in classes)])
    for name, (split, probs) in predictions.items():
        pred = np.asarray(probs).argmax(axis=1)
        for p, y, k, row in zip(split.paths, split.labels, pred, probs, strict=True):
            # printable_path: a name that is not valid UTF-8 is written with \xNN escapes.
            cells = [name, printable_path(p), classes[int(y)], classes[int(k)]]
            w.writerow([*cells, *(f"{v:.6f}" for v in row)])
    atomic_write_text(path, fh.getvalue())
    return path


def load_predictions(run_dir: str | os.PathLike[str], split: str = "test") -> dict[str, Any] | None:
    """``{"paths", "labels", "predicted", "probs", "classes"}`` of one split from
    ``predictions.csv``, or None when the run has none for that split."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[:4] != ["split", "path", "label", "predicted"]:
            return None
        classes = [h[2:] for h in header[4:]]
        rows = [r for r in reader if r and r[0] == split]
    if not rows:
        return None
    return {
        "classes": classes,
        "paths": [r[1] for r in rows],
        "labels": [r[2] for r in rows],
        "predicted": [r[3] for r in rows],
        "probs": np.array([[float(v) for v in r[4:]] for r in rows], dtype=np.float64),
    }


# --------------------------------------------------------------------------------------------
# where the model is wrong


def top_losses(
    probs: np.ndarray,
    y_true: np.ndarray,
    paths: Sequence[str],
    k: int = 9,
    *,
    classes: Sequence[str] | None = None,
    only_wrong: bool = True,
) -> list[dict[str, Any]]:
    """The ``k`` items with the highest loss ``-log p(true class)``, worst first.

    With ``only_wrong`` (default) only misclassified items are listed, so the top entries are
    the *most confidently wrong* ones. Each entry: ``index``, ``path``, ``label``,
    ``predicted`` (names when ``classes`` is given, else indices), ``p_true``, ``p_pred``,
    ``loss``. Ties keep input order (stable sort).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or len(paths) != len(y):
        raise TransferlabError(
            f"top_losses needs (n, C) probs with n labels and n paths; got {probs.shape}, "
            f"{len(y)} labels, {len(paths)} paths"
        )
    idx = np.arange(len(y))
    p_true = probs[idx, y]
    pred = probs.argmax(axis=1)
    loss = -np.log(np.clip(p_true, _EPS, 1.0))
    candidates = idx[pred != y] if only_wrong else idx
    order = candidates[np.argsort(-loss[candidates], kind="stable")][: max(0, int(k))]

    def name(i: int) -> str | int:
        return classes[i] if classes is not None else int(i)

    return [
        {
            "index": int(i),
            "path": str(paths[i]),
            "label": name(int(y[i])),
            "predicted": name(int(pred[i])),
            "p_true": float(p_true[i]),
            "p_pred": float(probs[i, pred[i]]),
            "loss": float(loss[i]),
        }
        for i in order
    ]


def most_confused(
    confusion: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], k: int = 5
) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as ``(true, predicted, count)``, largest first
    (ties in row-major order); cells with no mistakes are left out."""
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(classes)
    if cm.shape != (c, c):
        raise TransferlabError(f"confusion matrix is {cm.shape} for {c} classes")
    cells = [(int(cm[i, j]), i, j) for i in range(c) for j in range(c) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda t: -t[0])  # stable: equal counts stay in row-major order
    return [(classes[i], classes[j], n) for n, i, j in cells[: max(0, int(k))]]


def out_of_fold_probs(
    features: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int | None = None,
    folds: int = 5,
    seed: int = 0,
    l2: float | None = None,
) -> np.ndarray:
    """Probabilities for every item from a linear head that never saw it (stratified k-fold).

    A head scored on its own training images is overconfident exactly where labels are wrong
    (it memorises them); predicting each fold with a head fitted on the others avoids that.
    ``l2`` fixes the strength (default :data:`transferlab.heads.DEFAULT_L2`) so each fold is one
    L-BFGS fit, not a grid search. The only member of a class cannot be held out (the heads
    would know no example of its class): it trains in every fold and its row is NaN, unjudged.
    """
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    c = int(num_classes if num_classes is not None else y.max() + 1)
    counts = np.bincount(y, minlength=c)
    out = np.full((len(y), c), np.nan)
    if not (counts >= 2).any():
        return out
    # no more folds than the rarest class has members, or some fold would lack that class
    folds = max(2, min(int(folds), int(counts[counts >= 2].min())))
    rng = np.random.default_rng(seed)
    fold_of = np.full(len(y), -1, dtype=np.int64)  # -1: never held out
    for cls in np.flatnonzero(counts >= 2):  # stratified: each class spread over the folds
        members = rng.permutation(np.flatnonzero(y == cls))
        fold_of[members] = np.arange(len(members)) % folds
    for f in range(folds):
        held = fold_of == f
        head = fit_head(
            "linear",
            x[~held],
            y[~held],
            None,
            None,
            num_classes=c,
            seed=seed,
            l2=float(l2 if l2 is not None else DEFAULT_L2),
        )
        out[held] = softmax(head.predict_logits(x[held]))
    return out


def stratified_sample(
    labels: np.ndarray, n: int, *, seed: int = 0, min_per_class: int = 5
) -> np.ndarray:
    """Sorted row indices of a seeded sample of about ``n`` rows, each class in proportion to
    its share of ``labels`` but with at least ``min_per_class`` rows (or all it has), so that a
    k-fold search on the sample still sees every class in every fold. All rows when there are
    no more than ``n``. The sample never exceeds ``n + min_per_class × classes`` rows."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) <= n:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picks = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        take = min(len(members), max(min_per_class, round(n * len(members) / len(y))))
        picks.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picks))


def train_out_of_fold_probs(
    classifier: Classifier, train: Split, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold probabilities on the training split, from the run's own features and L2."""
    feats = split_features(classifier, train)
    return out_of_fold_probs(
        feats,
        train.labels,
        num_classes=len(classifier.classes),
        folds=folds,
        seed=seed,
        l2=classifier.saved.head.get("l2"),
    )


def suspect_labels(
    probs: np.ndarray,
    y: np.ndarray,
    paths: Sequence[str],
    k: int = 10,
    *,
    classes: Sequence[str] | None = None,
    min_confidence: float = 0.5,
) -> list[dict[str, Any]]:
    """Training images the model confidently disagrees with: possible label errors.

    Pass *out-of-fold* probabilities (:func:`out_of_fold_probs`): in-sample ones understate
    the disagreement on exactly the mislabelled images. Listed: items whose predicted class
    differs from their label with probability >= ``min_confidence``, lowest probability of the
    given label first. Entries as in :func:`top_losses`.
    """
    probs = np.asarray(probs, dtype=np.float64)
    judged = np.isfinite(probs).all(axis=1)  # NaN rows: the only image of their class
    probs = np.where(judged[:, None], probs, 0.0)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    keep = judged & (pred != np.asarray(y)) & (conf >= min_confidence)
    rows = top_losses(probs, y, paths, k=len(y), classes=classes, only_wrong=True)
    return [r for r in rows if keep[r["index"]]][: max(0, int(k))]
