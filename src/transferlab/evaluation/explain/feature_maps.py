"""What the network computes on the way: feature maps at an early, a middle and a late stage
(edges -> textures -> object parts) and the pooled bottleneck vector the head reads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.common import (
    check_input_size,
    has_submodule,
    minmax,
    model_device_dtype,
    new_figure,
    save_figure,
)
from transferlab.evaluation.explain.target_layer import find_target_layer, timm_feature_names
from transferlab.model import eval_mode


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.BatchNorm2d,
)


def default_feature_stages(model: nn.Module) -> list[str]:
    """Three stage names (early, middle, late) for :func:`feature_maps`.

    From timm ``feature_info`` when present (first, middle, last entry), else from the
    conv-containing children of the model (descending through single wrappers such as
    ``.body``), where a bare Conv2d is replaced by the BN/activation right after it so the
    maps show what the next layer sees.
    """
    feats = timm_feature_names(model)
    if not feats:
        prefix, container = "", model
        while True:
            kids = [(n, m) for n, m in container.named_children() if _contains_conv(m)]
            if len(kids) == 1 and not isinstance(kids[0][1], nn.Conv2d):
                prefix = f"{prefix}{kids[0][0]}."
                container = kids[0][1]
                continue
            break
        children = list(container.named_children())
        for i, (name, module) in enumerate(children):
            if not _contains_conv(module):
                continue
            if isinstance(module, nn.Conv2d):
                j = i
                while j + 1 < len(children) and isinstance(children[j + 1][1], _ACTIVATIONS):
                    j += 1
                name = children[j][0]
            feats.append(prefix + name)
    if not feats:
        raise TransferlabError(
            f"{type(model).__name__} has no convolutional layers; pass stages= explicitly"
        )
    k = len(feats)
    picks = sorted({0, (k - 1) // 2, k - 1})
    return [feats[i] for i in picks]


def feature_maps(
    model: nn.Module,
    image: torch.Tensor,
    *,
    stages: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Activations (C, h, w) of one normalized image (1, 3, H, W) at the given stage names.

    Default stages: :func:`default_feature_stages` (early -> middle -> late; found from the
    module tree, no forward pass). Keys keep the order of ``stages``. ``input_size``: the
    model's (``SavedModel.preprocess.input_size``), checked against the image's size.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] != 1:
        raise TransferlabError("feature_maps takes one normalized image tensor (1, 3, H, W)")
    check_input_size(int(image.shape[2]), int(image.shape[3]), input_size)
    names = list(stages) if stages is not None else default_feature_stages(model)
    modules = {}
    for name in names:
        if not has_submodule(model, name):
            raise TransferlabError(
                f"stage {name!r} is not a submodule of {type(model).__name__}; "
                f"the default stages are {default_feature_stages(model)}"
            )
        modules[name] = model.get_submodule(name)
    out: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _i: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                out[name] = output.detach()

        return hook

    device, dtype = model_device_dtype(model)
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(image.detach().to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    result: dict[str, np.ndarray] = {}
    for name in names:
        t = out.get(name)
        if t is None or t.ndim != 4:
            got = "nothing" if t is None else f"shape {tuple(t.shape)}"
            raise TransferlabError(f"stage {name!r} gave {got}, not a (1, C, h, w) feature map")
        result[name] = t[0].float().cpu().numpy()
    return result


def plot_feature_maps(
    maps: dict[str, np.ndarray], out_path: str | Path, max_channels: int = 16
) -> Path:
    """A grid of channels per stage, top to bottom (the "edges -> parts" figure).

    Shows the ``max_channels`` channels with the highest mean activation: after ReLU many
    channels are silent for a given image, and the first channels by index are often blank.
    Each channel is min-max scaled on its own so weak but structured maps stay visible.
    """
    if not maps:
        raise TransferlabError("no feature maps to plot")
    max_channels = max(1, int(max_channels))
    ncols = min(8, max_channels)
    rows_per_stage = [math.ceil(min(max_channels, m.shape[0]) / ncols) for m in maps.values()]
    fig = new_figure((ncols * 1.3 + 0.4, sum(rows_per_stage) * 1.3 + 0.6 * len(maps)))
    subfigs = fig.subfigures(len(maps), 1, height_ratios=[r + 0.5 for r in rows_per_stage])
    subfigs = np.atleast_1d(subfigs)
    for sub, (name, fmap), nrows in zip(subfigs, maps.items(), rows_per_stage, strict=True):
        fmap = np.asarray(fmap, dtype=np.float32)
        if fmap.ndim != 3:
            raise TransferlabError(f"feature map {name!r} must be (C, h, w), got {fmap.shape}")
        order = np.argsort(-fmap.mean(axis=(1, 2)), kind="stable")[:max_channels]
        c, h, w = fmap.shape
        sub.suptitle(f"{name}: {c} channels, {h}x{w} (top {len(order)} by mean activation)")
        axes = np.atleast_1d(sub.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, ch in zip(axes, order, strict=False):
            ax.imshow(minmax(fmap[ch]), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"#{ch}", fontsize=7)
    return save_figure(fig, out_path)


def bottleneck_vector(model: nn.Module, image: torch.Tensor) -> np.ndarray:
    """The pooled feature vector (D,) the classifier head reads, for one image (1, 3, H, W).

    ``model.body(x)`` for a transferlab model, timm's ``forward_head(pre_logits=True)`` for a
    timm classifier, else the global average of the last conv stage's output.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] != 1:
        raise TransferlabError("bottleneck_vector takes one normalized image tensor (1, 3, H, W)")
    device, dtype = model_device_dtype(model)
    x = image.detach().to(device=device, dtype=dtype)
    with eval_mode(model), torch.no_grad():
        body = getattr(model, "body", None)
        if isinstance(body, nn.Module):
            feats = body(x)
        elif hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            last, _ = find_target_layer(model, x.shape[-2:], max_stride=None)
            maps = feature_maps(model, x, stages=[last])
            return next(iter(maps.values())).mean(axis=(1, 2))
    if feats.ndim == 4:  # a body that stops before pooling
        feats = feats.mean(dim=(2, 3))
    return feats.reshape(feats.shape[0], -1)[0].float().cpu().numpy()


def plot_bottleneck(vec: np.ndarray, out_path: str | Path) -> Path:
    """The bottleneck vector as values by index and as a near-square heat grid."""
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise TransferlabError("empty bottleneck vector")
    fig = new_figure((11.0, 3.8))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    ax1.bar(np.arange(v.size), v, width=1.0, color="tab:blue")
    ax1.set_xlim(-0.5, v.size - 0.5)
    ax1.set_xlabel("feature index")
    ax1.set_ylabel("activation")
    zeros = float(np.mean(np.abs(v) < 1e-6))
    ax1.set_title(
        f"{v.size}-d bottleneck: mean {v.mean():.3g}, max {v.max():.3g}, {zeros:.0%} zero"
    )
    cols = math.ceil(math.sqrt(v.size))
    grid = np.full(cols * math.ceil(v.size / cols), np.nan, dtype=np.float32)
    grid[: v.size] = v
    im = ax2.imshow(grid.reshape(-1, cols), cmap="magma", interpolation="nearest")
    ax2.set_title("as a grid (row-major)")
    ax2.axis("off")
    fig.colorbar(im, ax=ax2, fraction=0.046)
    return save_figure(fig, out_path)
