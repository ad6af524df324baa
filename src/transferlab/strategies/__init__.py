"""Strategies: one way each to turn (data, backbone, config) into a trained ClassifierNet.

``STRATEGIES`` maps each name of ``config.STRATEGY_NAMES`` to a :class:`StrategySpec`: how to run
it, whether it needs the pretrained backbone (the caller builds it once and passes it down), and,
for strategies trained by gradient descent, how to set up the network it trains (which is what
``lr_find`` sweeps). The CLI, the Python API and the ladder only loop over names; adding a
strategy touches its own module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transferlab.strategies import features, finetune, frozen, scratch
from transferlab.strategies.base import (
    StrategyContext,
    StrategyResult,
    TrainSetup,
    body_record,
    run_setup,
)

__all__ = [
    "STRATEGIES", "StrategyContext", "StrategyResult", "StrategySpec", "TrainSetup",
    "body_record", "run_setup",
]  # fmt: skip


@dataclass(frozen=True)
class StrategySpec:
    run: Callable[[StrategyContext], StrategyResult]
    needs_backbone: bool  # the pretrained backbone + feature extractor, built by the caller
    prepare: Callable[[StrategyContext], TrainSetup] | None = None  # gradient-trained ones


def _trained(prepare: Callable[[StrategyContext], TrainSetup], *, needs_backbone: bool):
    return StrategySpec(
        run=lambda ctx: run_setup(ctx, prepare(ctx)), needs_backbone=needs_backbone, prepare=prepare
    )


STRATEGIES: dict[str, StrategySpec] = {
    "features": StrategySpec(features.run, needs_backbone=True),
    "frozen": StrategySpec(frozen.run, needs_backbone=True),
    "finetune": _trained(finetune.prepare, needs_backbone=True),
    "scratch-basic": _trained(scratch.prepare_basic, needs_backbone=False),
    "scratch-regularized": _trained(scratch.prepare_regularized, needs_backbone=False),
    "scratch-timm": _trained(scratch.prepare_timm, needs_backbone=False),
}
