"""The training engine: end-to-end training of a ``ClassifierNet`` on image files, in stages.

Built on Lightning **Fabric** (accelerator, devices, DDP, precision, process launching) with the
loop written here, because transferlab owns the stage logic (B#1, B#2 in docs/prior-art.md):

* A :class:`Stage` says what trains (``"head"``, the top ``K`` body stages, or ``"all"``), at
  which LR (body LR = ``lr * lr_mult``) and with which BatchNorm policy. Each stage is turned into
  a JSON-able :class:`StagePlan` (trainable parameter names, modules held in eval mode, where
  autograd starts, parameter groups with their LRs); the plan is stored in every checkpoint and
  *restored from it* on resume, so a resumed run can never silently re-freeze or re-group
  (Lightning #21901 / #6891).
* A changed trainable set needs a fresh optimizer and a fresh DDP wrapper (DDP registers its
  gradient hooks for the parameters that require grad at wrap time). With Fabric that is one
  ``fabric.setup`` per stage inside one launched process group; with ``Trainer`` it would be one
  ``fit`` (and, under ``ddp_spawn``, one process spawn) per stage.
* Frozen means frozen: modules of frozen stages run in eval mode and *under no_grad* (autograd
  starts at the first trainable stage), so a frozen stage costs a forward pass only. ``bn="frozen"``
  additionally keeps every BatchNorm of the body in eval mode (running statistics untouched);
  their affine parameters still train where their stage trains. Modes are re-applied after every
  ``train()`` call.

Checkpoints (``out/checkpoints/last.ckpt`` each epoch, ``best.ckpt`` on improvement) are plain
dicts of tensors and JSON-able values written atomically (temp file + ``os.replace``), read back
with ``torch.load(weights_only=True)`` and checked (format, keys, shapes, a sha256 of the weights)
before anything is loaded: a truncated or corrupt file is a :class:`TransferlabError` naming it.
``last.ckpt`` alone is enough to resume: it also carries the best weights so far.

Randomness is re-derived at the start of every epoch from ``(seed, epoch, rank)`` (Python,
NumPy, torch, the DataLoader generator that seeds workers, and the sampler's shuffle), so a run
resumed from an epoch boundary draws exactly what the uninterrupted run would have drawn, on
every rank. Augmentation draws are per item: a pure function of ``(seed, epoch, item index)``
(``ImageDataset(seed=...)`` + ``set_epoch``), so they do not depend on the number of DataLoader
workers (which ``_default_workers`` picks from the machine's cores), on the batch or on the rank.
With ``deterministic`` the same command and seed give the same numbers, on any core count.

A checkpoint also records the training-relevant configuration (:func:`resume_config`: every
``FitConfig`` option except where and how fast the run executes) and digests of the training and
validation splits (paths, labels, file digests); ``--resume`` with other options or other data
is refused, naming what differs, before anything is loaded.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, Subset

from transferlab.augment import PRESETS, build_transform, draft_size
from transferlab.config import BN_POLICIES, OPTIMIZERS, SCHEDULES, FitConfig
from transferlab.data.dataset import ImageDataset, collate, raise_if_failed
from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.preprocess import Preprocess
from transferlab.progress import info, progress
from transferlab.storage import atomic_write_text, tensors_digest
from transferlab.system import available_cpus, tune_glibc_malloc

__all__ = [
    "BN_POLICIES",
    "MONITORS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Stage",
    "StagePlan",
    "TrainResult",
    "apply_plan",
    "body_stages",
    "build_optimizer",
    "class_weights",
    "grad_boundary",
    "has_placeholder_bn",
    "is_global_zero",
    "load_checkpoint",
    "lr_factor",
    "plan_stage",
    "recalibrate_bn",
    "resume_config",
    "set_train_mode",
    "train",
    "write_history",
]

MONITORS = {"val_loss": "min", "val_acc": "max"}
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
HISTORY_CSV = "history.csv"
HISTORY_FIELDS = (
    "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "img_per_s"
)  # fmt: skip
CKPT_FORMAT = "transferlab-train-checkpoint"
CKPT_VERSION = 2  # 2: + the run's configuration and data digests (resume refuses a change)
# FitConfig options that may change on --resume: where and how fast the run executes, the time
# budget, and the resume flag itself. Every other option is part of what the run trains.
RESUMABLE_OPTIONS = (
    "resume", "max_time", "accelerator", "devices", "dist_strategy", "precision", "workers",
    "cache_dir", "engine",
)  # fmt: skip
RECALIBRATION_IMAGES = 256
# one-cycle shape (fastai/torch defaults): start at lr/25, end at lr/(25 * 1e4), ramp 25 %
_ONECYCLE_DIV, _ONECYCLE_FINAL_DIV, _ONECYCLE_PCT = 25.0, 1e4, 0.25
_STEP_DECAYS, _STEP_GAMMA = 3, 0.1


@dataclass
class Stage:
    """One phase of training. ``trainable``: ``"head"``, ``"all"`` or K (the top K body stages)."""

    name: str
    epochs: int
    trainable: str | int = "all"
    lr: float = 1e-3
    lr_mult: float = 1.0  # body LR = lr * lr_mult (the head trains at lr)
    bn: str = "frozen"  # frozen: every body BatchNorm in eval mode | train

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


@dataclass
class TrainResult:
    net: ClassifierNet  # best weights loaded, eval mode, CPU
    history: list[dict]
    epochs: int
    best_epoch: int
    seconds: float
    trainable_params: int
    stop_reason: str = "completed"  # completed | early_stop | max_time
    images_per_s: float = 0.0  # training throughput (images/s summed over ranks)
    recalibrated_bn: bool = False


# --------------------------------------------------------------------------------------------
# stages -> plans


def body_stages(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The body's stages, stem first (timm's group matcher; top-level children otherwise)."""
    from transferlab.backbones import stage_modules

    return stage_modules(body)


