"""Stratified k-fold linear-probe accuracy: the head ``fit`` would train, scored out of fold.

The head is ``transferlab.heads.fit_head("linear", …)``, the one the ``features`` strategy
trains. Its L2 strength is chosen once, as ``fit`` chooses it (the grid, lowest validation
log loss), training on folds 2…k−1 and validating on fold 1; then each fold is held out in
turn and scored by a head trained on all the others at that strength. One grid search plus k
single fits, instead of a grid per fold: on 2 cores the grid is what costs. Fold 0 never takes
part in the choice; fold 1's rows did (one value picked out of 13: a slight optimism, the same
procedure for every candidate). Accuracy is pooled over every
out-of-fold prediction, and its 95% interval is the Wilson interval of that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from transferlab.errors import TransferlabError
from transferlab.evaluation.stats import wilson_interval
from transferlab.heads import fit_head

__all__ = ["ProbeResult", "check_folds", "cv_linear_probe", "stratified_folds"]


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    ci95: tuple[float, float]
    folds: int
    n: int
    fold_accuracies: tuple[float, ...]
    l2: float  # the strength every fold's head was trained with


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number in ``0..k-1`` per row; every class is spread evenly over the folds."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        # Each class continues where the previous one stopped, so fold sizes differ by ≤ 1.
        folds[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)
    return folds


def check_folds(
    labels: np.ndarray, folds: int, num_classes: int, classes: Sequence[str] | None = None
) -> None:
    """Every class needs a row in each fold (so each training part holds every class)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 3:
        raise TransferlabError(f"--folds {folds!r}: give at least 3 (train, select L2, score)")
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    rarest = int(counts.argmin())
    smallest = int(counts[rarest])
    if smallest >= folds:
        return
    name = repr(classes[rarest]) if classes is not None else f"#{rarest}"
    way_out = (
        f"lower --folds to {smallest} or add images to it"
        if smallest >= 3
        else "the probe needs at least 3 per class (one in each of 3 folds): add images to it"
    )
    raise TransferlabError(
        f"class {name} has {smallest} train+val image(s), fewer than --folds {folds}; {way_out}"
    )


def cv_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    folds: int = 5,
    seed: int = 42,
    class_weight: str | None = None,
) -> ProbeResult:
    """Out-of-fold accuracy of the linear head over ``folds`` stratified folds (see module)."""
    y = np.asarray(labels).astype(np.int64)
    check_folds(y, folds, num_classes)
    fold_of = stratified_folds(y, folds, seed)
    common = {"num_classes": num_classes, "class_weight": class_weight, "seed": seed}
    sel_train, sel_val = fold_of >= 2, fold_of == 1
    chosen = fit_head("linear", features[sel_train], y[sel_train], features[sel_val],
                      y[sel_val], **common)  # fmt: skip
    l2 = float(chosen.spec["l2"])
    correct = np.zeros(len(y), dtype=bool)
    per_fold = []
    for i in range(folds):
        test = fold_of == i
        head = fit_head("linear", features[~test], y[~test], None, None, l2=l2, **common)
        correct[test] = head.predict_logits(features[test]).argmax(axis=1) == y[test]
        per_fold.append(float(correct[test].mean()))
    k = int(correct.sum())
    return ProbeResult(k / len(y), wilson_interval(k, len(y)), folds, len(y), tuple(per_fold), l2)
