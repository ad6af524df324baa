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
    so it is deterministic.
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

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transferlab.config import HEAD_NAMES
from transferlab.errors import TransferlabError

__all__ = [
    "DEFAULT_L2",
    "HEADS",
    "L2_GRID",
    "FittedHead",
    "Head",
    "Standardize",
    "build_head",
    "fit_head",
    "train_epochs",
]

HEADS = HEAD_NAMES

# Half-decade steps; the ends are far enough apart that the best value is practically never on
# the boundary for pooled CNN/ViT features with 1e2..1e5 training images.
L2_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, 1, 13))
# Used when there is no validation split: for n in the hundreds this is sklearn's C ~ 1, a
# sensible middle of the grid.
DEFAULT_L2: float = 1e-3

# Features whose training std is below this are (near-)constant; dividing by it would blow up
# noise, so they are only centred (std stored as 1).
_STD_FLOOR = 1e-6
# Validation losses closer than this are a tie (see module docstring).
_TIE_TOL = 1e-6

# Intra-op threads used while fitting (None: leave torch's setting alone, the default). A
# library should not flip the process-wide OpenMP team size behind the caller's back: two
# native crashes (SIGSEGV) were seen in long processes that did so between other torch work,
# so the one-thread option (faster only on an oversubscribed machine) is opt-in.
_NUM_THREADS_DEFAULT = None

_LINEAR_DEFAULTS: dict[str, Any] = {
    "l2": None,  # a fixed strength: skips the grid search
    "l2_grid": L2_GRID,
    "max_iter": 500,  # L-BFGS iterations per grid value
    # L-BFGS stops when the max-abs gradient is below this (or the loss stops changing). In
    # float32, 1e-8 costs ~1.5x the iterations of 1e-6 and moves no val loss in the 3rd decimal.
    "tol": 1e-6,
    "num_threads": _NUM_THREADS_DEFAULT,
}
_MLP_DEFAULTS: dict[str, Any] = {
    "hidden": (512, 512),
    "dropout": 0.3,
    "lr": 1e-3,
    "weight_decay": 1e-2,  # AdamW's own default
    "batch_size": 32,
    "max_epochs": 100,
    "patience": 10,
    "min_delta": 0.0,
    "num_threads": _NUM_THREADS_DEFAULT,
}
_CLASS_WEIGHTS = (None, "auto", "balanced")


