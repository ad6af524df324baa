"""Strategies: one way each to turn (data, backbone, config) into a trained ClassifierNet.

``STRATEGIES`` maps each name of ``config.STRATEGY_NAMES`` to a :class:`StrategySpec`: how to run
it, whether it needs the pretrained backbone (the caller builds it once and passes it down), and,
for strategies trained by gradient descent, how to set up the network it trains (which is what
``lr_find`` sweeps). The CLI, the Python API and the ladder only loop over names; adding a
strategy touches its own module and one entry here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transferlab.backbones import Backbone, at_input_size, create_backbone
from transferlab.config import AUTO, FitConfig
from transferlab.data.prepared import PreparedData
from transferlab.engine.shards import extract_sharded, wants_ranks
from transferlab.strategies import features, finetune, frozen, scratch
from transferlab.strategies.base import (
    StrategyContext,
    StrategyResult,
    TrainSetup,
    body_record,
    feature_extractor,
    run_setup,
)

__all__ = [
    "STRATEGIES", "StrategyContext", "StrategyResult", "StrategySpec", "TrainSetup",
    "body_record", "config_backbone", "feature_extractor", "ignored_options", "run_setup",
    "strategy_context",
]  # fmt: skip


@dataclass(frozen=True)
class StrategySpec:
    run: Callable[[StrategyContext], StrategyResult]
    needs_backbone: bool  # the pretrained backbone + feature extractor, built by the caller
    prepare: Callable[[StrategyContext], TrainSetup] | None = None  # gradient-trained ones
    ignores: frozenset[str] = frozenset()  # FitConfig options that change nothing here


# What the training engine reads; a strategy without the engine ignores them.
# (accelerator, devices, dist_strategy, num_nodes: every strategy's, for training or for the
# sharded extraction)
_ENGINE = frozenset({"optimizer", "max_time", "precision", "resume"})
_END_TO_END = frozenset(
    {"epochs", "lr", "schedule", "warmup_epochs", "weight_decay", "label_smoothing", "patience",
     "augment"}
) | _ENGINE  # fmt: skip
_FINETUNE = frozenset({"unfreeze", "lr_mult", "gradual", "bn"})
_EXTRACTION = frozenset({"engine", "cache_dir"})


def _trained(
    prepare: Callable[[StrategyContext], TrainSetup], *, needs_backbone: bool, ignores: frozenset
) -> StrategySpec:
    return StrategySpec(
        run=lambda ctx: run_setup(ctx, prepare(ctx)),
        needs_backbone=needs_backbone,
        prepare=prepare,
        ignores=ignores,
    )


_SCRATCH = _FINETUNE | _EXTRACTION | {"head"}
STRATEGIES: dict[str, StrategySpec] = {
    "features": StrategySpec(features.run, needs_backbone=True, ignores=_END_TO_END | _FINETUNE),
    "frozen": StrategySpec(frozen.run, needs_backbone=True, ignores=_ENGINE | _FINETUNE),
    "finetune": _trained(finetune.prepare, needs_backbone=True, ignores=frozenset()),
    "scratch-basic": _trained(
        scratch.prepare_basic, needs_backbone=False, ignores=_SCRATCH | {"backbone", "pretrained"}
    ),
    "scratch-regularized": _trained(
        scratch.prepare_regularized,
        needs_backbone=False,
        ignores=_SCRATCH | {"backbone", "pretrained"},
    ),
    "scratch-timm": _trained(
        scratch.prepare_timm, needs_backbone=False, ignores=_SCRATCH | {"pretrained"}
    ),
}


def ignored_options(config: FitConfig) -> list[str]:
    """The options ``config`` sets (away from their defaults) that its strategy ignores (auto
    ignores none: it passes them on to the strategies it tries)."""
    if config.strategy == AUTO:
        return []
    defaults = FitConfig()
    return sorted(
        name
        for name in STRATEGIES[config.strategy].ignores | {"time_budget"}
        if getattr(config, name) != getattr(defaults, name)
    )


def config_backbone(config: FitConfig) -> Backbone:
    """The backbone ``config`` names, at the input size it asks for (``at_input_size``): the one
    ``fit``, ``rank``, ``auto`` and ``transferlab extract`` all key their features by."""
    native = create_backbone(
        config.backbone, pretrained=config.pretrained, cache_dir=config.cache_dir
    )
    return at_input_size(native, config.image_size)


def strategy_context(prepared: PreparedData, config: FitConfig, out: Path) -> StrategyContext:
    """What a strategy (or lr-find, or a ranking) gets: the splits, the config, the run folder,
    and for a pretrained strategy the backbone and its extractor, built here once."""
    ctx = StrategyContext(
        classes=prepared.classes,
        train=prepared.splits["train"],
        val=prepared.splits.get("val"),
        test=prepared.splits.get("test"),
        config=config,
        out=out,
    )
    if STRATEGIES[config.strategy].needs_backbone:
        t0 = time.perf_counter()
        ctx.backbone = config_backbone(config)
        ctx.timings["backbone_s"] = time.perf_counter() - t0
        ctx.extractor = feature_extractor(ctx.backbone, config)
        if wants_ranks(config):
            _extract_on_ranks(ctx)
    return ctx


def _extract_on_ranks(ctx: StrategyContext) -> None:
    """Every split's features into the cache, sharded over the ranks the config asks for (each
    image once in the whole job); the strategy then reads them all as cache hits."""
    assert ctx.extractor is not None
    splits = [s for s in (ctx.train, ctx.val, ctx.test) if s is not None]
    t0 = time.perf_counter()
    paths, digests = [p for s in splits for p in s.paths], [d for s in splits for d in s.digests]
    extract_sharded(ctx.extractor, paths, digests, ctx.config)
    ctx.timings["extract_sharded_s"] = time.perf_counter() - t0
