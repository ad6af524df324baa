"""The MLP head, and the mini-batch trainer on in-memory features it shares with the frozen
strategy (the training loop, early stopping and history rows of :mod:`transferlab.training`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.heads.base import (
    NUM_THREADS_DEFAULT,
    Head,
    Problem,
    as_tensor,
    build_head,
    weighted_ce,
)
from transferlab.training import Best, EpochStats, Stepper, history_row, run_batches

# Rows per chunk when evaluating on the validation set.
_EVAL_ROWS = 8192

MLP_DEFAULTS: dict[str, Any] = {
    "hidden": (512, 512),
    "dropout": 0.3,
    "lr": 1e-3,
    "weight_decay": 1e-2,  # AdamW's own default
    "batch_size": 32,
    "max_epochs": 100,
    "patience": 10,
    "min_delta": 0.0,
    "num_threads": NUM_THREADS_DEFAULT,
}


def fit_mlp(
    p: Problem, opts: dict[str, Any], spec: dict[str, Any], seed: int
) -> tuple[Head, list[dict]]:
    """AdamW mini-batches with early stopping on val loss; the best epoch's weights restored.

    The whole head is trained, its standardization buffers set first: each batch is
    standardized as it is drawn (the same float32 arithmetic as standardizing up front), so
    the features are never copied."""
    _mlp_spec(opts, spec)
    xt, yt = as_tensor(p.x_train), torch.from_numpy(p.y_train)
    wt = None if p.weights is None else torch.from_numpy(p.weights.astype(np.float32))
    xv = yv = None
    if p.x_val is not None:
        xv, yv = as_tensor(p.x_val), torch.from_numpy(p.y_val)
    # A private RNG stream: seeds init and dropout without disturbing the caller's global state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(spec)
        head.standardize.mean.copy_(torch.from_numpy(p.mean.astype(np.float32)))
        head.standardize.std.copy_(torch.from_numpy(p.std.astype(np.float32)))
        net = head.net
        opt = torch.optim.AdamW(net.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
        history, best_state, best_epoch = train_epochs(
            head,
            lambda: xt,
            yt,
            lambda logits, y: weighted_ce(logits, y, wt),
            opt,
            batch_size=spec["batch_size"],
            max_epochs=spec["max_epochs"],
            generator=torch.Generator().manual_seed(seed),
            validate=None if xv is None else lambda: _evaluate(head, xv, yv, wt),
            patience=spec["patience"],
            min_delta=spec["min_delta"],
        )
    if best_state is not None:
        head.load_state_dict(best_state)
    spec.update(
        epochs_run=len(history),
        best_epoch=best_epoch or len(history),
        early_stopped=xv is not None and len(history) < spec["max_epochs"],
    )
    return head, history


def _mlp_spec(opts: dict[str, Any], spec: dict[str, Any]) -> None:
    """Check the MLP options and record them in ``spec``."""
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
    lr_at: Callable[[int], float] | None = None,
    stage: str | None = None,
    timed: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None, int]:
    """Mini-batch training of a small network on in-memory features, early stopping on val loss.

    Every epoch ``inputs()`` gives its (n, d) rows (the same tensor, or one augmented view per
    image for the frozen strategy) and ``generator`` shuffles them. ``lr_at(step)`` is the factor
    on each group's ``base_lr`` at that step (a schedule; None: the LR stays). ``validate()`` ->
    (val loss, val accuracy) after each epoch; an epoch whose val loss beats the best by more than
    ``min_delta`` snapshots ``snapshot`` (default ``net``), and ``patience`` epochs without one
    stop training. Returns (one history row per epoch, tagged ``stage`` when given, the best
    snapshot or None, its epoch or 0); rows get the epoch's wall time as ``seconds`` when
    ``timed`` (off where histories must be reproducible).
    """
    snapshot = net if snapshot is None else snapshot
    step = Stepper(net, opt, loss_fn)
    history: list[dict[str, Any]] = []
    best, tracker, n_steps = None, Best(best_score=math.inf), 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        net.train()
        x = inputs()
        perm = torch.randperm(len(y), generator=generator)
        stats = EpochStats()
        batches = ((x[idx], y[idx]) for idx in perm.split(batch_size))
        n_steps = run_batches(step, batches, lr_at, stats.add, n_steps)
        val = (None, None) if validate is None else validate()
        extra = {"seconds": time.perf_counter() - t0} if timed else {}
        train = (stats.loss_sum / len(y), stats.correct / len(y))
        history.append(history_row(epoch, train, val, opt.param_groups[0]["lr"], stage, **extra))
        if validate is None:
            continue
        if tracker.update(val[0], epoch, min_delta=min_delta):
            best = {k: v.detach().clone() for k, v in snapshot.state_dict().items()}
        elif tracker.exhausted(patience):
            break
    return history, best, tracker.best_epoch


def _evaluate(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> tuple[float, float]:
    """(weighted mean CE, accuracy), a chunk of rows at a time (no (n, hidden) activations)."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.inference_mode():
        for rows in torch.arange(len(y)).split(_EVAL_ROWS):
            logits = net(x[rows[0] : rows[-1] + 1])
            loss += float(weighted_ce(logits, y[rows], weights)) * len(rows)
            correct += int((logits.argmax(1) == y[rows]).sum())
    return loss / len(y), correct / len(y)