@dataclass
class FittedHead:
    """A trained head: the module (eval mode, CPU, float32), how to rebuild it, and its history."""

    module: nn.Module
    spec: dict
    history: list[dict] = field(default_factory=list)

    def predict_logits(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Logits for float features ``(n, d)``, as float32 numpy (a convenience for callers)."""
        x = np.asarray(x, dtype=np.float32)
        self.module.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                out.append(self.module(torch.from_numpy(x[start : start + batch_size])).numpy())
        if not out:
            return np.zeros((0, int(self.spec["num_classes"])), dtype=np.float32)
        return np.concatenate(out)


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training statistics kept as buffers (saved in state_dict)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Head(nn.Module):
    """``net(standardize(x))``; the same two attribute names for every kind."""

    def __init__(self, in_features: int, net: nn.Module) -> None:
        super().__init__()
        self.standardize = Standardize(in_features)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def _mlp_net(
    in_features: int, hidden: Sequence[int], dropout: float, num_classes: int
) -> nn.Module:
    layers: list[nn.Module] = []
    prev = in_features
    for width in hidden:
        layers += [nn.Linear(prev, int(width)), nn.ReLU(), nn.Dropout(float(dropout))]
        prev = int(width)
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def build_head(spec: dict) -> nn.Module:
    """An untrained module of the shape ``spec`` describes (load a state_dict into it)."""
    kind = spec.get("kind")
    if kind not in HEADS:
        raise TransferlabError(f"head spec has kind {kind!r}; expected one of {', '.join(HEADS)}")
    try:
        d = int(spec["in_features"])
        c = int(spec["num_classes"])
        if kind == "linear":
            net: nn.Module = nn.Linear(d, c)
        else:
            net = _mlp_net(d, spec["hidden"], spec["dropout"], c)
    except KeyError as e:
        raise TransferlabError(f"head spec is missing {e.args[0]!r} (kind {kind!r})") from None
    head = Head(d, net)
    head.eval()
    return head


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
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
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


def _resolve_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    defaults = _LINEAR_DEFAULTS if kind == "linear" else _MLP_DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TransferlabError(
            f"unknown option(s) {unknown} for the {kind!r} head; valid: {', '.join(defaults)}"
        )
    return {**defaults, **options}


def _class_weights(y: np.ndarray, num_classes: int, class_weight: str | None) -> np.ndarray | None:
    if class_weight not in _CLASS_WEIGHTS:
        raise TransferlabError(
            f"class_weight must be None or 'auto' ('balanced' is an alias); got {class_weight!r}"
        )
    if class_weight is None:
        return None
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    # sklearn's "balanced": n / (C * count_c); the weights of all n samples then sum to n, so the
    # weighted mean loss stays on the same scale as the unweighted one.
    return len(y) / (num_classes * counts)


def _standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)  # population std, as sklearn's StandardScaler
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean, std


# --------------------------------------------------------------------------------------------
# fitting


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
    """Train a ``kind`` head (one of :data:`HEADS`) on features; see the module docstring.

    Options, ``"linear"``: ``l2`` (fixed strength, skips the search), ``l2_grid``, ``max_iter``,
    ``tol``. ``"mlp"``: ``hidden``, ``dropout``, ``lr``, ``weight_decay``, ``batch_size``,
    ``max_epochs``, ``patience``, ``min_delta``. Both: ``num_threads`` (default 1, torch intra-op
    threads while fitting, restored afterwards; None leaves torch's setting alone).
    """
    if kind not in HEADS:
        raise TransferlabError(f"unknown head kind {kind!r}; choose one of: {', '.join(HEADS)}")
    num_classes = int(num_classes)
    x_train, y_train, x_val, y_val = _check_inputs(x_train, y_train, x_val, y_val, num_classes)
    opts = _resolve_options(kind, options)
    weights = _class_weights(y_train, num_classes, class_weight)
    mean, std = _standardization(x_train)
    spec: dict[str, Any] = {
        "kind": kind,
        "in_features": int(x_train.shape[1]),
        "num_classes": num_classes,
        "standardize": True,  # mean/std are the buffers standardize.mean / standardize.std
        "class_weight": None if class_weight is None else "auto",
        "class_weights": None if weights is None else [float(w) for w in weights],
        "seed": int(seed),
        "n_train": len(x_train),
        "n_val": 0 if x_val is None else len(x_val),
    }
    with _torch_threads(opts["num_threads"]):
        if kind == "linear":
            module, history = _fit_linear(
                x_train, y_train, x_val, y_val, mean, std, weights, opts, spec
            )
        else:
            module, history = _fit_mlp(
                x_train, y_train, x_val, y_val, mean, std, weights, opts, spec, seed
            )
    module.standardize.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    module.standardize.std.copy_(torch.from_numpy(std.astype(np.float32)))
    module.eval()
    return FittedHead(module=module, spec=spec, history=history)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide; restored on exit)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _weighted_ce(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """sum_i w[y_i] * CE_i / n (not / sum of weights: see _class_weights)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    if weights is not None:
        ce = ce * weights[y]
    return ce.mean()


def _fit_linear(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    mean: np.ndarray,
    std: np.ndarray,
    weights: np.ndarray | None,
    opts: dict[str, Any],
    spec: dict[str, Any],
) -> tuple[Head, list[dict]]:
    d, c = x_train.shape[1], spec["num_classes"]
    # float32: 4x faster per L-BFGS step than float64 on CPU (measured: 5000x1280x20 classes,
    # 31 s -> 7 s for the grid) and its optimum matches float64 / sklearn to ~2e-4 in
    # probability, far below what changes a prediction.
    xt = torch.from_numpy(((x_train.astype(np.float64) - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y_train)
    wt = None if weights is None else torch.from_numpy(weights.astype(np.float32))
    xv = yv = None
    if x_val is not None:
        xv = torch.from_numpy(((x_val.astype(np.float64) - mean) / std).astype(np.float32))
        yv = torch.from_numpy(y_val)

    if opts["l2"] is not None:
        grid = [float(opts["l2"])]
    elif xv is None:
        grid = [DEFAULT_L2]
    else:
        # strongest first, so each warm start comes from a smoother, nearby solution
        grid = sorted((float(v) for v in opts["l2_grid"]), reverse=True)
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid):
        raise TransferlabError(f"L2 strengths must be positive numbers; got {list(grid)}")

    w = torch.zeros(c, d, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    history: list[dict] = []
    solutions: list[tuple[torch.Tensor, torch.Tensor]] = []
    for l2 in grid:
        n_iter = _lbfgs(w, b, xt, yt, wt, l2, int(opts["max_iter"]), float(opts["tol"]))
        with torch.no_grad():
            logits = xt @ w.T + b
            row = {
                "l2": l2,
                "C": 1.0 / (l2 * len(xt)),  # the equivalent sklearn C, for reference
                "iterations": n_iter,
                "converged": n_iter < int(opts["max_iter"]),
                "train_loss": float(_weighted_ce(logits, yt, wt)),
                "train_acc": int((logits.argmax(1) == yt).sum()) / len(yt),
                "val_loss": None,
                "val_acc": None,
            }
            if xv is not None:
                vlogits = xv @ w.T + b
                row["val_loss"] = float(_weighted_ce(vlogits, yv, wt))
                row["val_acc"] = int((vlogits.argmax(1) == yv).sum()) / len(yv)
        history.append(row)
        solutions.append((w.detach().clone(), b.detach().clone()))

    best = _select_l2(history)
    for i, row in enumerate(history):
        row["selected"] = i == best
    spec.update(
        l2=history[best]["l2"],
        l2_grid=[row["l2"] for row in history],
        l2_source="fixed" if opts["l2"] is not None else ("val" if xv is not None else "default"),
        max_iter=int(opts["max_iter"]),
        tol=float(opts["tol"]),
    )
    head = build_head(spec)
    with torch.no_grad():
        head.net.weight.copy_(solutions[best][0])
        head.net.bias.copy_(solutions[best][1])
    return head, history


def _lbfgs(
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    l2: float,
    max_iter: int,
    tol: float,
) -> int:
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _weighted_ce(x @ w.T + b, y, weights) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[w].get("n_iter", 0))


def _select_l2(history: list[dict]) -> int:
    """Index of the chosen grid row: best val loss; ties -> higher val acc -> stronger L2."""
    if len(history) == 1 or history[0]["val_loss"] is None:
        return 0
    best_loss = min(row["val_loss"] for row in history)
    tied = [i for i, row in enumerate(history) if row["val_loss"] <= best_loss + _TIE_TOL]
    return max(tied, key=lambda i: (history[i]["val_acc"], history[i]["l2"]))


def _fit_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    mean: np.ndarray,
    std: np.ndarray,
    weights: np.ndarray | None,
    opts: dict[str, Any],
    spec: dict[str, Any],
    seed: int,
) -> tuple[Head, list[dict]]:
    hidden = [int(h) for h in opts["hidden"]]
    dropout = float(opts["dropout"])
    batch_size, max_epochs, patience = (
        int(opts[k]) for k in ("batch_size", "max_epochs", "patience")
    )
    if any(h < 1 for h in hidden) or not 0.0 <= dropout < 1.0:
        raise TransferlabError(f"mlp needs hidden sizes >= 1 and 0 <= dropout < 1; got {opts}")
    if batch_size < 1 or max_epochs < 1 or patience < 1:
        raise TransferlabError("mlp batch_size, max_epochs and patience must be >= 1")
    spec.update(
        hidden=hidden,
        dropout=dropout,
        lr=float(opts["lr"]),
        weight_decay=float(opts["weight_decay"]),
        batch_size=batch_size,
        max_epochs=max_epochs,
        patience=patience,
        min_delta=float(opts["min_delta"]),
    )
    # Standardize once up front (same float32 arithmetic as the module's buffer path).
    xt = (torch.from_numpy(x_train) - torch.from_numpy(mean.astype(np.float32))) / torch.from_numpy(
        std.astype(np.float32)
    )
    yt = torch.from_numpy(y_train)
    wt = None if weights is None else torch.from_numpy(weights.astype(np.float32))
    xv = yv = None
    if x_val is not None:
        xv = (torch.from_numpy(x_val) - torch.from_numpy(mean.astype(np.float32))) / (
            torch.from_numpy(std.astype(np.float32))
        )
        yv = torch.from_numpy(y_val)

    # A private RNG stream: seeds init and dropout without disturbing the caller's global state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(spec)
        net = head.net
        opt = torch.optim.AdamW(net.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
        history, best_state, best_epoch = train_epochs(
            net,
            lambda: xt,
            yt,
            lambda logits, y: _weighted_ce(logits, y, wt),
            opt,
            batch_size=batch_size,
            max_epochs=max_epochs,
            generator=torch.Generator().manual_seed(seed),
            validate=None if xv is None else lambda: _evaluate(net, xv, yv, wt),
            patience=patience,
            min_delta=spec["min_delta"],
        )
    if best_state is not None:
        net.load_state_dict(best_state)
    spec.update(
        epochs_run=len(history),
        best_epoch=best_epoch or len(history),
        early_stopped=xv is not None and len(history) < max_epochs,
    )
    return head, history


def train_epochs(
    net: nn.Module,
    inputs: Callable[[], torch.Tensor],
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    *,
    batch_size: int,
    max_epochs: int,
    generator: torch.Generator,
    validate: Callable[[], tuple[float, float]] | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    snapshot: nn.Module | None = None,
    set_lr: Callable[[int], float] | None = None,
    timed: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None, int | None]:
    """Mini-batch training of a small network on in-memory features, early stopping on val loss.

    Every epoch ``inputs()`` gives its (n, d) rows (the same tensor, or one augmented view per
    image for the frozen strategy) and ``generator`` shuffles them. ``set_lr(step)`` runs before
    each step (a schedule) and returns the LR. ``validate()`` -> (val loss, val accuracy) after
    each epoch; an epoch whose val loss beats the best by more than ``min_delta`` snapshots
    ``snapshot`` (default ``net``), and ``patience`` epochs without one stop training. Returns
    (one history row per epoch, the best snapshot or None, its epoch or None); rows get the
    epoch's wall time as ``seconds`` when ``timed`` (off where histories must be reproducible).
    """
    snapshot = net if snapshot is None else snapshot
    history: list[dict[str, Any]] = []
    best_loss, best, best_epoch, bad, step = math.inf, None, None, 0, 0
    n = len(y)
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        net.train()
        x = inputs()
        perm = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if set_lr is not None:
                set_lr(step)
            logits = net(x[idx])
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            # running (dropout-on) statistics: free, and what every training log shows
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "val_loss": None,
            "val_acc": None,
            "lr": opt.param_groups[0]["lr"],
        }
        if validate is not None:
            row["val_loss"], row["val_acc"] = validate()
        if timed:
            row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if validate is None:
            continue
        if row["val_loss"] < best_loss - min_delta:
            best_loss, best_epoch, bad = row["val_loss"], epoch, 0
            best = {k: v.detach().clone() for k, v in snapshot.state_dict().items()}
        else:
            bad += 1
            if patience is not None and bad >= patience:
                break
    return history, best, best_epoch


def _evaluate(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> tuple[float, float]:
    net.eval()
    with torch.inference_mode():
        logits = net(x)
        return float(_weighted_ce(logits, y, weights)), int((logits.argmax(1) == y).sum()) / len(y)
