"""Any decoded Pillow image → 8-bit RGB, the one colour form every model input takes.

Alpha is composited over white, 16-bit and float data are rescaled (never clipped), palettes and
CMYK are converted; :func:`~transferlab.data.images.open_rgb` applies it to every decoded file.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from transferlab.errors import ImageError

__all__ = ["to_rgb"]

_WHITE = (255, 255, 255)


def to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode → 8-bit RGB: alpha over white, 16-bit/float rescaled, never clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        arr = np.asarray(img)
        if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535):
            return _gray_to_rgb(_scale_16bit(arr))
        return _gray_to_rgb(_stretch(arr))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return _gray_to_rgb(np.rint(arr * 255.0).astype(np.uint8))
        if lo >= 0.0 and hi <= 255.0:
            return _gray_to_rgb(np.rint(arr).astype(np.uint8))
        return _gray_to_rgb(_stretch(arr))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, _WHITE)
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"unsupported colour mode {mode!r}: {exc}") from None


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255 with rounding (65535 → 255, 32768 → 128), the inverse of ×257."""
    wide = arr.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min–max stretch for data with no natural range (signed 32-bit, arbitrary floats)."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not math.isfinite(hi - lo) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
