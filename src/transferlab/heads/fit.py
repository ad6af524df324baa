"""``fit_head``: check the features and labels, standardize, then fit a linear or an MLP head.

Memory: the features are only read, a chunk of rows at a time, so they may be a read-only
``np.memmap`` larger than RAM; nothing here makes a float64 or a second copy of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from transferlab.errors import TransferlabError
from transferlab.heads.base import HEADS, FittedHead, Problem, torch_threads
from transferlab.heads.linear import LINEAR_DEFAULTS, fit_linear, use_minibatch
from transferlab.heads.minibatch import fit_minibatch
from transferlab.heads.mlp import MLP_DEFAULTS, fit_mlp
from transferlab.training import class_weights

# Features whose training std is below this are (near-)constant; dividing by it would blow up
# noise, so they are only centred (std stored as 1).
_STD_FLOOR = 1e-6
# Values per chunk of the statistics and checks: one 8 MB float64 temporary, whatever n is.
_CHUNK_VALUES = 1 << 20


def fit_head(
    kind: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    num_classes: int,
    class_weight: str | None = None,
    seed: int = 42,
    **options: Any,
) -> FittedHead:
    """Train a ``kind`` head (one of :data:`HEADS`) on features; see the package docstring.

    Options, ``"linear"``: ``l2`` (fixed strength, skips the search), ``l2_grid``, ``max_iter``,
    ``tol``. ``"mlp"``: ``hidden``, ``dropout``, ``lr``, ``weight_decay``, ``batch_size``,
    ``max_epochs``, ``patience``, ``min_delta``. Both: ``num_threads`` (default 1, torch intra-op
    threads while fitting, restored afterwards; None leaves torch's setting alone: see
    ``heads.base.NUM_THREADS_DEFAULT`` for why one).

    ``x_train``/``x_val`` may be read-only memmaps; the linear head switches from exact L-BFGS
    to mini-batches when the training matrix is large (option ``solver``).
    """
    if kind not in HEADS:
        raise TransferlabError(f"unknown head kind {kind!r}; choose one of: {', '.join(HEADS)}")
    num_classes = int(num_classes)
    x_train, y_train, x_val, y_val = _check_inputs(x_train, y_train, x_val, y_val, num_classes)
    opts = _resolve_options(kind, options)
    weights = class_weights(y_train, num_classes, class_weight)
    mean, std = _standardization(x_train)
    spec: dict[str, Any] = {
        "kind": kind,
        "in_features": int(x_train.shape[1]),
        "num_classes": num_classes,
        "standardize": True,  # mean/std are the buffers standardize.mean / standardize.std
        "class_weight": None if weights is None else "auto",
        "class_weights": None if weights is None else [float(w) for w in weights],
        "seed": int(seed),
        "n_train": len(x_train),
        "n_val": 0 if x_val is None else len(x_val),
    }
    problem = Problem(x_train, y_train, x_val, y_val, mean, std, weights)
    with torch_threads(opts["num_threads"]):
        if kind == "linear" and use_minibatch(problem, opts):
            module, history = fit_minibatch(problem, opts, spec, seed)
        elif kind == "linear":
            module, history = fit_linear(problem, opts, spec)
        else:
            module, history = fit_mlp(problem, opts, spec, seed)
    module.standardize.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    module.standardize.std.copy_(torch.from_numpy(std.astype(np.float32)))
    module.eval()
    return FittedHead(module=module, spec=spec, history=history)


def _resolve_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    defaults = LINEAR_DEFAULTS if kind == "linear" else MLP_DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TransferlabError(
            f"unknown option(s) {unknown} for the {kind!r} head; valid: {', '.join(defaults)}"
        )
    return {**defaults, **options}


def chunks(n: int, d: int) -> Iterator[slice]:
    """Row slices that bound a float64 temporary of ``d`` columns to 8 MB."""
    step = max(1, _CHUNK_VALUES // max(1, d))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = moments(x)
    return mean, np.where(std < _STD_FLOOR, 1.0, std)


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population std (as sklearn's StandardScaler) of ``(n, d)`` rows, in
    float64, in two passes over row chunks (the two-pass form keeps the precision of
    ``x.std()``; no float64 copy of ``x``)."""
    n, d = x.shape
    total = np.zeros(d)
    for rows in chunks(n, d):
        total += x[rows].sum(axis=0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(d)
    for rows in chunks(n, d):
        diff = x[rows] - mean
        squares += np.square(diff, out=diff).sum(axis=0)
    return mean, np.sqrt(squares / n)


# --------------------------------------------------------------------------------------------
# input checking


def _check_labels(y: np.ndarray, n: int, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise TransferlabError(
            f"{name} must be a 1-D array with one label per feature row ({n}); got shape {y.shape}"
        )
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TransferlabError(f"{name} must hold integer class indices; got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise TransferlabError(
            f"{name} holds labels outside 0..{num_classes - 1} "
            f"(min {y.min()}, max {y.max()}); check num_classes"
        )
    return y.astype(np.int64)


def _check_features(x: np.ndarray, name: str, d: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise TransferlabError(f"{name} must be a 2-D (n, d) feature array; got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise TransferlabError(
            f"{name} has {x.shape[1]} features per row but the training features have {d}"
        )
    x = x.astype(np.float32, copy=False)  # float32 input (a memmap too) is used as it is
    if not all(np.isfinite(x[rows]).all() for rows in chunks(*x.shape)):
        raise TransferlabError(f"{name} contains NaN or infinite values")
    return x


def _check_inputs(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    if int(num_classes) < 2:
        raise TransferlabError(f"num_classes must be at least 2; got {num_classes}")
    x_train = _check_features(x_train, "x_train")
    if len(x_train) == 0:
        raise TransferlabError("x_train is empty")
    y_train = _check_labels(y_train, len(x_train), num_classes, "y_train")
    counts = np.bincount(y_train, minlength=num_classes)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0).tolist()
        raise TransferlabError(
            f"class index(es) {missing} have no training examples; every class needs at least one "
            "training image (add images or drop the class)"
        )
    if (x_val is None) != (y_val is None):
        raise TransferlabError("give both x_val and y_val, or neither")
    if x_val is not None:
        x_val = _check_features(x_val, "x_val", d=x_train.shape[1])
        y_val = _check_labels(y_val, len(x_val), num_classes, "y_val")
        if len(x_val) == 0:
            x_val = y_val = None  # an empty split is the same as none
    return x_train, y_train, x_val, y_val
