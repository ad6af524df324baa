"""What the first layer has learned: its convolution filters, as weights and as a figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.common import minmax, new_figure, save_figure


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """Weights (out, in, k, k) of the first Conv2d in the model, as float32 numpy."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().float().cpu().numpy().copy()
    raise TransferlabError(f"{type(model).__name__} has no Conv2d layer")


def plot_filters(weights: np.ndarray, out_path: str | Path) -> Path:
    """First-layer filters as a grid of tiny images.

    3-channel filters are drawn as RGB after per-filter min-max scaling (so colour-opponent
    and edge filters show up as in the classic AlexNet figure); other filters as the mean over
    their input channels in grey.
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 4:
        raise TransferlabError(f"filters must be (out, in, k, k), got shape {w.shape}")
    n = w.shape[0]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = new_figure((ncols * 0.9 + 0.4, nrows * 0.9 + 0.8))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, ax in enumerate(axes[:n]):
        if w.shape[1] == 3:
            ax.imshow(minmax(w[i]).transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(minmax(w[i].mean(axis=0)), cmap="gray", interpolation="nearest")
    # All-zero filters (pruned/dead, common in quantized checkpoints) show as black tiles.
    dead = int((np.abs(w).reshape(n, -1).max(axis=1) == 0).sum())
    shape = "x".join(str(d) for d in w.shape)
    fig.suptitle(f"first-layer filters ({shape}; {dead} all-zero, shown black)")
    return save_figure(fig, out_path)
