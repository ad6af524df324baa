"""What a CNN classifier looks at and what it has learned.

* :mod:`.cams`: HiResCAM (and Grad-CAM) heatmaps on the layer :mod:`.target_layer` picks (the
  last stride-16 stage), overlays and per-image PNGs;
* :mod:`.feature_maps`: feature maps at an early, a middle and a late stage (edges -> textures
  -> object parts) and the pooled bottleneck vector; :mod:`.filters`: the first layer's filters;
* :mod:`.files`: all of that for image files and a trained classifier, as PNGs (the CLI's);
* :mod:`.convolution`: a small convolution demo (mean, Gaussian, Sobel, sharpen, Laplacian or a
  user matrix).

Everything works on a plain ``nn.Module`` that maps normalized (n, 3, H, W) images to logits
(a transferlab ``ClassifierNet`` with ``.body``/``.head``, any timm classifier, or a hand-built
``nn.Sequential``). Models are never modified: every hook is removed and every module's
train/eval flag restored, also when an error is raised.
"""

from __future__ import annotations

from transferlab.evaluation.explain.cams import grad_cam, overlay_cam, save_explanations
from transferlab.evaluation.explain.common import (
    EXPLANATION_DPI,
    EXPLANATION_FIGSIZE,
    normalize,
)
from transferlab.evaluation.explain.convolution import (
    KERNELS,
    convolve,
    display_response,
    parse_kernel,
    plot_convolution,
    to_grayscale,
)

# The function `feature_maps` replaces the submodule of that name as this package's attribute,
# so `explain.feature_maps(...)` keeps meaning the function, as callers expect.
from transferlab.evaluation.explain.feature_maps import (
    bottleneck_vector,
    default_feature_stages,
    feature_maps,
    plot_bottleneck,
    plot_feature_maps,
)
from transferlab.evaluation.explain.files import convolve_file, explain_files
from transferlab.evaluation.explain.filters import first_layer_filters, plot_filters
from transferlab.evaluation.explain.target_layer import (
    DEFAULT_CAM_METHOD,
    DEFAULT_CAM_STRIDE,
    find_target_layer,
)

__all__ = [
    "DEFAULT_CAM_METHOD",
    "DEFAULT_CAM_STRIDE",
    "EXPLANATION_DPI",
    "EXPLANATION_FIGSIZE",
    "KERNELS",
    "bottleneck_vector",
    "convolve",
    "convolve_file",
    "default_feature_stages",
    "display_response",
    "explain_files",
    "feature_maps",
    "find_target_layer",
    "first_layer_filters",
    "grad_cam",
    "normalize",
    "overlay_cam",
    "parse_kernel",
    "plot_bottleneck",
    "plot_convolution",
    "plot_feature_maps",
    "plot_filters",
    "save_explanations",
    "to_grayscale",
]
