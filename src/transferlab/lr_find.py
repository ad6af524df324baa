"""Learning-rate finder: an exponential LR sweep over real training batches (fastai/Lightning).

The sweep trains for up to ``num_it`` mini-batches while the LR grows from ``start`` to ``end``,
records the loss smoothed by an exponential moving average with bias correction (beta 0.98), and
stops early once the smoothed loss exceeds 4x its minimum (divergence) or is not finite. It
answers with fastai's suggestions:

``valley``   the middle of the longest stretch over which the loss keeps falling (fastai's default,
             robust to noisy curves);
``steep``    the steepest descent of the smoothed loss against log(LR);
``minimum``  the LR of the lowest smoothed loss, divided by 10.

The first 10 % of the points and the last 5 are ignored for the suggestions (warm-up noise, and
the blow-up). Afterwards the network is exactly as it was: weights and buffers (BatchNorm
statistics), ``requires_grad`` flags, each module's train/eval mode and the device; the caller's
global RNG state is untouched (the sweep draws from its own stream).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab.augment import build_transform, draft_size
from transferlab.config import FitConfig
from transferlab.data.dataset import ImageDataset, collate, raise_if_failed
from transferlab.data.prepared import Split
from transferlab.engine import (
    Stage,
    apply_plan,
    build_optimizer,
    grad_boundary,
    plan_stage,
    set_train_mode,
)
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.preprocess import Preprocess
from transferlab.strategies import STRATEGIES, StrategyContext
from transferlab.system import tune_glibc_malloc

__all__ = ["lr_find", "lr_find_strategy", "suggestions"]

_BETA = 0.98
_DIVERGENCE = 4.0
_SKIP_END = 5


def lr_find(
    net: ClassifierNet,
    train: Split,
    *,
    preprocess: Preprocess,
    config: FitConfig,
    out_png: str | os.PathLike[str] | None,
    start: float = 1e-7,
    end: float = 10.0,
    num_it: int = 100,
    stage: Stage | None = None,
    augment: str | None = None,
) -> dict[str, Any]:
    """Sweep the LR over ``num_it`` batches; returns ``{suggestions, lrs, losses, ...}``.

    ``stage`` says what trains during the sweep (default: everything, ``config.bn``); the swept
    value is the head LR, the body gets ``lr * stage.lr_mult``. ``augment`` defaults to
    ``config.augment`` or none. The plot (loss vs LR, suggestions marked) goes to ``out_png``.
    """
    if not (0 < start < end) or num_it < 2:
        raise TransferlabError("lr_find needs 0 < start < end and num_it >= 2")
    stage = replace(stage or Stage("lr-find", 1, "all", bn=config.bn), lr=1.0)
    snapshot = _Snapshot(net)
    device = _device(config)
    tune_glibc_malloc()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            lrs, losses, diverged = _sweep(
                net, train, preprocess, config, stage, augment, device, (start, end, num_it)
            )
    finally:
        snapshot.restore(net)
    result = {
        "suggestions": suggestions(lrs, losses),
        "lrs": lrs,
        "losses": losses,
        "diverged": diverged,
        "num_it": len(lrs),
    }
    if out_png is not None:
        result["plot"] = str(_plot(lrs, losses, result["suggestions"], Path(out_png)))
    return result


def lr_find_strategy(
    ctx: StrategyContext, out_png: str | os.PathLike[str] | None, **options: Any
) -> dict[str, Any]:
    """``lr_find`` on the network ``ctx.config.strategy`` would train, as it would train it.

    For ``finetune`` that is phase 2 (after the cached head fit): its last stage's unfrozen set,
    ``lr_mult`` and BN policy, with its augmentation. ``options`` go to :func:`lr_find`.
    """
    prepare = STRATEGIES[ctx.config.strategy].prepare
    if prepare is None:
        trained = [name for name, spec in STRATEGIES.items() if spec.prepare is not None]
        raise TransferlabError(
            f"lr-find needs a strategy trained by gradient descent ({', '.join(trained)}); "
            f"--strategy {ctx.config.strategy} has no learning rate to find"
        )
    setup = prepare(ctx)
    return lr_find(
        setup.net,
        ctx.train,
        preprocess=setup.preprocess,
        config=ctx.config,
        out_png=out_png,
        stage=setup.stages[-1],
        augment=setup.augment,
        **options,
    )


class _Snapshot:
    """Everything the sweep changes, to put back afterwards."""

    def __init__(self, net: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.grad = {n: p.requires_grad for n, p in net.named_parameters()}
        self.modes = {n: m.training for n, m in net.named_modules()}
        first = next(net.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def restore(self, net: nn.Module) -> None:
        net.to(self.device, memory_format=torch.contiguous_format)
        net.load_state_dict(self.state)
        for n, p in net.named_parameters():
            p.requires_grad_(self.grad[n])
            p.grad = None
        for n, m in net.named_modules():
            m.training = self.modes[n]


def _device(config: FitConfig) -> torch.device:
    if config.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _batches(
    train: Split, preprocess: Preprocess, config: FitConfig, augment: str | None
) -> DataLoader:
    preset = augment or config.augment or "none"
    ds = ImageDataset(
        train.paths,
        train.labels,
        build_transform(preset, preprocess, train=True),
        config.max_pixels,
        draft=draft_size(preprocess),
    )
    gen = torch.Generator().manual_seed(config.seed)
    # in-process decoding: the sweep is short and must not fork workers that hold a model copy
    return DataLoader(
        ds, batch_size=config.batch_size, shuffle=True, generator=gen, collate_fn=collate
    )


def _sweep(
    net: ClassifierNet,
    train: Split,
    preprocess: Preprocess,
    config: FitConfig,
    stage: Stage,
    augment: str | None,
    device: torch.device,
    sweep: tuple[float, float, int],
) -> tuple[list[float], list[float], bool]:
    start, end, num_it = sweep
    net.to(device, memory_format=torch.channels_last)
    plan = plan_stage(net, stage, config)
    apply_plan(net, plan)
    optimizer = build_optimizer(net, plan, config)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = _batches(train, preprocess, config, augment)
    set_train_mode(net, plan)
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    with grad_boundary(net, plan):
        for i in range(num_it):
            if i % len(loader) == 0:
                batches = iter(loader)
            batch = next(batches)
            raise_if_failed(batch)
            x, y = batch
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            lr = start * (end / start) ** (i / (num_it - 1))
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr
            with torch.enable_grad():
                loss = criterion(net(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            avg = _BETA * avg + (1 - _BETA) * value
            smooth = avg / (1 - _BETA ** (i + 1))
            lrs.append(lr)
            losses.append(smooth)
            if not math.isfinite(smooth) or smooth > _DIVERGENCE * best:
                return lrs, losses, True
            best = min(best, smooth)
    return lrs, losses, False


def suggestions(lrs: list[float], losses: list[float]) -> dict[str, float | None]:
    """fastai's valley / steep / minimum on the trimmed, finite part of the curve."""
    lo = len(lrs) // 10
    hi = len(lrs) - _SKIP_END if len(lrs) - _SKIP_END - lo >= 3 else len(lrs)
    x = np.asarray(lrs[lo:hi], dtype=np.float64)
    y = np.asarray(losses[lo:hi], dtype=np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return {"valley": None, "steep": None, "minimum": None}
    steep = float(x[int(np.argmin(np.gradient(y, np.log(x))))])
    return {
        "valley": _valley(x, y),
        "steep": steep,
        "minimum": float(x[int(np.argmin(y))] / 10),
    }


def _valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's valley: the longest decreasing run, then halfway into its middle third."""
    n = len(losses)
    run = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[max_end] < run[i]:
                max_end = i
                max_start = max_end - run[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def _plot(lrs: list[float], losses: list[float], marks: dict[str, Any], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(lrs, losses)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (head)")
        ax.set_ylabel("loss (smoothed)")
        finite = [v for v in losses if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 4 * min(finite)))
        for (name, lr), colour in zip(
            marks.items(), ("tab:red", "tab:green", "tab:purple"), strict=False
        ):
            if lr is not None:
                ax.axvline(lr, color=colour, linestyle="--", label=f"{name} {lr:.1e}")
        ax.legend()
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=100)
    finally:
        plt.close(fig)
    return out_png