def _real_modules(stage: nn.Module, stage_name: str) -> list[nn.Module]:
    # backbones.stage_modules returns several sibling modules as an nn.ModuleList named "a+b"
    return list(stage) if "+" in stage_name and isinstance(stage, nn.ModuleList) else [stage]


def plan_stage(net: ClassifierNet, stage: Stage, config: FitConfig) -> StagePlan:
    """Resolve ``stage`` against ``net``: trainable names, eval modules, autograd start, groups."""
    stage.check()
    module_name = {id(m): n for n, m in net.named_modules()}
    stages = body_stages(net.body)
    if stage.trainable == "all":
        chosen: list[tuple[str, nn.Module]] = stages
    elif stage.trainable == "head":
        chosen = []
    else:
        chosen = stages[max(0, len(stages) - int(stage.trainable)) :]
    chosen_names = {n for n, _ in chosen}
    frozen = [(n, m) for n, m in stages if n not in chosen_names]
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


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on each group's base LR at optimizer step ``step`` of ``total`` (per step)."""
    total = max(1, total)
    s = min(step, total - 1)
    if schedule == "onecycle":
        ramp = warmup or max(1, int(_ONECYCLE_PCT * total))
        lo, end = 1 / _ONECYCLE_DIV, 1 / (_ONECYCLE_DIV * _ONECYCLE_FINAL_DIV)
        if s < ramp:
            return lo + (1 - lo) * (1 - math.cos(math.pi * s / ramp)) / 2
        p = (s - ramp) / max(1, total - ramp)
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2
    if s < warmup:
        return (s + 1) / warmup
    if schedule == "cosine":
        p = (s - warmup) / max(1, total - warmup)
        return (1 + math.cos(math.pi * p)) / 2
    if schedule == "step":
        return _STEP_GAMMA ** math.floor(_STEP_DECAYS * s / total)
    if schedule == "constant":
        return 1.0
    raise TransferlabError(f"--schedule {schedule!r} is unknown; choose one of {SCHEDULES}")


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


# --------------------------------------------------------------------------------------------
# BatchNorm placeholders (folded constants) -> real statistics


