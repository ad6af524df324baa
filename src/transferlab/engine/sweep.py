"""The engine's lr-find mode: its training steps at an exponentially growing LR, until divergence.

The sweep trains a stage's plan (same parameter groups, frozen modules, no-grad boundary and
optimizer as :mod:`transferlab.engine.loop`) through :func:`transferlab.training.run_batches`;
instead of the schedule each step gets ``start * (end / start) ** (i / (num_it - 1))`` times the
group's base LR. It records the loss smoothed by an exponential moving average with bias
correction (beta 0.98) and stops once the smoothed loss exceeds 4x its minimum or is not finite.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transferlab.config import FitConfig
from transferlab.engine.loaders import device_batches
from transferlab.engine.optim import build_optimizer
from transferlab.engine.stages import Stage, apply_plan, grad_boundary, plan_stage, set_train_mode
from transferlab.model import ClassifierNet
from transferlab.training import Stepper, run_batches

_BETA = 0.98
_DIVERGENCE = 4.0


@dataclass
class LRCurve:
    """The sweep's LRs (factors on the base LR) and smoothed losses, one per step."""

    start: float
    end: float
    num_it: int
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    diverged: bool = False
    _avg: float = 0.0
    _best: float = math.inf

    def lr(self, i: int) -> float:
        return self.start * (self.end / self.start) ** (i / (self.num_it - 1))

    def record(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> bool:
        """Add a step's loss; True (stop) once the smoothed loss diverges."""
        i = len(self.losses)
        self._avg = _BETA * self._avg + (1 - _BETA) * float(loss)
        smooth = self._avg / (1 - _BETA ** (i + 1))
        self.lrs.append(self.lr(i))
        self.losses.append(smooth)
        if not math.isfinite(smooth) or smooth > _DIVERGENCE * self._best:
            self.diverged = True
            return True
        self._best = min(self._best, smooth)
        return False


def sweep_lr(
    net: ClassifierNet,
    batches: Iterable[Any],
    stage: Stage,
    config: FitConfig,
    device: torch.device,
    curve: LRCurve,
) -> LRCurve:
    """Train ``net`` as ``stage`` (its ``lr`` is the base the factors multiply) on the first
    ``curve.num_it`` of ``batches``, filling ``curve``. ``net`` is left trained: restore it."""
    net.to(device, memory_format=torch.channels_last)
    plan = plan_stage(net, stage, config)
    apply_plan(net, plan)
    optimizer = build_optimizer(net, plan, config)
    # the sweep has always used the unweighted loss (no --class-weight), unlike the trainer
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    step = Stepper(net, optimizer, criterion)
    set_train_mode(net, plan)
    with grad_boundary(net, plan):
        sweep = device_batches(itertools.islice(batches, curve.num_it), device)
        run_batches(step, sweep, curve.lr, curve.record)
    return curve
