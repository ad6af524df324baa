"""Fine-tuning, fastai-style, in two phases.

1. **Head on the frozen base**: ``features.fit_head_on_features`` (cached bottleneck features +
   L-BFGS logistic head, or the MLP head): seconds, and it gives phase 2 a trained head, so the
   unfrozen body never receives the large, random gradients of an untrained head.
2. **Unfreeze** the top ``--unfreeze`` stages of the body (``all`` = the whole body) and train end
   to end on augmented images (default ``light``): head LR ``--lr`` (default 1e-3), body LR
   ``lr * --lr-mult`` (default 0.1), ``--epochs`` (default 5). Frozen stages run under no_grad.
   ``--gradual`` unfreezes one more stage per epoch (top stage first) until ``--unfreeze`` stages
   train, each epoch a stage with its own schedule, then keeps training those. ``--bn`` is the
   BatchNorm policy: ``frozen`` (default; eval-mode statistics, the only safe choice on weights
   with folded BN constants) or ``train`` (placeholder statistics are re-estimated first, see
   ``engine.recalibrate_bn``).

The body is a private copy of the backbone: the context's backbone is shared by every rung of a
ladder and must stay untouched.
"""

from __future__ import annotations

import copy
import time

from transferlab.config import FitConfig
from transferlab.engine import Stage, body_stages
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.strategies.base import StrategyContext, TrainSetup, body_record
from transferlab.strategies.features import fit_head_on_features

__all__ = ["DEFAULT_AUGMENT", "DEFAULT_EPOCHS", "DEFAULT_LR", "parse_unfreeze", "prepare"]

DEFAULT_EPOCHS = 5
DEFAULT_LR = 1e-3
DEFAULT_AUGMENT = "light"


def parse_unfreeze(value: str | int, n_stages: int) -> int:
    """``--unfreeze`` -> number of top stages (``all`` -> every stage)."""
    text = str(value).strip().lower()
    if text == "all":
        return n_stages
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise TransferlabError(
            f"--unfreeze {value!r}: give a number of top stages >= 1 (this backbone has "
            f"{n_stages}) or 'all'"
        )
    return min(k, n_stages)


def _stages(cfg: FitConfig, n_stages: int) -> list[Stage]:
    """One stage, or with ``--gradual`` one more unfrozen stage per epoch up to ``--unfreeze``."""
    k = parse_unfreeze(cfg.unfreeze, n_stages)
    whole = str(cfg.unfreeze).strip().lower() == "all"
    epochs = DEFAULT_EPOCHS if cfg.epochs is None else cfg.epochs
    lr = DEFAULT_LR if cfg.lr is None else cfg.lr
    hyper = {"lr": lr, "lr_mult": cfg.lr_mult, "bn": cfg.bn}

    def trainable(j: int) -> int | str:
        return "all" if whole and j == k else j  # "all" also trains parameters outside stages

    if not cfg.gradual:
        return [Stage("finetune", epochs, trainable(k), **hyper)]
    steps = min(k, epochs)
    stages = [Stage(f"unfreeze-{j}", 1, trainable(j), **hyper) for j in range(1, steps)]
    stages.append(Stage(f"unfreeze-{steps}", epochs - steps + 1, trainable(steps), **hyper))
    return stages


def prepare(ctx: StrategyContext) -> TrainSetup:
    """Phase 1 (head on cached features) and the phase-2 plan, ready for the engine."""
    cfg = ctx.config
    backbone, _ = ctx.pretrained()
    t0 = time.perf_counter()
    fitted, _ = fit_head_on_features(ctx)
    phase1_s = time.perf_counter() - t0
    body = copy.deepcopy(backbone.model)
    net = ClassifierNet(body, copy.deepcopy(fitted.module))
    stages = _stages(cfg, len(body_stages(body)))
    selected = next((r for r in fitted.history if r.get("selected")), None)
    return TrainSetup(
        net=net,
        preprocess=backbone.preprocess,
        stages=stages,
        augment=DEFAULT_AUGMENT if cfg.augment is None else cfg.augment,
        body=body_record(backbone, frozen=False),
        head=fitted.spec,
        info={
            "phase1_s": phase1_s,
            "phase1_val_acc": None if selected is None else selected.get("val_acc"),
            "bn": cfg.bn,
            "unfreeze": str(cfg.unfreeze),
            "gradual": cfg.gradual,
        },
    )