def _batchnorms(module: nn.Module) -> list[_BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def has_placeholder_bn(body: nn.Module) -> bool:
    """True when every BN holds placeholder statistics (mean 0, var ~1) over folded constants.

    A freshly initialised BN (weight 1 and bias 0 everywhere) has the same statistics but is an
    init, not folded constants, and is left alone.
    """
    bns = _batchnorms(body)
    if not bns:
        return False
    for m in bns:
        if not bool((m.running_mean == 0).all()) or not bool(
            ((m.running_var - 1).abs() <= 1e-3).all()
        ):
            return False
    return any(
        m.affine and not (bool((m.weight == 1).all()) and bool((m.bias == 0).all())) for m in bns
    )


@torch.no_grad()
def recalibrate_bn(body: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace BN statistics with measured ones without changing the eval-mode function.

    For every BN: record the per-channel mean ``mu`` and variance ``var`` of its input over
    ``batches`` (eval mode), then set ``running_mean=mu``, ``running_var=var`` and rescale the
    affine parameters so ``gamma' (x - mu)/sqrt(var+eps) + beta'`` equals the old eval output
    (for the folded placeholders: ``gamma'=sqrt(var+eps)``, ``beta'=beta+mu``, as in the
    weights' MANIFEST). Train-mode BN then normalizes like an ordinary checkpoint. Returns the
    number of images seen.
    """
    bns = _batchnorms(body)
    sums: dict[int, list] = {id(m): [0.0, 0.0, 0] for m in bns}

    def record(m: nn.Module, args: tuple) -> None:
        x = args[0].detach().to(torch.float64)
        acc = sums[id(m)]
        acc[0] = acc[0] + x.sum(dim=(0, 2, 3) if x.ndim == 4 else 0)
        acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3) if x.ndim == 4 else 0)
        acc[2] += x.numel() // x.shape[1]

    was_training = body.training
    body.eval()
    handles = [m.register_forward_pre_hook(record) for m in bns]
    seen = 0
    try:
        device = next(body.parameters()).device
        for x in batches:
            body(x.to(device))
            seen += len(x)
    finally:
        for h in handles:
            h.remove()
        body.train(was_training)
    for m in bns:
        total, total_sq, n = sums[id(m)]
        mu = total / n
        var = (total_sq / n - mu * mu).clamp_min(0)
        old_scale = (m.running_var.double() + m.eps).sqrt()
        weight = m.weight.double() if m.affine else torch.ones_like(mu)
        bias = m.bias.double() if m.affine else torch.zeros_like(mu)
        new_bias = bias + weight * (mu - m.running_mean.double()) / old_scale
        new_weight = weight * (var + m.eps).sqrt() / old_scale
        m.running_mean.copy_(mu)
        m.running_var.copy_(var)
        if m.affine:
            m.weight.copy_(new_weight)
            m.bias.copy_(new_bias)
    return seen


def _recalibration_batches(
    split: Split, preprocess: Preprocess, config: FitConfig
) -> Iterator[torch.Tensor]:
    order = np.random.default_rng(config.seed).permutation(len(split))[:RECALIBRATION_IMAGES]
    ds = ImageDataset(
        [split.paths[i] for i in order],
        split.labels[order],
        build_transform("none", preprocess, train=False),
        config.max_pixels,
        draft=draft_size(preprocess),
    )
    for x, _ in DataLoader(ds, batch_size=config.batch_size, collate_fn=collate):
        yield x.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# checkpoints


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and fully check a training checkpoint; raises TransferlabError naming a bad file."""
    path = Path(path)
    if not path.is_file():
        raise TransferlabError(
            f"{path}: no checkpoint to resume from; run without --resume to start training"
        )
    try:
        with open(path, "rb") as f:
            ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/unpickler errors all mean the same to a user
        raise TransferlabError(
            f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0][:200]}); "
            "delete it and start again without --resume"
        ) from None
    required = (
        "format", "version", "model", "digest", "state", "stages", "plan", "optimizer", "config",
        "setup", "data",
    )  # fmt: skip
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TransferlabError(f"{path}: not a transferlab training checkpoint")
    if ckpt.get("version") != CKPT_VERSION or any(k not in ckpt for k in required):
        raise TransferlabError(
            f"{path}: checkpoint version {ckpt.get('version')} or layout is not supported by this "
            f"transferlab (expects version {CKPT_VERSION})"
        )
    if tensors_digest(ckpt["model"]) != ckpt["digest"]:
        raise TransferlabError(
            f"{path}: checkpoint weights do not match their checksum (corrupt file); "
            "delete it and start again without --resume"
        )
    return ckpt


