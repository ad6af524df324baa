"""What every strategy takes and returns, and the engine hand-off the trained ones share.

A strategy is ``run(ctx: StrategyContext) -> StrategyResult``. The context carries everything
built above it (the prepared splits, the config, the pretrained backbone and its feature
extractor when the strategy needs them); nothing in a strategy reaches back up for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import Backbone, timm_body_recipe
from transferlab.cache import FeatureCache
from transferlab.config import FitConfig
from transferlab.data.images import MAX_PIXELS
from transferlab.data.prepared import Split
from transferlab.engine import Stage, train
from transferlab.errors import TransferlabError
from transferlab.extract import FeatureExtractor
from transferlab.model import ClassifierNet, LazyNet
from transferlab.preprocess import Preprocess
from transferlab.storage import state_digest

__all__ = [
    "StrategyContext", "StrategyResult", "TrainSetup", "body_record", "feature_extractor",
    "run_setup",
]  # fmt: skip


def feature_extractor(backbone: Backbone, config: dict[str, Any] | FitConfig) -> FeatureExtractor:
    """The backbone on its fastest runtime, with the feature cache that ``config`` names."""
    cfg = config.to_dict() if isinstance(config, FitConfig) else config
    cache_dir = cfg.get("cache_dir")
    return FeatureExtractor(
        backbone,
        cache=FeatureCache(Path(cache_dir) if cache_dir else None),
        engine=cfg.get("engine", "auto"),
        batch_size=cfg.get("batch_size", 32),
        workers=cfg.get("workers"),
        max_pixels=cfg.get("max_pixels", MAX_PIXELS),
    )


@dataclass
class StrategyContext:
    classes: list[str]
    train: Split
    val: Split | None
    test: Split | None
    config: FitConfig
    out: Path  # the run folder: checkpoints, curves, logs go here
    backbone: Backbone | None = None  # the pretrained backbone, for strategies that use one
    extractor: FeatureExtractor | None = None  # that backbone on its runtime + the feature cache
    timings: dict[str, float] = field(default_factory=dict)
    extract_stats: list[dict[str, Any]] = field(default_factory=list)

    def pretrained(self) -> tuple[Backbone, FeatureExtractor]:
        """The backbone and extractor a pretrained strategy needs (the caller builds them)."""
        if self.backbone is None or self.extractor is None:
            raise TransferlabError(
                f"strategy {self.config.strategy!r} needs a pretrained backbone and none was given"
            )
        return self.backbone, self.extractor


@dataclass
class StrategyResult:
    net: ClassifierNet | LazyNet  # lazy: a features run whose body was never needed
    preprocess: Preprocess
    body: dict[str, Any]  # spec, weights_hash, recipe, trained
    head: dict[str, Any]  # head spec for heads.build_head
    history: list[dict] = field(default_factory=list)  # per epoch / per grid point
    # probabilities for val/test computed cheaply by the strategy (e.g. from cached
    # features); when absent, evaluation runs the saved model on the images.
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # timings, trainable params, epochs


@dataclass
class TrainSetup:
    """What a training strategy hands the engine (and ``lr_find``): a network and its plan."""

    net: ClassifierNet
    preprocess: Preprocess
    stages: list[Stage]
    augment: str
    body: dict[str, Any]  # spec + recipe; weights_hash and trained are filled in after training
    head: dict[str, Any]  # head spec for heads.build_head
    info: dict[str, Any] = field(default_factory=dict)
    monitor: str = "val_loss"  # what picks the best epoch and drives early stopping
    min_epochs: int = 0  # early stopping waits at least this many epochs


def body_record(backbone: Backbone, *, frozen: bool) -> dict[str, Any]:
    """model.json's body entry: spec and recipe to rebuild it; for a body used as it is, also
    its weights hash (a trained body gets the digest of its new weights after training)."""
    body: dict[str, Any] = {
        "spec": backbone.spec,
        "recipe": backbone.recipe or timm_body_recipe(backbone.spec, backbone.model),
        "arch": backbone.arch,
    }
    if frozen:
        body.update(weights_hash=backbone.weights_hash, trained=False)
    return body


def run_setup(ctx: StrategyContext, setup: TrainSetup) -> StrategyResult:
    """Train ``setup`` on the context's splits and package the strategy result."""
    res = train(
        setup.net,
        ctx.train,
        ctx.val,
        preprocess=setup.preprocess,
        config=ctx.config,
        out=ctx.out,
        stages=setup.stages,
        augment=setup.augment,
        monitor=setup.monitor,
        num_classes=len(ctx.classes),
        min_epochs=setup.min_epochs,
    )
    ctx.timings["train_engine_s"] = res.seconds
    body = {**setup.body, "weights_hash": state_digest(res.net.body), "trained": True}
    info = {
        **setup.info,
        "seconds": res.seconds,
        "epochs": res.epochs,
        "best_epoch": res.best_epoch,
        # the starting weights (a phase-1 head) won on val: training did not earn its keep
        "kept_start": res.best_epoch == 0 and setup.stages[0].baseline is not None,
        "stop_reason": res.stop_reason,
        "trainable_params": res.trainable_params,
        "images_per_s": res.images_per_s,
        "recalibrated_bn": res.recalibrated_bn,
        "augment": setup.augment,
        "monitor": setup.monitor,
        "min_epochs": setup.min_epochs,
        "stages": [asdict(s) for s in setup.stages],
    }
    return StrategyResult(
        net=res.net,
        preprocess=setup.preprocess,
        body=body,
        head=setup.head,
        history=res.history,
        info=info,
    )
