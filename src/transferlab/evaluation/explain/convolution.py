"""The tutorial's convolution demo: a 3x3 (or any square) kernel applied to an image the way a
CNN layer applies it, with input, kernel and output side by side."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.common import new_figure, save_figure


def _kernel(values: list[list[float]], scale: float = 1.0) -> np.ndarray:
    k = np.asarray(values, dtype=np.float32) * np.float32(scale)
    k.setflags(write=False)  # module-level constants: nobody may edit them in place
    return k


KERNELS: dict[str, np.ndarray] = {
    "mean": _kernel([[1, 1, 1], [1, 1, 1], [1, 1, 1]], 1 / 9),  # the tutorial's example
    "gaussian": _kernel([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16),
    # Applied as cross-correlation (like every CNN layer): sobel-x is positive where the
    # image gets brighter to the right, i.e. it finds vertical edges.
    "sobel-x": _kernel([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
    "sobel-y": _kernel([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
    "sharpen": _kernel([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
    "edge": _kernel([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),  # 4-neighbour Laplacian
}

_MATRIX_EXAMPLE = "'1,0,-1;2,0,-2;1,0,-1'"


def parse_kernel(text: str) -> np.ndarray:
    """A square matrix from text: rows separated by ';', values by ',' (or spaces)."""
    src = str(text).strip()
    if not src:
        raise TransferlabError(f"empty kernel; write a square matrix like {_MATRIX_EXAMPLE}")
    rows: list[list[float]] = []
    for r, row in enumerate(src.rstrip(";").split(";"), start=1):
        cells = [c for c in re.split(r"[,\s]+", row.strip()) if c]
        if not cells:
            raise TransferlabError(f"kernel {src!r}: row {r} is empty; e.g. {_MATRIX_EXAMPLE}")
        values = []
        for cell in cells:
            try:
                v = float(cell)
            except ValueError:
                raise TransferlabError(
                    f"kernel {src!r}: {cell!r} in row {r} is not a number; write rows "
                    f"separated by ';' and numbers by ',', e.g. {_MATRIX_EXAMPLE}"
                ) from None
            if not math.isfinite(v):
                raise TransferlabError(f"kernel {src!r}: {cell!r} in row {r} is not finite")
            values.append(v)
        rows.append(values)
    lengths = [len(r) for r in rows]
    if len(set(lengths)) > 1:
        raise TransferlabError(
            f"kernel {src!r}: rows have different lengths {lengths}; every row needs the same "
            "number of values"
        )
    if lengths[0] != len(rows):
        raise TransferlabError(
            f"kernel {src!r} is {len(rows)}x{lengths[0]}; it must be square (k x k), "
            f"e.g. {_MATRIX_EXAMPLE}"
        )
    return np.asarray(rows, dtype=np.float32)


def _as_kernel(kernel: str | np.ndarray) -> tuple[str, np.ndarray]:
    """(display name, k x k float32 kernel)."""
    if isinstance(kernel, str):
        key = kernel.strip().lower()
        if key in KERNELS:
            return key, KERNELS[key]
        if re.fullmatch(r"[\s\d.,;eE+\-]+", kernel.strip() or "x"):
            return "custom", parse_kernel(kernel)
        raise TransferlabError(
            f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)} or a matrix like "
            f"{_MATRIX_EXAMPLE}"
        )
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.size == 0:
        raise TransferlabError(f"kernel must be a square (k, k) matrix, got shape {k.shape}")
    if not np.isfinite(k).all():
        raise TransferlabError("kernel contains NaN or infinite values")
    return "custom", k


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W) grey, (3, H, W) / (1, H, W) channel-first or (H, W, 3) RGB -> float32 (H, W), 0..255.

    Channel-first wins when both readings are possible (the project's images are (3, H, W)).
    RGB uses ITU-R BT.601 luma weights, the same as PIL's ``convert("L")``.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        return a.astype(np.float32)
    if a.ndim == 3:
        if a.shape[0] in (1, 3):
            chw = a
        elif a.shape[-1] in (1, 3):
            chw = a.transpose(2, 0, 1)
        else:
            raise TransferlabError(f"image must be (H, W), (3, H, W) or (H, W, 3); got {a.shape}")
        if chw.shape[0] == 1:
            return chw[0].astype(np.float32)
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return (chw.astype(np.float32) * luma).sum(axis=0)
    raise TransferlabError(f"image must be (H, W), (3, H, W) or (H, W, 3); got {a.shape}")


def convolve(image_uint8_or_gray: np.ndarray, kernel: str | np.ndarray) -> np.ndarray:
    """Convolve the grayscale image with a kernel: float32 (H, W) response, same size as input.

    ``kernel`` is a name from :data:`KERNELS`, a matrix string ("1,0,-1;2,0,-2;1,0,-1") or an
    array. Uses ``torch.nn.functional.conv2d`` -- exactly what a CNN layer computes
    (cross-correlation, no kernel flip) -- with reflect padding so the borders do not turn into
    fake edges. The raw response can be negative or above 255; :func:`display_response` turns
    it into a viewable uint8 image (edge kernels as magnitude).
    """
    _, k = _as_kernel(kernel)
    gray = to_grayscale(image_uint8_or_gray)
    kh, kw = k.shape
    h, w = gray.shape
    # 'same' output: (k-1) padding split left/right, top/bottom (uneven for even k).
    top, left = (kh - 1) // 2, (kw - 1) // 2
    bottom, right = kh - 1 - top, kw - 1 - left
    if max(top, bottom) >= h or max(left, right) >= w:
        raise TransferlabError(f"a {kh}x{kw} kernel is too large for a {h}x{w} image")
    x = torch.from_numpy(np.ascontiguousarray(gray))[None, None]
    if kh > 1 or kw > 1:
        x = F.pad(x, (left, right, top, bottom), mode="reflect")
    with torch.no_grad():
        y = F.conv2d(x, torch.tensor(k)[None, None])  # a copy: KERNELS arrays are read-only
    return y[0, 0].numpy()


def display_response(response: np.ndarray, kernel: str | np.ndarray) -> np.ndarray:
    """A convolution response as uint8 (H, W) for display.

    Derivative kernels (weights summing to ~0: Sobel, Laplacian, most user edge kernels) give
    signed responses around 0, so their magnitude is shown, scaled so the strongest edge is
    255. Smoothing/sharpening kernels (weights summing to ~1) keep image brightness and are
    clipped to 0..255.
    """
    _, k = _as_kernel(kernel)
    r = np.asarray(response, dtype=np.float32)
    if abs(float(k.sum())) < 1e-6:
        mag = np.abs(r)
        peak = float(mag.max())
        r = mag * (255.0 / peak) if peak > 0 else np.zeros_like(mag)
    return np.clip(np.rint(r), 0, 255).astype(np.uint8)


def plot_convolution(image: np.ndarray, kernel: str | np.ndarray, out_path: str | Path) -> Path:
    """Input (grey) | kernel values as a small matrix | output, side by side (1200 x 420 px)."""
    name, k = _as_kernel(kernel)
    edge = abs(float(k.sum())) < 1e-6
    fig = convolution_figure(
        to_grayscale(image),
        k,
        kernel_title=f"kernel: {name} ({k.shape[0]}x{k.shape[1]})",
        output_title="output |response|, scaled" if edge else "output",
    )
    return save_figure(fig, out_path)


def convolution_figure(
    gray: np.ndarray, k: np.ndarray, *, kernel_title: str, output_title: str
) -> Figure:
    """Input | kernel values as a small matrix | response, side by side (12 x 4.2 in)."""
    shown = display_response(convolve(gray, k), k)
    fig = new_figure((12.0, 4.2))
    ax_in, ax_k, ax_out = fig.subplots(1, 3, width_ratios=[1, 0.7, 1])
    ax_in.imshow(gray, cmap="gray", vmin=0, vmax=255)
    ax_in.set_title("input (grayscale)")
    lim = float(np.abs(k).max()) or 1.0
    ax_k.imshow(k, cmap="coolwarm", vmin=-lim, vmax=lim)
    if k.shape[0] <= 7:  # beyond that the numbers no longer fit in their cells
        for (i, j), v in np.ndenumerate(k):
            ax_k.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=10)
    ax_k.set_xticks([])
    ax_k.set_yticks([])
    ax_k.set_title(kernel_title)
    ax_out.imshow(shown, cmap="gray", vmin=0, vmax=255)
    ax_out.set_title(output_title)
    for ax in (ax_in, ax_out):
        ax.axis("off")
    return fig