def _check_weights(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a state that does not fit ``net`` before copying anything (no half-loading)."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        detail = (missing or extra or shapes)[:3]
        raise TransferlabError(
            f"{path}: checkpoint does not fit this model (missing {len(missing)}, unexpected "
            f"{len(extra)}, mismatched shapes {len(shapes)}, e.g. {detail}); it was written by a "
            "different backbone/head: resume with the same command, or start without --resume"
        )


def resume_config(config: FitConfig) -> dict[str, Any]:
    """The options a checkpoint is bound to: ``config.to_dict()`` minus RESUMABLE_OPTIONS."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_OPTIONS}


def _split_digest(split: Split | None) -> dict[str, Any]:
    """A split's identity: its size and a sha256 over (path, label, file digest), in order."""
    if split is None:
        return {"images": 0, "sha256": None}
    h = hashlib.sha256()
    for path, label, digest in zip(split.paths, split.labels, split.digests, strict=True):
        h.update(f"{path}\0{int(label)}\0{digest}\n".encode())
    return {"images": len(split), "sha256": h.hexdigest()}


def _run_identity(
    config: FitConfig, train: Split, val: Split | None, setup: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint records so that ``--resume`` can refuse another run's options or data.

    ``setup``: what the strategy decided beyond the config and the stages (augment preset,
    monitor, min_epochs)."""
    return {
        "config": resume_config(config),
        "setup": setup,
        "data": {"train": _split_digest(train), "val": _split_digest(val)},
    }


_UNSET = object()


def _show(value: Any, other: Any) -> str:
    if value is _UNSET or value is None:
        return "unset"
    return repr(value) if str(value) == str(other) else str(value)


def _check_same_run(ckpt: dict[str, Any], path: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` with other training options or other data, naming each."""
    then, now = ckpt["config"], identity["config"]
    diffs = []
    for key in [*now, *(k for k in then if k not in now)]:
        old, new = then.get(key, _UNSET), now.get(key, _UNSET)
        if old != new:
            option = "--" + key.replace("_", "-")
            diffs.append(f"{option} was {_show(old, new)}, now {_show(new, old)}")
    for key, new in identity["setup"].items():
        old = ckpt["setup"].get(key, _UNSET)
        if old != new:
            diffs.append(f"the strategy's {key} was {_show(old, new)}, now {_show(new, old)}")
    for name, what in (("train", "training"), ("val", "validation")):
        old, new = ckpt["data"].get(name) or {}, identity["data"][name]
        if old != new:
            diffs.append(
                f"the {what} images differ ({old.get('images', '?')} then, {new['images']} now; "
                "file paths, labels or contents changed)"
            )
    if diffs:
        raise TransferlabError(
            f"{path} was written by another run: {'; '.join(diffs)}: resume with the same "
            "options, or start a new --out"
        )


# --------------------------------------------------------------------------------------------
# run state


@dataclass
class _State:
    """Where a run is; JSON-able, saved in every checkpoint."""

    stage_index: int = 0
    stage_epoch: int = 0  # epochs completed in the current stage
    stage_step: int = 0  # optimizer steps taken in the current stage
    epoch: int = 0  # epochs completed overall
    global_step: int = 0
    best_epoch: int = 0
    best_score: float | None = None
    wait: int = 0  # epochs without improvement (early stopping)
    elapsed: float = 0.0  # training seconds so far, across resumes (the max_time budget)
    stop_reason: str | None = None
    trainable_params: int = 0
    images: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


@dataclass
class _Job:
    """Everything a (possibly spawned) training process needs; picklable."""

    train: Split
    val: Split | None
    preprocess: Preprocess
    config: FitConfig
    run_dir: Path
    stages: list[Stage]
    augment: str
    monitor: str
    num_classes: int
    min_epochs: int  # early stopping never stops the run before this many epochs
    caller_pid: int  # a rank in another process hands its weights back through best.ckpt


@dataclass
class _RunOutput:
    best_state: dict[str, torch.Tensor] | None  # None from a spawned process: see best.ckpt
    state: _State


def class_weights(
    labels: np.ndarray | list[int], num_classes: int, mode: str | None
) -> torch.Tensor | None:
    """``--class-weight auto``: the loss weights ``n / (C * count_c)`` of :mod:`transferlab.heads`
    (sklearn's "balanced"), over all ``num_classes`` classes; None without class weighting."""
    if mode is None or mode == "none":
        return None
    from transferlab.heads import _class_weights

    y = np.asarray(labels, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise TransferlabError(
            f"training labels run from {y.min()} to {y.max()}, outside the {num_classes} classes"
        )
    missing = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
    if len(missing):
        raise TransferlabError(
            f"--class-weight auto: class(es) {missing.tolist()} have no training images, so "
            "their weight n / (C * count) is undefined; add images or drop --class-weight"
        )
    return torch.tensor(_class_weights(y, num_classes, mode), dtype=torch.float32)


def _head_outputs(net: ClassifierNet) -> int:
    """The number of logits: the output width of the head's last Linear layer."""
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TransferlabError("train() cannot tell the number of classes: pass num_classes")
    return int(linears[-1].out_features)


def _setup_identity(job: _Job) -> dict[str, Any]:
    return {"augment": job.augment, "monitor": job.monitor, "min_epochs": job.min_epochs}


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_worker(worker_id: int) -> None:
    # torch is already seeded per worker from the loader's generator; extend it to random/numpy
    import random

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def _default_workers(config: FitConfig) -> int:
    if config.workers is not None:
        return max(0, int(config.workers))
    per_rank = max(1, available_cpus() // max(1, _int_devices(config.devices)))
    if config.accelerator in ("gpu", "cuda"):
        return max(1, min(8, per_rank - 1))  # the GPU outruns JPEG decoding: feed it
    # On CPU a JPEG decode costs a few % of a core next to a training step: one or two workers
    # overlap it without taking cores from the model. The choice only changes the speed: the
    # augmentation of every item is seeded by (seed, epoch, index), not by a worker's stream.
    return 1 if per_rank <= 4 else 2


def _int_devices(devices: int | str) -> int:
    try:
        return int(devices)
    except (TypeError, ValueError):
        return 1  # "auto", "-1", lists: one rank's worth is a safe guess


class _Trainer:
    """One process's training loop (one rank under DDP)."""

    def __init__(self, fabric: Any, net: ClassifierNet, job: _Job) -> None:
        self.fabric = fabric
        self.net = net
        self.job = job
        self.cfg = job.config
        self.rank = fabric.global_rank
        self.world = fabric.world_size
        self.ckpt_dir = job.run_dir / CHECKPOINT_DIR
        self.monitor_mode = MONITORS[job.monitor]
        self.generator = torch.Generator()
        self.best_state: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()
        self.state = _State()
        self.resume: dict[str, Any] | None = None
        self.identity = _run_identity(self.cfg, job.train, job.val, _setup_identity(job))
        weight = class_weights(job.train.labels, job.num_classes, self.cfg.class_weight)
        self.criterion = nn.CrossEntropyLoss(
            weight=weight, label_smoothing=self.cfg.label_smoothing
        )
        self.train_loader = self._train_loader()
        self.val_loader = self._val_loader()

    # -- data ---------------------------------------------------------------------------------

    def _dataset(self, split: Split, preset: str, train: bool) -> ImageDataset:
        pre = self.job.preprocess
        return ImageDataset(
            split.paths,
            split.labels,
            build_transform(preset, pre, train=train),
            self.cfg.max_pixels,
            draft=draft_size(pre),
            defer_errors=_default_workers(self.cfg) > 0,
            seed=self.cfg.seed if train else None,  # item draws: (seed, epoch, index)
        )

    def _loader(self, ds: Any, **kw: Any) -> DataLoader:
        workers = _default_workers(self.cfg)
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=_seed_worker if workers else None,
            pin_memory=self.fabric.device.type == "cuda",
            **kw,
        )

    def _train_loader(self) -> DataLoader:
        ds = self.train_set = self._dataset(self.job.train, self.job.augment, train=True)
        self.sampler = DistributedSampler(
            ds, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed
        )
        # a batch of one breaks train-mode BatchNorm: drop it when the last batch would be one
        drop = len(self.sampler) % self.cfg.batch_size == 1 and len(self.sampler) > 1
        return self._loader(ds, sampler=self.sampler, generator=self.generator, drop_last=drop)

    def _val_loader(self) -> DataLoader | None:
        val = self.job.val
        if val is None or len(val) == 0:
            return None
        # Each rank takes every world-th image, without DistributedSampler's padding, so the
        # summed metrics count every validation image exactly once.
        shard = Subset(
            self._dataset(val, "none", train=False), range(self.rank, len(val), self.world)
        )
        return self._loader(shard, shuffle=False)

    # -- run ----------------------------------------------------------------------------------

    def run(self) -> _RunOutput:
        if self.cfg.resume:
            self._restore()
        self.net.to(self.fabric.device, memory_format=torch.channels_last)
        self.criterion.to(self.fabric.device)
        while self.state.stop_reason is None and self.state.stage_index < len(self.job.stages):
            self._run_stage()
        if self.state.stop_reason is None:
            self.state.stop_reason = "completed"
        if not self.best_state:
            self.best_state = _cpu_state(self.net)
        self._save_checkpoints(improved=False)
        self.fabric.barrier()
        # Tensors returned from a spawned process travel as shared-memory handles that die with
        # it (before the caller reads them): such a caller reloads best.ckpt instead.
        in_caller = os.getpid() == self.job.caller_pid
        return _RunOutput(best_state=self.best_state if in_caller else None, state=self.state)

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.ckpt_dir / LAST_CKPT)
        _check_weights(self.net, ckpt["model"], self.ckpt_dir / LAST_CKPT)
        self.net.load_state_dict(ckpt["model"])
        self.state = _State(**ckpt["state"])
        best = ckpt.get("best_model")
        self.best_state = dict(best) if best else _cpu_state(self.net)
        if self.state.stage_epoch >= self.job.stages[self.state.stage_index].epochs:
            self._next_stage()
        else:
            self.resume = ckpt  # the current stage continues: plan + optimizer from the file
        if self.state.stop_reason == "max_time":
            self.state.stop_reason = None  # the budget (restored elapsed time) decides again
        self.started = time.perf_counter() - self.state.elapsed

    def _next_stage(self) -> None:
        self.state.stage_index += 1
        self.state.stage_epoch = 0
        self.state.stage_step = 0

    def _run_stage(self) -> None:
        stage = self.job.stages[self.state.stage_index]
        if self.resume is not None:
            plan = StagePlan.from_dict(self.resume["plan"])
        else:
            plan = plan_stage(self.net, stage, self.cfg)
        count = apply_plan(self.net, plan)
        self.state.trainable_params = max(self.state.trainable_params, count)
        model, optimizer = self.fabric.setup(self.net, build_optimizer(self.net, plan, self.cfg))
        if self.resume is not None:
            try:
                optimizer.load_state_dict(self.resume["optimizer"])
            except (ValueError, KeyError) as e:
                raise TransferlabError(
                    f"{self.ckpt_dir / LAST_CKPT}: optimizer state does not fit this stage ({e})"
                ) from None
            self.resume = None
        with grad_boundary(self.net, plan):
            while self.state.stage_epoch < stage.epochs and self.state.stop_reason is None:
                self._epoch(model, optimizer, plan, stage)
        if self.state.stop_reason is None:
            self._next_stage()
        del model, optimizer  # drop this stage's DDP wrapper (and its gradient hooks)

    def _epoch(self, model: Any, optimizer: Any, plan: StagePlan, stage: Stage) -> None:
        if self._out_of_time():
            self.state.stop_reason = "max_time"
            return
        t0 = time.perf_counter()
        s = _epoch_seed(self.cfg.seed, self.state.epoch, self.rank)
        _seed_all(s)
        self.generator.manual_seed(s)
        self.sampler.set_epoch(self.state.epoch)
        self.train_set.set_epoch(self.state.epoch)  # before the loader's workers fetch items
        train_loss, train_acc, n_images, lr = self._train_epoch(model, optimizer, plan, stage)
        t_train = time.perf_counter() - t0
        val_loss, val_acc = self._validate(plan)
        self.state.stage_epoch += 1
        self.state.epoch += 1
        self.state.images += n_images
        self.state.train_seconds += t_train
        row = {
            "epoch": self.state.epoch,
            "stage": stage.name,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - t0,
            "img_per_s": n_images / t_train if t_train > 0 else 0.0,
        }
        self.state.history.append(row)
        improved = self._track_best(row)
        self.state.elapsed = time.perf_counter() - self.started
        self._save_checkpoints(improved, plan, optimizer)
        self._log(row, stage)

    def _train_epoch(
        self, model: Any, optimizer: Any, plan: StagePlan, stage: Stage
    ) -> tuple[float, float, int, float]:
        steps_per_epoch = len(self.train_loader)
        total = stage.epochs * steps_per_epoch
        warmup = round(self.cfg.warmup_epochs * steps_per_epoch)
        set_train_mode(self.net, plan)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        lr = 0.0
        desc = f"epoch {self.state.epoch + 1} [{stage.name}]"
        with progress(steps_per_epoch if self.rank == 0 else 0, desc) as advance:
            for batch in self.train_loader:
                raise_if_failed(batch)
                x, y = self._to_device(batch)
                f = lr_factor(self.cfg.schedule, self.state.stage_step, total, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * f
                lr = optimizer.param_groups[0]["lr"]
                with torch.enable_grad(), self.fabric.autocast():
                    logits = model(x)
                    loss = self.criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                self.fabric.backward(loss)
                if self.state.stage_step == 0:
                    _check_gradients(self.net, plan)
                optimizer.step()
                self.state.stage_step += 1
                self.state.global_step += 1
                loss_sum += loss.detach().double().cpu() * len(y)
                correct += (logits.detach().argmax(1) == y).sum().cpu()
                seen += len(y)
                advance(1)
                if self._out_of_time():
                    self.state.stop_reason = "max_time"
                    break
        totals = self._sum([float(loss_sum), float(correct), float(seen)])
        n = max(totals[2], 1.0)
        return totals[0] / n, totals[1] / n, int(totals[2]), lr

    @torch.inference_mode()
    def _validate(self, plan: StagePlan) -> tuple[float | None, float | None]:
        if self.val_loader is None:
            return None, None
        set_train_mode(self.net, plan, training=False)
        loss_sum = correct = seen = 0.0
        for batch in self.val_loader:
            raise_if_failed(batch)
            x, y = self._to_device(batch)
            with self.fabric.autocast():
                logits = self.net(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        loss_sum, correct, seen = self._sum([loss_sum, correct, seen])
        return loss_sum / max(seen, 1.0), correct / max(seen, 1.0)

    def _to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        dev = self.fabric.device
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return x, y.to(dev, non_blocking=True)

    def _sum(self, values: list[float]) -> list[float]:
        """Sum over ranks (float64 on CPU: exact counts, gloo-friendly)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            t = self.fabric.all_reduce(t.to(self.fabric.device), reduce_op="sum").cpu()
        return [float(v) for v in t]

    def _out_of_time(self) -> bool:
        if self.cfg.max_time is None:
            return False
        over = torch.tensor([time.perf_counter() - self.started >= self.cfg.max_time])
        if self.world > 1:  # every rank must stop at the same step, or DDP deadlocks
            over = self.fabric.broadcast(over, src=0)
        return bool(over.item())

    # -- best / early stopping / files ---------------------------------------------------------

    def _track_best(self, row: dict) -> bool:
        score = row.get(self.job.monitor)
        if score is None:  # no validation: the latest weights are the result
            self.state.best_epoch = row["epoch"]
            self.best_state = {}
            return True
        best = self.state.best_score
        better = best is None or (score < best if self.monitor_mode == "min" else score > best)
        if better:
            self.state.best_score = float(score)
            self.state.best_epoch = row["epoch"]
            self.state.wait = 0
            self.best_state = _cpu_state(self.net)
            return True
        self.state.wait += 1
        patience = self.cfg.patience
        grace = self.state.epoch < self.job.min_epochs  # e.g. a from-scratch net still at chance
        if patience is not None and self.state.wait >= patience and not grace:
            self.state.stop_reason = "early_stop"
        return False

    def _save_checkpoints(
        self, improved: bool, plan: StagePlan | None = None, optimizer: Any = None
    ) -> None:
        if self.rank != 0:
            return
        model = _cpu_state(self.net)
        digest = tensors_digest(model)
        common = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "stages": [asdict(s) for s in self.job.stages],
            "monitor": self.job.monitor,
            "state": asdict(self.state),
            **self.identity,
        }
        if improved:
            # best first: a kill between the two writes leaves last.ckpt (which carries the best
            # weights itself) consistent
            best = {**common, "model": model, "digest": digest, "plan": {}, "optimizer": {}}
            _atomic_torch_save(best, self.ckpt_dir / BEST_CKPT)
        if plan is None:  # end of run: last.ckpt is already current, best.ckpt holds the result
            best_state = self.best_state or model
            final = {**common, "model": best_state, "digest": tensors_digest(best_state)}
            _atomic_torch_save({**final, "plan": {}, "optimizer": {}}, self.ckpt_dir / BEST_CKPT)
            return
        last = {
            **common,
            "model": model,
            "digest": digest,
            "plan": plan.to_dict(),
            "optimizer": optimizer.state_dict(),
            "best_model": None if improved or not self.best_state else self.best_state,
        }
        _atomic_torch_save(last, self.ckpt_dir / LAST_CKPT)
        write_history(self.job.run_dir / HISTORY_CSV, self.state.history)

    def _log(self, row: dict, stage: Stage) -> None:
        if self.rank != 0:
            return
        total = sum(s.epochs for s in self.job.stages)
        val = (
            f" | val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
            if row["val_loss"] is not None
            else ""
        )
        info(
            f"epoch {row['epoch']}/{total} {escape(f'[{stage.name}]')} "
            f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f}{val} | "
            f"lr {row['lr']:.2e} | "
            f"{row['img_per_s']:.1f} img/s | {row['seconds']:.1f} s"
        )


def _seed_all(seed: int) -> None:
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(seed, verbose=False)


def _check_gradients(net: nn.Module, plan: StagePlan) -> None:
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


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch rows -> ``path`` as CSV (HISTORY_FIELDS), replaced atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _run(fabric: Any, net: ClassifierNet, job: _Job) -> _RunOutput:
    """The launched function (once per rank)."""
    saved = torch.are_deterministic_algorithms_enabled()
    if job.config.deterministic:
        # cuBLAS is only reproducible with a fixed workspace (read when CUDA first initialises)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(job.config.deterministic, warn_only=True)
    try:
        return _Trainer(fabric, net, job).run()
    finally:
        torch.use_deterministic_algorithms(saved)


# --------------------------------------------------------------------------------------------
# entry point


def _check_args(stages: list[Stage], config: FitConfig, augment: str, monitor: str) -> None:
    if not stages:
        raise TransferlabError("train() needs at least one stage")
    for s in stages:
        s.check()
    if augment not in PRESETS:
        raise TransferlabError(f"--augment {augment!r} is unknown; choose one of {PRESETS}")
    if monitor not in MONITORS:
        raise TransferlabError(f"monitor {monitor!r} is unknown; choose one of {list(MONITORS)}")
    config.validate()


def _num_nodes() -> int:
    """Nodes of the SLURM job this process was started in by ``srun`` (1 elsewhere)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return 1
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def _fabric(config: FitConfig) -> Any:
    from lightning.fabric import Fabric

    try:
        return Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.dist_strategy,
            precision=config.precision,
            num_nodes=_num_nodes(),
        )
    except (ValueError, RuntimeError, TypeError) as e:
        raise TransferlabError(
            f"cannot set up --accelerator {config.accelerator} --devices {config.devices} "
            f"--dist-strategy {config.dist_strategy} --precision {config.precision}: {e}"
        ) from None


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a multi-process launch (``srun``, ``torchrun``,
    Fabric's ``ddp`` re-launch); True in a plain single process.

    Under those launchers every rank runs the whole command; only rank 0 should write the run
    folder (``ddp_spawn`` needs no care: the ranks are children of the one command).
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def train(
    net: ClassifierNet,
    train: Split,
    val: Split | None,
    *,
    preprocess: Preprocess,
    config: FitConfig,
    out: Path,
    stages: list[Stage],
    augment: str,
    monitor: str = "val_loss",
    num_classes: int | None = None,
    min_epochs: int = 0,
) -> TrainResult:
    """Train ``net`` through ``stages`` on image files; returns it with the best weights loaded.

    Writes ``out/history.csv`` and ``out/checkpoints/{last,best}.ckpt`` (in a temporary folder,
    deleted afterwards, when ``out`` is ``os.devnull``). ``config.resume`` continues from
    ``out/checkpoints/last.ckpt`` with the stage, frozen set, parameter groups, optimizer,
    schedule position, best weights and early-stopping counter it holds. ``monitor`` (val_loss or
    val_acc) picks the best epoch and drives early stopping (``config.patience``), which never
    stops the run before ``min_epochs`` epochs (Keras' ``start_from_epoch``). A checkpoint
    written with other training options (:func:`resume_config`) or other train/val images is
    refused, naming the differences. ``num_classes`` (default: the head's output width) sizes
    the ``--class-weight auto`` weights.
    """
    _check_args(stages, config, augment, monitor)
    if num_classes is None:
        num_classes = _head_outputs(net)
    scratch_dir = str(out) == os.devnull
    if scratch_dir and config.resume:
        raise TransferlabError("--resume needs the --out folder of the interrupted run")
    run_dir = Path(tempfile.mkdtemp(prefix="transferlab-train-")) if scratch_dir else Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume:
        ckpt = load_checkpoint(run_dir / CHECKPOINT_DIR / LAST_CKPT)  # fail here, not in a rank
        setup = {"augment": augment, "monitor": monitor, "min_epochs": int(min_epochs)}
        identity = _run_identity(config, train, val, setup)
        _check_same_run(ckpt, run_dir / CHECKPOINT_DIR / LAST_CKPT, identity)
        if ckpt["stages"] != [asdict(s) for s in stages]:
            raise TransferlabError(
                f"{run_dir / CHECKPOINT_DIR / LAST_CKPT}: written for other stages "
                f"({[s['name'] for s in ckpt['stages']]}); resume with the same command and options"
            )
        _check_weights(net, ckpt["model"], run_dir / CHECKPOINT_DIR / LAST_CKPT)
    recalibrated = False
    if not config.resume and any(s.bn == "train" for s in stages) and has_placeholder_bn(net.body):
        seen = recalibrate_bn(net.body, _recalibration_batches(train, preprocess, config))
        recalibrated = True
        info(
            f"BN statistics are placeholders (folded constants): re-estimated them on {seen} "
            "training images before training with --bn train (eval output unchanged)"
        )
    tune_glibc_malloc()  # eager PyTorch here is ~2x faster with it (perf-notes.md)
    grad_flags = {n: p.requires_grad for n, p in net.named_parameters()}
    job = _Job(
        train,
        val,
        preprocess,
        config,
        run_dir,
        stages,
        augment,
        monitor,
        num_classes,
        int(min_epochs),
        os.getpid(),
    )
    t0 = time.perf_counter()
    try:
        # The job rides in a partial: Fabric's spawn launcher walks the positional arguments and
        # refuses frozen dataclasses (Preprocess) inside them.
        output: _RunOutput = _fabric(config).launch(functools.partial(_run, job=job), net)
        seconds = time.perf_counter() - t0
        best_state = output.best_state
        if best_state is None:
            best_state = load_checkpoint(run_dir / CHECKPOINT_DIR / BEST_CKPT)["model"]
    finally:
        if scratch_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    net.to("cpu", memory_format=torch.contiguous_format)
    net.load_state_dict(best_state)
    for n, p in net.named_parameters():
        p.requires_grad_(grad_flags[n])
    net.eval()
    st = output.state
    return TrainResult(
        net=net,
        history=st.history,
        epochs=st.epoch,
        best_epoch=st.best_epoch,
        seconds=seconds,
        trainable_params=st.trainable_params,
        stop_reason=st.stop_reason or "completed",
        images_per_s=st.images / st.train_seconds if st.train_seconds > 0 else 0.0,
        recalibrated_bn=recalibrated,
    )
