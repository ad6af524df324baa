"""The linear head on many rows: mini-batch Adam over every L2 strength of the grid at once.

The objective is the linear head's (see the package docstring). All grid values are trained
together, as one stacked ``(G, C, d)`` weight: each step reads one batch of rows and updates
every strength, so the grid costs one pass over the data per epoch instead of G. Rows are read
by a seeded permutation, a sorted batch of them at a time (``x[idx]`` on a memmap touches only
those rows), standardized in float32 as the head module does; memory is bounded by the batch
(plus, for a memmap, the page cache's mapping of the file, which the kernel reclaims at will).
The LR follows a cosine from ``lr`` to 0 over ``epochs``. Train and val losses for selection
come from one extra streaming pass each, in chunks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from transferlab.heads.base import Head, Problem, as_tensor
from transferlab.heads.linear import finish, grid

# Rows per chunk of the evaluation passes.
_EVAL_ROWS = 8192


class _Stacked:
    """G linear heads over standardized features as one ``(G, C, d)`` weight and ``(G, C)`` bias."""

    def __init__(self, g: int, c: int, d: int, mean: np.ndarray, std: np.ndarray) -> None:
        self.w = torch.zeros(g, c, d, requires_grad=True)
        self.b = torch.zeros(g, c, requires_grad=True)
        self.mean = torch.from_numpy(mean.astype(np.float32))
        self.std = torch.from_numpy(std.astype(np.float32))

    def logits(self, x: np.ndarray) -> torch.Tensor:
        """``(G, n, C)`` logits of raw feature rows ``x``."""
        z = (as_tensor(np.ascontiguousarray(x)) - self.mean) / self.std
        g, c, d = self.w.shape
        return (z @ self.w.reshape(g * c, d).T).reshape(len(z), g, c).transpose(0, 1) + self.b[
            :, None
        ]


def _losses(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``(G,)`` weighted mean cross-entropies (the heads' ``weighted_ce``, per grid value)."""
    g, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(g * n, c), y.repeat(g), reduction="none").reshape(g, n)
    if weights is not None:
        ce = ce * weights[y]
    return ce.mean(1)


def fit_minibatch(
    p: Problem, opts: dict[str, Any], spec: dict[str, Any], seed: int
) -> tuple[Head, list[dict]]:
    """Train the grid by mini-batches, then select on val as the L-BFGS path does."""
    strengths = grid(opts, p.x_val is not None)
    epochs, batch, lr = int(opts["epochs"]), int(opts["batch_size"]), float(opts["lr"])
    n, d = p.x_train.shape
    model = _Stacked(len(strengths), spec["num_classes"], d, p.mean, p.std)
    l2 = torch.tensor(strengths, dtype=torch.float32)
    wt = None if p.weights is None else torch.from_numpy(p.weights.astype(np.float32))
    opt = torch.optim.Adam([model.w, model.b], lr=lr)
    steps, total = 0, epochs * math.ceil(n / batch)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = np.sort(order[start : start + batch])
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * steps / total))
            opt.zero_grad()
            y = torch.from_numpy(p.y_train[idx])
            penalty = 0.5 * l2 * (model.w * model.w).sum((1, 2))
            (_losses(model.logits(p.x_train[idx]), y, wt) + penalty).sum().backward()
            opt.step()
            steps += 1
    history = _history(model, p, wt, strengths, steps)
    solutions = [(model.w[i].detach().clone(), model.b[i].detach().clone()) for i in range(len(l2))]
    spec.update(solver="minibatch", epochs=epochs, batch_size=batch, lr=lr, steps=steps)
    return finish(spec, opts, history, solutions, has_val=p.x_val is not None)


@torch.no_grad()
def _evaluate(
    model: _Stacked, x: np.ndarray, y: np.ndarray, weights: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per grid value: (weighted mean CE, accuracy) over all rows, a chunk at a time."""
    loss = torch.zeros(model.w.shape[0], dtype=torch.float64)
    correct = torch.zeros(model.w.shape[0], dtype=torch.float64)
    for start in range(0, len(x), _EVAL_ROWS):
        yy = torch.from_numpy(y[start : start + _EVAL_ROWS])
        logits = model.logits(x[start : start + _EVAL_ROWS])
        loss += _losses(logits, yy, weights).double() * len(yy)
        correct += (logits.argmax(2) == yy).sum(1).double()
    return (loss / len(x)).numpy(), (correct / len(x)).numpy()


def _history(
    model: _Stacked, p: Problem, wt: torch.Tensor | None, strengths: list[float], steps: int
) -> list[dict[str, Any]]:
    train_loss, train_acc = _evaluate(model, p.x_train, p.y_train, wt)
    val_loss = val_acc = None
    if p.x_val is not None:
        val_loss, val_acc = _evaluate(model, p.x_val, p.y_val, wt)
    return [
        {
            "l2": l2,
            "C": 1.0 / (l2 * len(p.x_train)),
            "iterations": steps,
            "converged": None,  # a fixed budget of epochs, not a convergence test
            "train_loss": float(train_loss[i]),
            "train_acc": float(train_acc[i]),
            "val_loss": None if val_loss is None else float(val_loss[i]),
            "val_acc": None if val_acc is None else float(val_acc[i]),
        }
        for i, l2 in enumerate(strengths)
    ]
