"""Explanations of image files by a trained classifier, written as PNGs: what ``transferlab
explain`` and ``transferlab convolve`` do, callable from Python."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.data.images import load_image, open_rgb
from transferlab.evaluation.explain.cams import save_explanations
from transferlab.evaluation.explain.common import normalize
from transferlab.evaluation.explain.convolution import KERNELS, parse_kernel, plot_convolution
from transferlab.evaluation.explain.feature_maps import (
    bottleneck_vector,
    feature_maps,
    plot_bottleneck,
    plot_feature_maps,
)
from transferlab.evaluation.explain.filters import first_layer_filters, plot_filters

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = ["convolve_file", "explain_files"]


def explain_files(
    classifier: Classifier,
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    target_class: str | None = None,
    layer: str | None = None,
    method: str = "hirescam",
    maps: bool = True,
) -> list[Path]:
    """A class activation map per image (and with ``maps`` its feature maps, its bottleneck
    vector and the first layer's filters), as PNGs in ``out``; returns the files written."""
    out = Path(out)
    pre = classifier.saved.preprocess
    arrays = [load_image(p, pre) for p in images]
    net = classifier.net.eval()
    written = save_explanations(
        net, arrays, images, classifier.classes, pre.mean, pre.std, out,
        target_class=target_class, target_layer=layer, method=method, input_size=pre.input_size,
    )  # fmt: skip
    if maps:
        for cam_file, arr in zip(list(written), arrays, strict=True):
            x = normalize(arr, pre.mean, pre.std)
            stem = cam_file.name.removesuffix("_gradcam.png")  # unique: a/1.jpg and b/1.jpg
            fm = feature_maps(net, x, input_size=pre.input_size)
            written.append(plot_feature_maps(fm, out / f"{stem}_feature_maps.png"))
            written.append(
                plot_bottleneck(bottleneck_vector(net, x), out / f"{stem}_bottleneck.png")
            )
        written.append(plot_filters(first_layer_filters(net), out / "filters.png"))
    return written


def convolve_file(image: str | os.PathLike[str], kernel: str, out: str | os.PathLike[str]) -> Path:
    """The tutorial's convolution demo on one image file: input, kernel and response side by
    side. ``kernel``: a name of :data:`KERNELS` or rows like ``'1,0,-1;2,0,-2;1,0,-1'``."""
    k = kernel if kernel in KERNELS else parse_kernel(kernel)
    rgb = np.asarray(open_rgb(image)).transpose(2, 0, 1)
    return plot_convolution(rgb, k, out)
