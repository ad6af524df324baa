"""Classifier heads trained on frozen, pooled backbone features ("bottleneck" features).

Two kinds, both ``Standardize -> net -> logits`` (callers apply softmax):

``"linear"``
    Multinomial logistic regression (two logits even for two classes, so every head looks the
    same to callers). Objective, on standardized features::

        sum_i w[y_i] * CE(x_i, y_i) / n  +  l2 / 2 * ||W||_F^2      (the bias is not penalised)

    which is scikit-learn's ``LogisticRegression`` (multinomial, lbfgs) with ``C = 1 / (l2 * n)``.
    The L2 strength is chosen on the validation set from :data:`L2_GRID` (13 values, half-decade
    steps from 1e-5 to 1e1). The grid is walked from the strongest to the weakest value and each
    fit warm-starts from the previous solution (strongly regularised problems converge in a few
    steps and their solution is a good start for the next, weaker one). Every fit is full-batch
    L-BFGS with a strong-Wolfe line search (float32, from a zero start, on one thread by default),
    so it is deterministic. Past 256 MB of training features (~50k rows of 1280) the grid is
    instead trained by seeded mini-batch Adam, all strengths at once
    (:mod:`transferlab.heads.minibatch`, option ``solver``), in memory bounded by the batch.
    Selection: lowest validation log-loss (with the same class weighting as training); losses
    within ``1e-6`` count as a tie, broken by higher validation accuracy, then by the *stronger*
    L2 (the simpler model). The returned head is the one trained on the training set with that
    strength. Without validation data the strength is :data:`DEFAULT_L2`.

``"mlp"``
    The tutorial's head: ``Linear(d, 512) -> ReLU -> Dropout(0.3) -> Linear(512, 512) -> ReLU ->
    Dropout(0.3) -> Linear(512, C)``, AdamW (lr 1e-3, weight decay 1e-2), mini-batches of 32
    shuffled by a seeded generator, up to 100 epochs, early stopping on validation loss
    (patience 10) with the best weights restored. The seed also drives weight init and dropout,
    through a forked RNG so the caller's global torch RNG is untouched. Without validation data
    all ``max_epochs`` run and the last weights are kept. History: one row per epoch with
    ``train_loss``/``train_acc`` (running, dropout on) and ``val_loss``/``val_acc`` (eval mode).

``class_weight="auto"`` (alias ``"balanced"``) weights each sample's loss by
``n / (C * count_c)``; the validation losses used for selection / early stopping use the same
weights, so the criterion matches the training objective.

Standardization mean/std are computed on the training features and stored as module buffers, so
they travel in the ``state_dict``; ``spec`` (JSON-able) plus the ``state_dict`` rebuild the head.
"""

from __future__ import annotations

from transferlab.heads.base import (
    AVERAGE,
    HEADS,
    NUM_THREADS_DEFAULT,
    FittedHead,
    Head,
    Standardize,
    WeightedAverage,
    build_head,
    torch_threads,
)
from transferlab.heads.fit import fit_head, moments
from transferlab.heads.linear import DEFAULT_L2, L2_GRID
from transferlab.heads.mlp import train_epochs

__all__ = [
    "AVERAGE",
    "DEFAULT_L2",
    "HEADS",
    "L2_GRID",
    "NUM_THREADS_DEFAULT",
    "FittedHead",
    "Head",
    "Standardize",
    "WeightedAverage",
    "build_head",
    "fit_head",
    "moments",
    "torch_threads",
    "train_epochs",
]
