"""Learning-rate finder: an exponential LR sweep over real training batches (fastai/Lightning).

The sweep is the engine's lr-find mode (:func:`transferlab.engine.sweep_lr`): the engine's
training steps for up to ``num_it`` mini-batches while the LR grows from ``start`` to ``end``,
recording the loss smoothed by an exponential moving average with bias correction (beta 0.98),
stopping early once the smoothed loss exceeds 4x its minimum (divergence) or is not finite. This
module feeds it, puts the network back and answers with fastai's suggestions:

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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab.augment import build_transform, draft_size
from transferlab.config import FitConfig
from transferlab.data.dataset import ImageDataset, collate
from transferlab.data.prepared import Split
from transferlab.engine import LRCurve, Stage, sweep_lr
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.preprocess import Preprocess
from transferlab.strategies import STRATEGIES, StrategyContext
from transferlab.system import tune_glibc_malloc

__all__ = ["lr_find", "lr_find_strategy", "suggestions"]

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
    curve = LRCurve(start, end, num_it)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            batches = _cycle(_loader(train, preprocess, config, augment))
            sweep_lr(net, batches, stage, config, device, curve)
    finally:
        snapshot.restore(net)
    lrs, losses = curve.lrs, curve.losses
    result = {
        "suggestions": suggestions(lrs, losses),
        "lrs": lrs,
        "losses": losses,
        "diverged": curve.diverged,
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


def _loader(
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


def _cycle(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, pass after pass (a fresh shuffle each pass), for as long as asked.

    Each pass takes exactly ``len(loader)`` batches and starts the next without running the
    previous one to its end, which would draw from the shuffle's generator once more."""
    while True:
        batches = iter(loader)
        for _ in range(len(loader)):
            yield next(batches)


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
