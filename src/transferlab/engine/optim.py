"""The optimizer over a stage's parameter groups; each group keeps its base LR for the schedule."""

from __future__ import annotations

import torch
from torch import nn

from transferlab.config import OPTIMIZERS, FitConfig
from transferlab.engine.stages import StagePlan
from transferlab.errors import TransferlabError


def build_optimizer(net: nn.Module, plan: StagePlan, config: FitConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the plan's groups; each group keeps its ``base_lr``."""
    params = dict(net.named_parameters())
    groups = [
        {
            "params": [params[n] for n in g["params"]],
            "lr": g["lr"],
            "base_lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "name": g["name"],
        }
        for g in plan.groups
    ]
    if not groups:
        raise TransferlabError("nothing to train: the stage leaves no trainable parameters")
    name = config.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, eps 1e-7); torch's alpha=0.99 averages 10x longer
        return torch.optim.RMSprop(groups, alpha=0.9, eps=1e-7)
    raise TransferlabError(f"--optimizer {name!r} is unknown; choose one of {OPTIMIZERS}")
