"""From-scratch baselines: the tutorial's CNNs and any timm architecture with random init.

``scratch-basic`` / ``scratch-regularized``
    The tutorial's Keras CNNs (see :mod:`transferlab.scratch`) at ``--image-size`` (default 150,
    the tutorial's), trained end to end; augmentation ``none`` unless ``--augment`` says otherwise
    (the ladder asks for ``tutorial`` on one rung). Preprocessing: shorter side to the image size,
    centre crop (``crop_pct=1``), and mean = std = 0.5, i.e. inputs in [-1, 1]. The tutorial
    rescales to [0, 1]; zero-centred inputs condition a randomly initialised first layer better,
    and the difference is an affine map the first convolution could absorb. The tutorial squashes
    images to 150x150 (no crop); transferlab keeps its single resize-and-centre-crop
    preprocessing contract, shared by training, prediction and every export.
``scratch-timm``
    The ``--backbone`` architecture with random weights (a modern from-scratch baseline), with the
    backbone's own preprocessing (``--image-size`` overrides its size), ``light`` augmentation
    and BatchNorm in train mode whatever ``--bn`` says: randomly initialised BN has no statistics
    worth freezing.

Defaults: AdamW at 1e-3, 30 epochs, early stopping on validation loss (``--patience``).
"""

from __future__ import annotations

import torch

from transferlab.engine import Stage, TrainSetup, run_setup
from transferlab.heads import build_head
from transferlab.model import timm_body_recipe
from transferlab.preprocess import Preprocess
from transferlab.progress import info
from transferlab.scratch import build_scratch_body, scratch_recipe
from transferlab.strategies import StrategyContext, StrategyResult

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "prepare_basic",
    "prepare_regularized",
    "prepare_timm",
    "run_basic",
    "run_regularized",
    "run_timm",
]

DEFAULT_IMAGE_SIZE = 150  # the tutorial's
DEFAULT_EPOCHS = 30
DEFAULT_LR = 1e-3
_MEAN_STD = (0.5, 0.5, 0.5)


def _linear_head(in_features: int, num_classes: int) -> tuple[torch.nn.Module, dict]:
    spec = {"kind": "linear", "in_features": int(in_features), "num_classes": int(num_classes)}
    return build_head(spec), spec


def _stage(ctx: StrategyContext, name: str) -> Stage:
    cfg = ctx.config
    return Stage(name, cfg.epochs or DEFAULT_EPOCHS, "all", lr=cfg.lr or DEFAULT_LR, bn="train")


def _prepare_cnn(ctx: StrategyContext, name: str) -> TrainSetup:
    from transferlab.model import ClassifierNet

    size = ctx.config.image_size or DEFAULT_IMAGE_SIZE
    recipe = scratch_recipe(name, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.config.seed)  # the random init is part of the seeded run
        body = build_scratch_body(recipe)
        head, spec = _linear_head(body.num_features, len(ctx.classes))
    preprocess = Preprocess(input_size=(size, size), crop_pct=1.0, mean=_MEAN_STD, std=_MEAN_STD)
    return TrainSetup(
        net=ClassifierNet(body, head),
        preprocess=preprocess,
        stages=[_stage(ctx, f"scratch-{name}")],
        augment=ctx.config.augment or "none",
        body={"spec": f"scratch:{name}", "recipe": recipe},
        head=spec,
    )


def prepare_basic(ctx: StrategyContext) -> TrainSetup:
    return _prepare_cnn(ctx, "basic")


def prepare_regularized(ctx: StrategyContext) -> TrainSetup:
    return _prepare_cnn(ctx, "regularized")


def prepare_timm(ctx: StrategyContext) -> TrainSetup:
    from transferlab.backbones import create_backbone
    from transferlab.model import ClassifierNet

    cfg = ctx.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(cfg.backbone, pretrained=False)
        head, spec = _linear_head(backbone.num_features, len(ctx.classes))
    preprocess = backbone.preprocess
    if cfg.image_size:
        size = (cfg.image_size, cfg.image_size)
        preprocess = Preprocess.from_dict({**preprocess.to_dict(), "input_size": size})
    if cfg.bn != "train":
        info("scratch-timm trains BatchNorm statistics (a random init has none to freeze)")
    return TrainSetup(
        net=ClassifierNet(backbone.model, head),
        preprocess=preprocess,
        stages=[_stage(ctx, "scratch-timm")],
        augment=cfg.augment or "light",
        body={"spec": backbone.spec, "recipe": timm_body_recipe(backbone.spec, backbone.model)},
        head=spec,
    )


def run_basic(ctx: StrategyContext) -> StrategyResult:
    return run_setup(ctx, prepare_basic(ctx))


def run_regularized(ctx: StrategyContext) -> StrategyResult:
    return run_setup(ctx, prepare_regularized(ctx))


def run_timm(ctx: StrategyContext) -> StrategyResult:
    return run_setup(ctx, prepare_timm(ctx))
