"""Stages and what they mean for one network: trainable parameters, frozen modules, autograd.

A :class:`Stage` says what trains (``"head"``, the top ``K`` body stages, or ``"all"``), at which
LR (body LR = ``lr * lr_mult``) and with which BatchNorm policy; the first stage may also carry
the val ``baseline`` of the starting weights, which then compete for the best epoch as epoch 0.
:func:`plan_stage` turns it into a JSON-able :class:`StagePlan` (trainable parameter names,
modules held in eval mode, where autograd starts, parameter groups with their LRs); the plan is
stored in every checkpoint and *restored from it* on resume, so a resumed run can never silently
re-freeze or re-group (Lightning #21901 / #6891).

Frozen means frozen: modules of frozen stages run in eval mode and *under no_grad* (autograd
starts at the first trainable stage), so a frozen stage costs a forward pass only. ``bn="frozen"``
additionally keeps every BatchNorm of the body in eval mode (running statistics untouched); their
affine parameters still train where their stage trains. Modes are re-applied after every
``train()`` call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.backbones import stage_modules
from transferlab.config import BN_POLICIES, FitConfig
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet


@dataclass
class Stage:
    """One phase of training. ``trainable``: ``"head"``, ``"all"`` or K (the top K body stages)."""

    name: str
    epochs: int
    trainable: str | int = "all"
    lr: float = 1e-3
    lr_mult: float = 1.0  # body LR = lr * lr_mult (the head trains at lr)
    bn: str = "frozen"  # frozen: every body BatchNorm in eval mode | train
    # First stage only: {"val_loss", "val_acc"} of the weights training starts from (e.g. a head
    # fitted on cached features). They compete as epoch 0: an epoch replaces them only if it
    # beats them on the monitor without a lower val_acc, so training never ends worse on val.
    baseline: dict[str, float] | None = None

    def check(self) -> Stage:
        ok_trainable = self.trainable in ("head", "all") or (
            isinstance(self.trainable, int) and self.trainable >= 1
        )
        if not ok_trainable:
            raise TransferlabError(
                f"stage {self.name!r}: trainable must be 'head', 'all' or a number of top stages "
                f">= 1; got {self.trainable!r}"
            )
        if int(self.epochs) < 1:
            raise TransferlabError(f"stage {self.name!r}: epochs must be >= 1; got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.lr_mult > 0:
            raise TransferlabError(
                f"stage {self.name!r}: lr and lr_mult must be positive; got {self.lr}, "
                f"{self.lr_mult}"
            )
        if self.bn not in BN_POLICIES:
            raise TransferlabError(f"--bn {self.bn!r} is unknown; choose one of {BN_POLICIES}")
        if self.baseline is not None and (
            set(self.baseline) != {"val_loss", "val_acc"}
            or not all(math.isfinite(v) for v in self.baseline.values())
        ):
            raise TransferlabError(
                f"stage {self.name!r}: baseline must be finite val_loss and val_acc; got "
                f"{self.baseline!r}"
            )
        return self


@dataclass
class StagePlan:
    """What a stage means for one network, by name (JSON-able; stored in checkpoints)."""

    trainable: list[str]  # parameter names that require grad
    eval_modules: list[str]  # module names held in eval mode while training
    grad_from: str | None  # module where autograd starts (None: everywhere, "head": the head)
    groups: list[dict[str, Any]]  # {"name", "lr", "weight_decay", "params": [names]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagePlan:
        return cls(
            trainable=list(d["trainable"]),
            eval_modules=list(d["eval_modules"]),
            grad_from=d["grad_from"],
            groups=[dict(g) for g in d["groups"]],
        )


def body_stages(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The body's stages, stem first (timm's group matcher; top-level children otherwise)."""
    return stage_modules(body)


def _real_modules(stage: nn.Module, stage_name: str) -> list[nn.Module]:
    # backbones.stage_modules returns several sibling modules as an nn.ModuleList named "a+b"
    return list(stage) if "+" in stage_name and isinstance(stage, nn.ModuleList) else [stage]


def _chosen_stages(net: ClassifierNet, stage: Stage) -> list[tuple[str, nn.Module]]:
    stages = body_stages(net.body)
    if stage.trainable == "all":
        return stages
    if stage.trainable == "head":
        return []
    return stages[max(0, len(stages) - int(stage.trainable)) :]


