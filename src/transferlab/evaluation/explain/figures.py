"""The explanations as matplotlib Figures for Python and notebooks (the CLI writes PNGs instead,
see :mod:`.files`): a class activation map, feature maps, first-layer filters, a convolution.

Every function takes a picture the way ``Classifier.predict`` does (path, PIL image, NumPy
array, tensor, bytes) and decodes it as files are decoded, so the picture explained is the one
the model sees. Feature maps and filters also take a backbone name instead of a classifier: a
pretrained network is worth looking at before anything is trained on it.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from torch import nn

from transferlab.backbones import create_backbone
from transferlab.data.images import open_rgb
from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.cams import grad_cam, overlay_cam
from transferlab.evaluation.explain.common import minmax, normalize
from transferlab.evaluation.explain.convolution import (
    KERNELS,
    convolution_figure,
    parse_kernel,
    to_grayscale,
)
from transferlab.evaluation.explain.feature_maps import feature_maps as _feature_maps
from transferlab.evaluation.explain.filters import first_layer_filters
from transferlab.evaluation.plots import new_figure
from transferlab.predict.inputs import decode_one, expand, to_picture

if TYPE_CHECKING:
    from transferlab.api import Classifier
    from transferlab.preprocess import Preprocess

__all__ = ["convolve", "explain", "feature_maps", "filters"]


def _network(model: Classifier | str) -> tuple[nn.Module, Preprocess]:
    """(network in eval mode, its preprocessing) of a classifier or a backbone name."""
    if isinstance(model, str):
        backbone = create_backbone(model)
        return backbone.model.eval(), backbone.preprocess
    return model.net.eval(), model.saved.preprocess


def explain(
    clf: Classifier, image: Any, *, target: str | None = None, method: str = "hirescam"
) -> Figure:
    """The picture as the model sees it | where the evidence for a class lies (a class
    activation map, HiResCAM by default). ``target``: the class to explain (default: the
    predicted one)."""
    net, pre = _network(clf)
    arr = decode_one(image, pre)
    if target is not None and target not in clf.classes:
        raise TransferlabError(f"target={target!r} is not a class; have {', '.join(clf.classes)}")
    tc = None if target is None else clf.classes.index(target)
    x = normalize(arr, pre.mean, pre.std)
    cams, used = grad_cam(net, x, target_class=tc, method=method, input_size=pre.input_size)  # type: ignore[arg-type]
    probs = clf.predict_proba(image)[0]  # the same decode as arr: the same picture
    fig = new_figure((8.0, 4.3))
    left, right = fig.subplots(1, 2)
    left.imshow(arr.transpose(1, 2, 0))
    top = int(np.argmax(probs))
    left.set_title(f"predicted {clf.classes[top]} ({probs[top]:.2f})")
    right.imshow(overlay_cam(arr, cams[0]))
    right.set_title(f"{method}: evidence for {clf.classes[int(used[0])]}")
    for ax in (left, right):
        ax.axis("off")
    fig.tight_layout()
    return fig


def feature_maps(
    model: Classifier | str, image: Any, *, stages: list[str] | None = None, channels: int = 8
) -> Figure:
    """A row of ``channels`` feature maps per stage, early to late (default: an early, a middle
    and a late stage), the most active channels first, each scaled on its own."""
    net, pre = _network(model)
    x = normalize(decode_one(image, pre), pre.mean, pre.std)
    maps = _feature_maps(net, x, stages=stages, input_size=pre.input_size)
    fig = new_figure((channels * 1.25 + 1.0, len(maps) * 1.5 + 0.3))
    axes = fig.subplots(len(maps), channels, squeeze=False)
    for row, (name, fmap) in zip(axes, maps.items(), strict=True):
        order = np.argsort(-fmap.mean(axis=(1, 2)), kind="stable")[:channels]
        c, h, w = fmap.shape
        for ax in row:
            ax.axis("off")
        for ax, ch in zip(row, order, strict=False):
            ax.imshow(minmax(fmap[ch]), cmap="viridis", interpolation="nearest")
        row[0].set_title(f"{name}: {c} ch, {h}x{w}", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def filters(model: Classifier | str) -> Figure:
    """The first convolution layer's filters, each min-max scaled (RGB when it reads RGB)."""
    net, _ = _network(model)
    w = first_layer_filters(net)
    n = w.shape[0]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = new_figure((ncols * 0.6 + 0.4, nrows * 0.6 + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, f in zip(axes, w, strict=False):
        img = minmax(f.transpose(1, 2, 0)) if f.shape[0] == 3 else minmax(f.mean(axis=0))
        ax.imshow(img, cmap=None if f.shape[0] == 3 else "gray", interpolation="nearest")
    fig.suptitle(f"first layer: {n} filters of {w.shape[2]}x{w.shape[3]}x{w.shape[1]}")
    return fig


def convolve(image: Any, kernel: str | np.ndarray = "sobel-x") -> Figure:
    """Input (grey) | kernel | response: what one convolution filter does to a picture, at its
    full resolution. ``kernel``: a name (mean, gaussian, sobel-x, ...), rows like
    ``'1,0,-1;2,0,-2;1,0,-1'`` or an array."""
    if isinstance(kernel, str):
        kernel = KERNELS[kernel] if kernel in KERNELS else parse_kernel(kernel)
    k = np.asarray(kernel, dtype=np.float32)
    gray = to_grayscale(_full_picture(image))
    kernel_title = f"kernel {k.shape[0]}x{k.shape[1]}"
    fig = convolution_figure(gray, k, kernel_title=kernel_title, output_title="response")
    fig.tight_layout()
    return fig


def _full_picture(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 of one picture at its own size (no model geometry)."""
    if isinstance(image, str | os.PathLike):
        return np.asarray(open_rgb(image))
    ((_, item),) = list(expand(image))
    if isinstance(item, bytes):
        return np.asarray(open_rgb(item))
    return np.asarray(to_picture(item).convert("RGB"))
