"""Strategies: one way each to turn (data, backbone, config) into a trained ClassifierNet.

Every strategy is a function ``run(ctx: StrategyContext) -> StrategyResult``. The CLI, the
Python API and the ladder only loop over names in ``STRATEGIES``; adding one touches its own
module and one line here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.config import FitConfig
from transferlab.model import ClassifierNet, timm_body_recipe
from transferlab.preprocess import Preprocess

if TYPE_CHECKING:
    from transferlab.backbones import Backbone
    from transferlab.extract import FeatureExtractor


@dataclass
class Split:
    """The usable images of one split: paths, integer labels, content digests."""

    paths: list[str]
    labels: np.ndarray
    digests: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class StrategyContext:
    classes: list[str]
    train: Split
    val: Split | None
    test: Split | None
    config: FitConfig
    out: Path  # the run folder: checkpoints, curves, logs go here
    timings: dict[str, float] = field(default_factory=dict)
    extract_stats: list[dict[str, Any]] = field(default_factory=list)
    _backbone: Backbone | None = None
    _extractor: FeatureExtractor | None = None

    def backbone(self) -> Backbone:
        """The pretrained backbone, built once per fit (shared by the strategy and evaluation)."""
        if self._backbone is None:
            from transferlab.backbones import create_backbone

            t0 = time.perf_counter()
            self._backbone = create_backbone(
                self.config.backbone, pretrained=self.config.pretrained
            )
            self.timings["backbone_s"] = time.perf_counter() - t0
        return self._backbone

    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            from transferlab.cache import FeatureCache
            from transferlab.extract import FeatureExtractor

            cfg = self.config
            self._extractor = FeatureExtractor(
                self.backbone(),
                cache=FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else None),
                engine=cfg.engine,
                batch_size=cfg.batch_size,
                workers=cfg.workers,
                max_pixels=cfg.max_pixels,
            )
        return self._extractor


@dataclass
class StrategyResult:
    net: ClassifierNet
    preprocess: Preprocess
    body: dict[str, Any]  # spec, weights_hash, recipe, trained
    head: dict[str, Any]  # head spec for heads.build_head
    history: list[dict] = field(default_factory=list)  # per epoch / per grid point
    # probabilities for val/test computed cheaply by the strategy (e.g. from cached
    # features); when absent, evaluation runs the saved model on the images.
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # timings, trainable params, epochs


def body_record(backbone: Backbone, *, frozen: bool) -> dict[str, Any]:
    """model.json's body entry: spec and recipe to rebuild it; for a body used as it is, also
    its weights hash (a trained body gets the digest of its new weights after training)."""
    body: dict[str, Any] = {
        "spec": backbone.spec,
        "recipe": timm_body_recipe(backbone.spec, backbone.model),
    }
    if frozen:
        body.update(weights_hash=backbone.weights_hash, trained=False)
    return body


def _features(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.features import run

    return run(ctx)


def _frozen(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.frozen import run

    return run(ctx)


def _finetune(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.finetune import run

    return run(ctx)


def _scratch_basic(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.scratch import run_basic

    return run_basic(ctx)


def _scratch_regularized(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.scratch import run_regularized

    return run_regularized(ctx)


def _scratch_timm(ctx: StrategyContext) -> StrategyResult:
    from transferlab.strategies.scratch import run_timm

    return run_timm(ctx)


# Imported lazily so that naming a strategy does not import Lightning or the engine.
STRATEGIES: dict[str, Callable[[StrategyContext], StrategyResult]] = {
    "features": _features,
    "frozen": _frozen,
    "finetune": _finetune,
    "scratch-basic": _scratch_basic,
    "scratch-regularized": _scratch_regularized,
    "scratch-timm": _scratch_timm,
}