def plan_stage(net: ClassifierNet, stage: Stage, config: FitConfig) -> StagePlan:
    """Resolve ``stage`` against ``net``: trainable names, eval modules, autograd start, groups."""
    stage.check()
    module_name = {id(m): n for n, m in net.named_modules()}
    chosen = _chosen_stages(net, stage)
    chosen_names = {n for n, _ in chosen}
    frozen = [(n, m) for n, m in body_stages(net.body) if n not in chosen_names]
    if stage.trainable == "all":
        trainable_ids = {id(p) for p in net.parameters()}
    else:
        trainable_ids = {id(p) for p in net.head.parameters()}
        for _, mod in chosen:
            trainable_ids |= {id(p) for p in mod.parameters()}
    eval_modules = [module_name[id(m)] for n, s in frozen for m in _real_modules(s, n)]
    if stage.trainable == "head":
        eval_modules = ["body"]
    if stage.bn == "frozen":
        eval_modules += [
            module_name[id(m)] for m in net.body.modules() if isinstance(m, _BatchNorm)
        ]
    if stage.trainable == "all":
        grad_from = None
    elif not chosen:
        grad_from = "head"
    else:
        name, mod = chosen[0]
        grad_from = module_name[id(_real_modules(mod, name)[0])]
    named = list(net.named_parameters())
    return StagePlan(
        trainable=[n for n, p in named if id(p) in trainable_ids],
        eval_modules=sorted(set(eval_modules)),
        grad_from=grad_from,
        groups=_param_groups(named, trainable_ids, stage, config.weight_decay),
    )


def _param_groups(
    named: list[tuple[str, nn.Parameter]], trainable_ids: set[int], stage: Stage, wd: float
) -> list[dict[str, Any]]:
    """head/body x decay/no_decay: no weight decay on norm weights and biases (1-d tensors)."""
    buckets: dict[str, list[str]] = {}
    for n, p in named:
        if id(p) not in trainable_ids:
            continue
        part = "head" if n.startswith("head.") else "body"
        key = part if p.ndim > 1 else f"{part}_no_decay"
        buckets.setdefault(key, []).append(n)
    groups = []
    for key in ("head", "head_no_decay", "body", "body_no_decay"):
        if key in buckets:
            lr = stage.lr if key.startswith("head") else stage.lr * stage.lr_mult
            decay = 0.0 if key.endswith("no_decay") else float(wd)
            groups.append({"name": key, "lr": lr, "weight_decay": decay, "params": buckets[key]})
    return groups


def apply_plan(net: ClassifierNet, plan: StagePlan) -> int:
    """Set ``requires_grad`` from the plan; returns the number of trainable parameters."""
    wanted = set(plan.trainable)
    count = 0
    for n, p in net.named_parameters():
        p.requires_grad_(n in wanted)
        count += p.numel() if n in wanted else 0
    return count


def set_train_mode(net: nn.Module, plan: StagePlan, training: bool = True) -> None:
    """``net.train(training)`` then hold the plan's eval modules (frozen stages, frozen BN)."""
    net.train(training)
    if training:
        for name in plan.eval_modules:
            net.get_submodule(name).eval()


class _GradBoundary:
    """Autograd off from the body's input up to ``grad_from``, restored at the body's output.

    Frozen bottom stages then run like inference: no graph, no saved activations, no backward.
    """

    def __init__(self, net: ClassifierNet, grad_from: str | None) -> None:
        self._saved: list[bool] = []
        self._handles = []
        if grad_from is None:
            return
        self._handles = [
            net.body.register_forward_pre_hook(self._enter),
            net.body.register_forward_hook(self._exit),
        ]
        if grad_from != "head":
            target = net.get_submodule(grad_from)
            self._handles.append(target.register_forward_pre_hook(self._resume))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def _resume(self, module: nn.Module, args: Any) -> None:
        if self._saved:
            torch.set_grad_enabled(self._saved[-1])

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(self._saved.pop())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def grad_boundary(net: ClassifierNet, plan: StagePlan) -> Iterator[None]:
    """Install the plan's no-grad region for the duration of the block."""
    boundary = _GradBoundary(net, plan.grad_from)
    try:
        yield
    finally:
        boundary.remove()


def check_gradients(net: nn.Module, plan: StagePlan) -> None:
    """After a stage's first backward: every trainable parameter must have received a gradient.

    A parameter without one sits below the no-grad boundary (an architecture whose stages do not
    run in stem-to-head order) and would silently never train.
    """
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable parameters got no gradient (e.g. {missing[:3]}); autograd "
            f"starts at {plan.grad_from!r}, which this architecture runs after them"
        )
