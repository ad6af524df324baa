"""The fast path of :func:`~transferlab.data.images.load_image`: torchvision's libjpeg-turbo decoder
and torch's SIMD antialiased resize, in place of Pillow's decode and resize.

Both release the GIL, so :mod:`~transferlab.data.loader` decodes in threads of the process that
runs the engine: no pickling, no shared memory, no fork. Measured on the cats-vs-dogs photos (one
thread, 600 images): decode 0.51 ms vs Pillow's 0.60 (the same libjpeg-turbo: identical pixels);
bilinear resize and crop to 224 0.36 ms vs 0.75 for Pillow's window resize (bicubic: 0.50 vs
2.2 ms for a whole image), within 2 grey levels of Pillow's resize (mean 0.004): torch's uint8
antialiased kernels follow Pillow's filters.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec. Where they are gone,
:func:`decode_jpeg` answers None and Pillow decodes (the same pixels, ~0.2 ms more per photo);
the resize needs only torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["MODES", "decode_jpeg", "resize_crop"]

#: Interpolations torch resamples as Pillow does (antialiased); the others stay with Pillow.
MODES = frozenset({"bilinear", "bicubic"})


def decode_jpeg(data: bytes) -> torch.Tensor | None:
    """A baseline or progressive JPEG (YCbCr or greyscale) as uint8 RGB ``(3, H, W)``, or None
    where torchvision cannot decode it: the caller then lets Pillow decode it, or say what is
    wrong with the file."""
    import torch

    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg
    except ImportError:
        return None
    try:
        return tv_decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError:
        return None


def resize_crop(
    pixels: torch.Tensor | Image.Image,
    resized: tuple[int, int],
    window: tuple[int, int, int, int],
    mode: str,
) -> np.ndarray:
    """``pixels`` (a ``(3, H, W)`` tensor or an RGB image) resized to ``resized`` (w, h) with
    ``mode`` (one of :data:`MODES`), then the ``window`` (left, top, w, h) of it as uint8
    ``(3, h, w)``; where the window overhangs the resized image it is black, as torchvision's
    center_crop pads."""
    import torch
    import torch.nn.functional as F

    if isinstance(pixels, Image.Image):  # a writable copy: torch refuses read-only memory
        pixels = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)
    resized_w, resized_h = resized
    with torch.inference_mode():
        full = F.interpolate(pixels[None], size=(resized_h, resized_w), mode=mode, antialias=True)
    left, top, crop_w, crop_h = window
    out = np.zeros((3, crop_h, crop_w), dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + crop_w, resized_w), min(top + crop_h, resized_h)
    out[:, y0 - top : y1 - top, x0 - left : x1 - left] = full[0, :, y0:y1, x0:x1].numpy()
    return out
