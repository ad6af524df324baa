"""The linear head: multinomial logistic regression, its L2 chosen on val.

Exact full-batch L-BFGS while the training matrix is small (it converges to the optimum, which
mini-batches only approach); past :data:`LBFGS_MAX_BYTES` the mini-batch solver of
:mod:`transferlab.heads.minibatch`, whose memory is bounded by the batch. L-BFGS reads the
features in place: standardization is folded into the weights (``x @ (W / std).T + b -
W @ (mean / std)``), so no standardized copy of the matrix is made.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from transferlab.errors import TransferlabError
from transferlab.heads.base import (
    NUM_THREADS_DEFAULT,
    Head,
    Problem,
    as_tensor,
    build_head,
    weighted_ce,
)

# Half-decade steps; the ends are far enough apart that the best value is practically never on
# the boundary for pooled CNN/ViT features with 1e2..1e5 training images.
L2_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, 1, 13))
# Used when there is no validation split: for n in the hundreds this is sklearn's C ~ 1, a
# sensible middle of the grid.
DEFAULT_L2: float = 1e-3
# Validation losses closer than this are a tie (see the package docstring).
_TIE_TOL = 1e-6
# solver="auto" uses L-BFGS up to this many bytes of float32 training features (50k x 1280):
# beyond, each of its hundreds of full passes per grid value costs more than a whole
# mini-batch fit, and the data are plenty for mini-batches to reach the same accuracy.
LBFGS_MAX_BYTES = 256 << 20
SOLVERS = ("auto", "lbfgs", "minibatch")

LINEAR_DEFAULTS: dict[str, Any] = {
    "l2": None,  # a fixed strength: skips the grid search
    "l2_grid": L2_GRID,
    "max_iter": 500,  # L-BFGS iterations per grid value
    # L-BFGS stops when the max-abs gradient is below this (or the loss stops changing). In
    # float32, 1e-8 costs ~1.5x the iterations of 1e-6 and moves no val loss in the 3rd decimal.
    "tol": 1e-6,
    "solver": "auto",  # one of SOLVERS
    # the mini-batch solver's (heads.minibatch): passes over the data, rows per step, Adam's
    # peak LR (3e-2 came within 0.001 of L-BFGS's val loss in ~100 steps on synthetic blobs,
    # where 1e-2 was 0.03 short; at 50k+ rows 8 epochs are 400+ steps)
    "epochs": 8,
    "batch_size": 1024,
    "lr": 3e-2,
    "num_threads": NUM_THREADS_DEFAULT,
}

_Pair = tuple[torch.Tensor, torch.Tensor]


def use_minibatch(p: Problem, opts: dict[str, Any]) -> bool:
    """Whether ``opts["solver"]`` asks for mini-batches on this problem."""
    if opts["solver"] not in SOLVERS:
        raise TransferlabError(f"linear head solver {opts['solver']!r}: use one of {SOLVERS}")
    return opts["solver"] == "minibatch" or (
        opts["solver"] == "auto" and p.x_train.nbytes > LBFGS_MAX_BYTES
    )


def fit_linear(p: Problem, opts: dict[str, Any], spec: dict[str, Any]) -> tuple[Head, list[dict]]:
    """Every L2 strength of the grid by L-BFGS, each warm-started from the previous one; keep
    the one val prefers."""
    fold = Folded(p.mean, p.std)
    train = (as_tensor(p.x_train), torch.from_numpy(p.y_train))
    val = None if p.x_val is None else (as_tensor(p.x_val), torch.from_numpy(p.y_val))
    wt = None if p.weights is None else torch.from_numpy(p.weights.astype(np.float32))
    max_iter = int(opts["max_iter"])
    w = torch.zeros(spec["num_classes"], p.x_train.shape[1], requires_grad=True)
    b = torch.zeros(spec["num_classes"], requires_grad=True)
    history: list[dict] = []
    solutions: list[_Pair] = []
    for l2 in grid(opts, val is not None):
        n_iter = _lbfgs(w, b, fold, *train, wt, l2, max_iter, float(opts["tol"]))
        history.append(_grid_row(l2, n_iter, max_iter, fold, (w, b), train, val, wt))
        solutions.append((w.detach().clone(), b.detach().clone()))
    spec.update(solver="lbfgs", max_iter=max_iter, tol=float(opts["tol"]))
    return finish(spec, opts, history, solutions, has_val=val is not None)


def finish(
    spec: dict[str, Any],
    opts: dict[str, Any],
    history: list[dict],
    solutions: list[_Pair],
    *,
    has_val: bool,
) -> tuple[Head, list[dict]]:
    """Select the grid row, record it in ``spec`` and build the head with its weights."""
    best = _select_l2(history)
    for i, row in enumerate(history):
        row["selected"] = i == best
    spec.update(
        l2=history[best]["l2"],
        l2_grid=[row["l2"] for row in history],
        l2_source="fixed" if opts["l2"] is not None else ("val" if has_val else "default"),
    )
    head = build_head(spec)
    with torch.no_grad():
        head.net.weight.copy_(solutions[best][0])
        head.net.bias.copy_(solutions[best][1])
    return head, history


class Folded:
    """Logits of standardized features from raw ones, standardization folded into the weights.

    Fitted in float32: 4x faster per L-BFGS step than float64 on CPU (measured: 5000x1280x20
    classes, 31 s -> 7 s for the grid) and its optimum matches float64 / sklearn to ~2e-4 in
    probability, far below what changes a prediction."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.scale = torch.from_numpy((1.0 / std).astype(np.float32))
        self.shift = torch.from_numpy((mean / std).astype(np.float32))

    def logits(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x @ (w * self.scale).T + (b - w @ self.shift)


def grid(opts: dict[str, Any], has_val: bool) -> list[float]:
    """The L2 strengths to fit, strongest first."""
    if opts["l2"] is not None:
        values = [float(opts["l2"])]
    elif not has_val:
        values = [DEFAULT_L2]
    else:
        # strongest first, so each warm start comes from a smoother, nearby solution
        values = sorted((float(v) for v in opts["l2_grid"]), reverse=True)
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise TransferlabError(f"L2 strengths must be positive numbers; got {values}")
    return values


@torch.no_grad()
def _grid_row(
    l2: float,
    n_iter: int,
    max_iter: int,
    fold: Folded,
    wb: _Pair,
    train: _Pair,
    val: _Pair | None,
    weights: torch.Tensor | None,
) -> dict[str, Any]:
    w, b = wb
    xt, yt = train
    logits = fold.logits(xt, w, b)
    row = {
        "l2": l2,
        "C": 1.0 / (l2 * len(xt)),  # the equivalent sklearn C, for reference
        "iterations": n_iter,
        "converged": n_iter < max_iter,
        "train_loss": float(weighted_ce(logits, yt, weights)),
        "train_acc": int((logits.argmax(1) == yt).sum()) / len(yt),
        "val_loss": None,
        "val_acc": None,
    }
    if val is not None:
        xv, yv = val
        vlogits = fold.logits(xv, w, b)
        row["val_loss"] = float(weighted_ce(vlogits, yv, weights))
        row["val_acc"] = int((vlogits.argmax(1) == yv).sum()) / len(yv)
    return row


def _lbfgs(
    w: torch.Tensor,
    b: torch.Tensor,
    fold: Folded,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    l2: float,
    max_iter: int,
    tol: float,
) -> int:
    opt = _PlainLBFGS(
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
        loss = weighted_ce(fold.logits(x, w, b), y, weights) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[w].get("n_iter", 0))


def _plain(method: Any) -> Any:
    # torch wraps these in torch._disable_dynamo, whose first call imports torch._dynamo: 1 s of
    # a 2-core box, four times a warm re-fit's whole head fit. The wrapper only keeps
    # torch.compile from tracing into them, and a head fit is never compiled.
    return getattr(method, "__wrapped__", method)


class _PlainLBFGS(torch.optim.LBFGS):
    """torch's L-BFGS without the torch._dynamo import its first use costs (see _plain)."""

    add_param_group = _plain(torch.optim.Optimizer.add_param_group)
    zero_grad = _plain(torch.optim.Optimizer.zero_grad)


def _select_l2(history: list[dict]) -> int:
    """Index of the chosen grid row: best val loss; ties -> higher val acc -> stronger L2."""
    if len(history) == 1 or history[0]["val_loss"] is None:
        return 0
    best_loss = min(row["val_loss"] for row in history)
    tied = [i for i, row in enumerate(history) if row["val_loss"] <= best_loss + _TIE_TOL]
    return max(tied, key=lambda i: (history[i]["val_acc"], history[i]["l2"]))
