"""BatchNorm placeholders (folded constants) -> real statistics, before training with ``bn=train``.

Some checkpoints (the shared tf_quant MobileNets) fold the BN statistics into the affine
parameters and leave placeholders (mean 0, variance 1): fine in eval mode, wrong the moment BN
normalizes by batch statistics. :func:`recalibrate_bn` measures real statistics without changing
the eval-mode function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from transferlab.augment import build_transform, draft_size
from transferlab.config import FitConfig
from transferlab.data.dataset import ImageDataset, collate
from transferlab.data.prepared import Split
from transferlab.preprocess import Preprocess

RECALIBRATION_IMAGES = 256


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
    sums, seen = _input_moments(body, bns, batches)
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


def _input_moments(
    body: nn.Module, bns: list[_BatchNorm], batches: Iterable[torch.Tensor]
) -> tuple[dict[int, list], int]:
    """Per BN: [sum, sum of squares, count] of its input per channel (float64), eval mode."""
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
    return sums, seen


def recalibration_batches(
    split: Split, preprocess: Preprocess, config: FitConfig
) -> Iterator[torch.Tensor]:
    """Up to RECALIBRATION_IMAGES training images (a seeded draw), eval transform, in batches."""
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
