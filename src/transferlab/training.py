"""What every training loop shares: the per-batch step, LR schedules, early stopping, history.

Three loops train networks here: the engine's trainer (images, stages, Fabric), its lr-find mode
(an exponential LR sweep over the same steps) and the head trainer on cached features
(``heads.train_epochs``). Each is :func:`run_batches` over a :class:`Stepper`; they differ only in
where the batches come from, which LR factor each step gets and what happens after it. The rest of
this module is what they report with (:class:`Best`, :func:`history_row`, :func:`write_history`)
and how they weight their losses (:func:`class_weights`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.config import SCHEDULES, FitConfig
from transferlab.errors import TransferlabError
from transferlab.storage import atomic_write_text

__all__ = [
    "HISTORY_FIELDS",
    "Best",
    "EpochStats",
    "Stepper",
    "class_weights",
    "cross_entropy",
    "history_row",
    "lr_factor",
    "run_batches",
    "scale_lr",
    "write_history",
]

HISTORY_FIELDS = (
    "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "img_per_s"
)  # fmt: skip
_CLASS_WEIGHT_MODES = (None, "none", "auto", "balanced")
# one-cycle shape (fastai/torch defaults): start at lr/25, end at lr/(25 * 1e4), ramp 25 %
_ONECYCLE_DIV, _ONECYCLE_FINAL_DIV, _ONECYCLE_PCT = 25.0, 1e4, 0.25
_STEP_DECAYS, _STEP_GAMMA = 3, 0.1


# --------------------------------------------------------------------------------------------
# the step and the loop


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on each group's base LR at optimizer step ``step`` of ``total`` (per step)."""
    total = max(1, total)
    s = min(step, total - 1)
    if schedule == "onecycle":
        ramp = warmup or max(1, int(_ONECYCLE_PCT * total))
        lo, end = 1 / _ONECYCLE_DIV, 1 / (_ONECYCLE_DIV * _ONECYCLE_FINAL_DIV)
        if s < ramp:
            return lo + (1 - lo) * (1 - math.cos(math.pi * s / ramp)) / 2
        p = (s - ramp) / max(1, total - ramp)
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2
    if s < warmup:
        return (s + 1) / warmup
    if schedule == "cosine":
        p = (s - warmup) / max(1, total - warmup)
        return (1 + math.cos(math.pi * p)) / 2
    if schedule == "step":
        return _STEP_GAMMA ** math.floor(_STEP_DECAYS * s / total)
    if schedule == "constant":
        return 1.0
    raise TransferlabError(f"--schedule {schedule!r} is unknown; choose one of {SCHEDULES}")


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's LR to its ``base_lr`` times ``factor``; returns the first group's LR."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


class Stepper:
    """One optimizer step on one batch: LR, forward, loss, backward, update.

    ``autocast`` and ``backward`` are Fabric's in the engine (mixed precision, DDP); ``check``
    runs once, after the first backward and before the first update.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast, self.backward, self.check = autocast, backward, check

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, factor: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on ``(x, y)`` at ``factor`` x base LR (None: leave the LR); (loss, logits)."""
        if factor is not None:
            scale_lr(self.optimizer, factor)
        with torch.enable_grad(), self.autocast():
            logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if self.check is not None:
            self.check()
            self.check = None
        self.optimizer.step()
        return loss.detach(), logits.detach()


def run_batches(
    step: Stepper,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    lr_at: Callable[[int], float] | None,
    after: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool | None],
    first: int = 0,
) -> int:
    """The training loop: a step per batch at ``lr_at(step number)``, counted from ``first``;
    ``after(loss, logits, y)`` returns True to stop. Returns the next step number."""
    n = first
    for x, y in batches:
        loss, logits = step(x, y, None if lr_at is None else lr_at(n))
        n += 1
        if after(loss, logits, y):
            break
    return n


@dataclass
class EpochStats:
    """Running training loss and accuracy over an epoch's batches (dropout on, as logged)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += float(loss) * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)


# --------------------------------------------------------------------------------------------
# early stopping, history


@dataclass
class Best:
    """The best validation score so far, its epoch, and the epochs since (for ``patience``).

    ``best_score`` None: the first score is an improvement whatever it is; the head trainer starts
    from ``math.inf`` instead, so a non-finite first loss is none.
    """

    best_epoch: int = 0
    best_score: float | None = None
    wait: int = 0

    def update(self, score: float, epoch: int, mode: str = "min", min_delta: float = 0.0) -> bool:
        """Record an epoch's score; True when it beats the best by more than ``min_delta``."""
        best = self.best_score
        if best is None:
            better = True
        elif mode == "min":
            better = score < best - min_delta
        else:
            better = score > best + min_delta
        if better:
            self.best_score, self.best_epoch, self.wait = float(score), epoch, 0
        else:
            self.wait += 1
        return better

    def exhausted(self, patience: int | None) -> bool:
        """``patience`` epochs in a row without improvement (never, for None)."""
        return patience is not None and self.wait >= patience


def history_row(
    epoch: int,
    train: tuple[float, float],
    val: tuple[float | None, float | None],
    lr: float,
    stage: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One epoch of a history, keys in :data:`HISTORY_FIELDS` order (``extra`` after ``lr``)."""
    row: dict[str, Any] = {"epoch": epoch}
    if stage is not None:
        row["stage"] = stage
    row.update(train_loss=train[0], train_acc=train[1], val_loss=val[0], val_acc=val[1], lr=lr)
    row.update(extra)
    return row


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch rows -> ``path`` as CSV (HISTORY_FIELDS), replaced atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# losses


def class_weights(
    labels: np.ndarray | list[int], num_classes: int, mode: str | None
) -> np.ndarray | None:
    """Loss weights ``n / (C * count_c)`` for ``mode`` "auto" (alias "balanced", sklearn's name)
    over all ``num_classes`` classes; None for None or "none"."""
    if mode not in _CLASS_WEIGHT_MODES:
        raise TransferlabError(
            f"class_weight must be None or 'auto' ('balanced' is an alias); got {mode!r}"
        )
    if mode is None or mode == "none":
        return None
    y = np.asarray(labels, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise TransferlabError(
            f"training labels run from {y.min()} to {y.max()}, outside the {num_classes} classes"
        )
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise TransferlabError(
            f"--class-weight auto: class(es) {missing.tolist()} have no training images, so "
            "their weight n / (C * count) is undefined; add images or drop --class-weight"
        )
    # the weights of all n samples then sum to n: the weighted mean loss keeps the scale of the
    # unweighted one
    return len(y) / (num_classes * counts)


def cross_entropy(
    labels: np.ndarray | list[int], num_classes: int, config: FitConfig
) -> nn.CrossEntropyLoss:
    """The loss of a run: ``config``'s class weighting (over ``labels``) and label smoothing."""
    weights = class_weights(labels, num_classes, config.class_weight)
    return nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
        label_smoothing=config.label_smoothing,
    )
