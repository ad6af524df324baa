"""The training engine: end-to-end training of a ``ClassifierNet`` on image files, in stages.

Lightning Fabric launches the ranks; the loop, the stages and the checkpoints are transferlab's:

* :mod:`~transferlab.engine.stages` what a :class:`Stage` trains (a JSON-able
  :class:`StagePlan`: trainable parameters, frozen modules, where autograd starts, parameter
  groups), frozen modules held in eval mode and under no_grad;
* :mod:`~transferlab.engine.optim` the optimizer over a plan's groups (the LR schedules are
  :func:`transferlab.training.lr_factor`, shared with the head trainer);
* :mod:`~transferlab.engine.batchnorm` real BN statistics for checkpoints with folded
  placeholders, before BN trains;
* :mod:`~transferlab.engine.checkpoint` atomic, checked checkpoints bound to their run's options
  and data (``--resume`` refuses another run's);
* :mod:`~transferlab.engine.loaders` per-item seeded data, sharded over ranks;
* :mod:`~transferlab.engine.loop` the trainer: stages, epochs, validation, best epoch, early
  stopping, history; :mod:`~transferlab.engine.sweep` its lr-find mode (an exponential LR sweep
  over the same steps);
* :mod:`~transferlab.engine.launch` :func:`train`, the entry point.
"""

from __future__ import annotations

from transferlab.config import BN_POLICIES, OPTIMIZERS, SCHEDULES
from transferlab.engine.batchnorm import has_placeholder_bn, recalibrate_bn
from transferlab.engine.checkpoint import (
    BEST_CKPT,
    CHECKPOINT_DIR,
    HISTORY_CSV,
    LAST_CKPT,
    RESUMABLE_OPTIONS,
    load_checkpoint,
    resume_config,
)
from transferlab.engine.launch import TrainResult, is_global_zero, train
from transferlab.engine.loaders import default_workers
from transferlab.engine.loop import MONITORS
from transferlab.engine.optim import build_optimizer
from transferlab.engine.stages import (
    Stage,
    StagePlan,
    apply_plan,
    body_stages,
    grad_boundary,
    plan_stage,
    set_train_mode,
)
from transferlab.engine.sweep import LRCurve, sweep_lr

__all__ = [
    "BEST_CKPT",
    "BN_POLICIES",
    "CHECKPOINT_DIR",
    "HISTORY_CSV",
    "LAST_CKPT",
    "MONITORS",
    "OPTIMIZERS",
    "RESUMABLE_OPTIONS",
    "SCHEDULES",
    "LRCurve",
    "Stage",
    "StagePlan",
    "TrainResult",
    "apply_plan",
    "body_stages",
    "build_optimizer",
    "default_workers",
    "grad_boundary",
    "has_placeholder_bn",
    "is_global_zero",
    "load_checkpoint",
    "plan_stage",
    "recalibrate_bn",
    "resume_config",
    "set_train_mode",
    "sweep_lr",
    "train",
]
