"""Fine-tuning in two phases, LP-FT style (linear probe, then fine-tune; Kumar et al. 2022).

1. **Head on the frozen base**: ``features.fit_head_on_features`` (cached bottleneck features +
   L-BFGS logistic head, or the MLP head): seconds, and it gives phase 2 a trained head, so the
   unfrozen body never receives the large, random gradients of an untrained head.
2. **Unfreeze** the top ``--unfreeze`` stages of the body (``all`` = the whole body) and train end
   to end on augmented images (default ``light``) at a *small* LR for head and body alike
   (``--lr``, default 2e-5; body ``lr * --lr-mult``, default 1) for ``--epochs`` (default 2;
   defaults in ``config.STRATEGY_DEFAULTS``): the phase-1 head is already at its optimum. On
   cats_vs_dogs_small a larger LR (1e-3 head / 1e-4 body, or 1e-4 for both) raised the val loss
   from phase 1's 0.028 to 0.04-0.06 (distorted features, 700 images overfit); 2e-5 lowered it
   (best in epoch 1 of 2). Frozen stages run under no_grad. ``--gradual`` unfreezes one more
   stage per epoch (top stage first) until ``--unfreeze`` stages train, each epoch a stage with
   its own schedule, then keeps training those. ``--bn`` is the BatchNorm policy: ``frozen``
   (default; eval-mode statistics, the only safe choice on weights with folded BN constants) or
   ``train`` (placeholder statistics are re-estimated first, see ``engine.recalibrate_bn``).

**Never below phase 1 on val.** Phase 1's val log loss and accuracy (from its cached-feature
probabilities, free) are the first stage's ``baseline``: the phase-1 network competes as epoch
0, and a fine-tuned epoch replaces it only with a lower val loss and no lower val accuracy. A run
whose ``best_epoch`` is 0 kept the phase-1 head (``info["phase1_val"]`` holds its figures): the
fine-tuning cost time and bought nothing on this data.

The body is a private copy of the backbone: the context's backbone is shared by every rung of a
ladder and must stay untouched.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from transferlab.config import FitConfig
from transferlab.engine import Stage, body_stages
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.strategies.base import StrategyContext, TrainSetup, body_record
from transferlab.strategies.features import fit_head_on_features

__all__ = ["parse_unfreeze", "phase1_baseline", "prepare"]

# epochs, lr and augmentation default per strategy: config.STRATEGY_DEFAULTS


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


def phase1_baseline(probs: np.ndarray | None, labels: np.ndarray) -> dict[str, float] | None:
    """Phase 1's val log loss and accuracy (from its cached-feature probabilities). The loss is
    rounded so a resumed run, which recomputes it, still matches the checkpoint's stages; the
    accuracy is a ratio of counts and stays exact (it is the floor a fine-tuned epoch must meet)."""
    if probs is None or not len(labels):
        return None
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
    return {
        "val_loss": round(float(-np.log(p_true).mean()), 6),
        "val_acc": float((probs.argmax(1) == labels).mean()),
    }


def _stages(cfg: FitConfig, n_stages: int, baseline: dict[str, float] | None = None) -> list[Stage]:
    """One stage, or with ``--gradual`` one more unfrozen stage per epoch up to ``--unfreeze``;
    the first carries phase 1's ``baseline`` (its weights stay the result unless beaten)."""
    k = parse_unfreeze(cfg.unfreeze, n_stages)
    whole = str(cfg.unfreeze).strip().lower() == "all"
    epochs = cfg.resolved("epochs")
    hyper = {"lr": cfg.resolved("lr"), "lr_mult": cfg.lr_mult, "bn": cfg.bn}

    def trainable(j: int) -> int | str:
        return "all" if whole and j == k else j  # "all" also trains parameters outside stages

    if not cfg.gradual:
        stages = [Stage("finetune", epochs, trainable(k), **hyper)]
    else:
        steps = min(k, epochs)
        stages = [Stage(f"unfreeze-{j}", 1, trainable(j), **hyper) for j in range(1, steps)]
        stages.append(Stage(f"unfreeze-{steps}", epochs - steps + 1, trainable(steps), **hyper))
    stages[0].baseline = baseline
    return stages


def prepare(ctx: StrategyContext) -> TrainSetup:
    """Phase 1 (head on cached features) and the phase-2 plan, ready for the engine."""
    cfg = ctx.config
    backbone, _ = ctx.pretrained()
    t0 = time.perf_counter()
    fitted, probs = fit_head_on_features(ctx)
    phase1_s = time.perf_counter() - t0
    body = copy.deepcopy(backbone.model)
    net = ClassifierNet(body, copy.deepcopy(fitted.module))
    val_labels = ctx.val.labels if ctx.val is not None else np.zeros(0, dtype=np.int64)
    baseline = phase1_baseline(probs.get("val"), val_labels)
    stages = _stages(cfg, len(body_stages(body)), baseline)
    selected = next((r for r in fitted.history if r.get("selected")), None)
    return TrainSetup(
        net=net,
        preprocess=backbone.preprocess,
        stages=stages,
        augment=cfg.resolved("augment"),
        body=body_record(backbone, frozen=False),
        head=fitted.spec,
        info={
            "phase1_s": phase1_s,
            "phase1_val_acc": None if selected is None else selected.get("val_acc"),
            # best_epoch 0 in the result = fine-tuning did not beat this: phase 1 is the model
            "phase1_val": baseline,
            "bn": cfg.bn,
            "unfreeze": str(cfg.unfreeze),
            "gradual": cfg.gradual,
        },
    )
