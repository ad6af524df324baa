"""What every explanation needs: uint8 images to normalized tensors, the model's device and
input size checks, and matplotlib figures that never touch pyplot.

Figures are drawn on ``Figure`` objects with an explicit Agg canvas instead of pyplot: nothing
needs a display, nothing touches the global backend other code may rely on, and no figure is
left registered with pyplot after saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation import plots

# Fixed figure geometry (no bbox_inches="tight"), so a saved explanation always has the same
# pixel size whatever the title length: 800 x 440 px.
EXPLANATION_FIGSIZE = (8.0, 4.4)
EXPLANATION_DPI = 100


def normalize(
    images_uint8: np.ndarray | Sequence[np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 images (3, H, W) or (n, 3, H, W) (or a list of (3, H, W)) -> float32 (n, 3, H, W).

    ``(x / 255 - mean) / std`` per channel, the same arithmetic as timm's eval transform.
    """
    arr = as_uint8_batch(images_uint8)
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    if m.numel() != arr.shape[1] or s.numel() != arr.shape[1]:
        raise TransferlabError(
            f"mean/std have {m.numel()}/{s.numel()} values but the images have "
            f"{arr.shape[1]} channels; give one value per channel"
        )
    if bool((s == 0).any()):
        raise TransferlabError("std contains 0; normalization would divide by zero")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    return (x - m) / s


def as_uint8_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(3, H, W), (n, 3, H, W) or a list of (3, H, W) uint8 images -> one (n, 3, H, W) array."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        items = [np.asarray(im) for im in images]
        if not items:
            raise TransferlabError("no images given")
        if len({im.shape for im in items}) > 1:
            raise TransferlabError(
                "images have different sizes; resize/crop them to one size first "
                f"(got {sorted({im.shape for im in items})})"
            )
        arr = np.stack(items)
    if arr.dtype != np.uint8:
        raise TransferlabError(f"images must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise TransferlabError(
            f"images must be (3, H, W) or (n, 3, H, W) channel-first RGB, got shape {arr.shape}"
        )
    return arr


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's parameters live, and the float dtype inputs should have."""
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def check_input_size(height: int, width: int, input_size: Sequence[int] | None) -> None:
    """Images must be the size the model was trained at, when that is known."""
    if input_size is None:
        return
    h, w = (int(v) for v in input_size)
    if (height, width) != (h, w):
        raise TransferlabError(
            f"the images are {height}x{width} but the model takes {h}x{w}; load them with the "
            "run's preprocessing (transferlab.data.images.load_image(path, saved.preprocess))"
        )


def new_figure(figsize: tuple[float, float], dpi: int = EXPLANATION_DPI) -> Figure:
    """:func:`transferlab.evaluation.plots.new_figure` at the explanations' resolution."""
    return plots.new_figure(figsize, dpi)


def save_figure(fig: Figure, out_path: str | Path) -> Path:
    """The PNG (pixel size figsize x dpi: no bbox_inches="tight"), then the figure is cleared:
    a batch of explanations does not keep every drawing alive."""
    path = plots.save_figure(fig, out_path)
    fig.clear()
    return path


def minmax(a: np.ndarray) -> np.ndarray:
    """Scaled to 0..1 (all zeros when flat), so weak but structured maps stay visible."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
