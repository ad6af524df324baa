"""What ``Classifier.predict`` accepts, turned into the inputs the prediction engine reads.

    path / folder / glob ─────────────────────────────── engine.iter_predict (decode threads)
    bytes ─────────────────────────────────────────────┐
    PIL image ── EXIF orientation ─────────────────────┤ engine.decode → load_image: the same
    NumPy (H, W[, C]) uint8 | float in [0, 1] ─────────┤ geometry, alpha and colour handling as
    torch tensor (C, H, W) | (N, C, H, W) ── to NumPy ─┘ files (PIL/arrays: lossless PNG)

One picture in gives one prediction out; a folder, a glob, a batch (4-D) or a list gives a list.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from transferlab.data.images import MAX_PIXELS, load_image, png_bytes
from transferlab.errors import ImageError, TransferlabError
from transferlab.predict.engine import Prediction

if TYPE_CHECKING:
    from transferlab.predict.engine import PredictionEngine
    from transferlab.preprocess import Preprocess

__all__ = ["decode_one", "expand", "is_single", "predict_any", "to_picture"]

_PATH = str | os.PathLike
_BYTES = bytes | bytearray | memoryview


def _is_tensor(x: Any) -> bool:
    # Checked by name: importing torch only to ask would cost every caller its import time.
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def is_single(x: Any) -> bool:
    """True when ``x`` is one picture (so ``predict`` returns one result, not a list)."""
    if isinstance(x, _PATH):
        path = os.fspath(x)
        return not os.path.isdir(path) and not (not os.path.exists(path) and glob.has_magic(path))
    if isinstance(x, _BYTES | Image.Image):
        return True
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return len(x.shape) in (2, 3)
    return False


def expand(x: Any) -> Iterator[tuple[str, Any]]:
    """(name, item) pairs: item is a path (str) to stream, or an in-memory picture.

    Lists and tuples are flattened one level; a 4-D array or tensor is a batch of pictures.
    """
    items = list(x) if isinstance(x, list | tuple) else [x]
    for i, item in enumerate(items):
        if isinstance(item, _PATH):
            yield os.fspath(item), os.fspath(item)
        elif isinstance(item, np.ndarray) or _is_tensor(item):
            arr = _to_numpy(item)
            kind = "tensor" if _is_tensor(item) else "array"
            batch = arr if arr.ndim == 4 else [arr]
            for j, one in enumerate(batch):
                name = f"<{kind} {i}[{j}]>" if arr.ndim == 4 else f"<{kind} {i}>"
                try:
                    yield name, to_picture(one, tensor=kind == "tensor")
                except ImageError as exc:
                    raise ImageError(name, exc.reason) from None
        elif isinstance(item, _BYTES):
            yield f"<bytes {i}>", bytes(item)
        elif isinstance(item, Image.Image):
            yield f"<image {i}>", to_picture(item)
        else:
            raise TransferlabError(
                f"predict: cannot read a {type(item).__name__} as an image; give a path, folder, "
                "glob, PIL image, NumPy array, torch tensor, raw bytes or a list of them"
            )


def _to_numpy(x: Any) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return x


def to_picture(x: Any, *, tensor: bool = False) -> Image.Image:
    """A PIL image, an (H, W[, C]) array or a (C, H, W) tensor → an upright PIL picture.

    Float pixels must be in [0, 1] (a normalised tensor is refused rather than guessed at);
    integer pixels in [0, 255].
    """
    if isinstance(x, Image.Image):
        # A file applies its EXIF orientation; the same picture opened with PIL must too.
        return ImageOps.exif_transpose(x) if x.getexif().get(0x0112, 1) != 1 else x
    arr = np.asarray(x)
    if arr.ndim == 3 and (tensor or (arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4))):
        arr = arr.transpose(1, 2, 0)  # channels first → last
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        what = "(C, H, W) or (N, C, H, W)" if tensor else "(H, W), (H, W, 3|4) or (N, H, W, 3)"
        raise ImageError("<array>", f"cannot read shape {tuple(np.shape(x))}; expected {what}")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr)))


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        raise ImageError("<array>", "the image is empty")
    lo, hi = float(arr.min()), float(arr.max())
    if np.issubdtype(arr.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ImageError(
                "<array>",
                f"float pixels must be in [0, 1], got [{lo:.3g}, {hi:.3g}] (a normalised "
                "tensor? pass the pixels before Normalize; 0-255 values: .astype('uint8'))",
            )
        return np.rint(arr * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    raise ImageError("<array>", f"pixels of dtype {arr.dtype} must be uint8 or float in [0, 1]")


def predict_any(engine: PredictionEngine, x: Any) -> Iterator[Prediction]:
    """One :class:`Prediction` per picture in ``x``, in order; paths go through the engine's
    streaming decoder, in-memory pictures through ``engine.decode`` (the same ``load_image``),
    both in batches of ``engine.batch_size``."""
    paths: list[str] = []
    pending: list[Prediction] = []  # in memory, in order; probs filled by flush
    images: list[np.ndarray] = []

    def flush() -> Iterator[Prediction]:
        if images:
            probs = iter(engine.infer(np.stack(images)))
            for p in pending:
                if p.error is None:
                    p.probs = next(probs)
        yield from pending
        pending.clear()
        images.clear()

    for name, item in expand(x):
        if isinstance(item, str):
            yield from flush()
            paths.append(item)
            continue
        if paths:
            yield from engine.iter_predict(paths)
            paths = []
        try:
            images.append(engine.decode(item))
            pending.append(Prediction(name, None))
        except ImageError as exc:
            pending.append(Prediction(name, None, exc.reason))
        if len(images) >= engine.batch_size:
            yield from flush()
    yield from flush()
    if paths:
        yield from engine.iter_predict(paths)


def decode_one(x: Any, pre: Preprocess, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One picture (path, bytes, PIL, array, tensor) → uint8 (3, H, W) as the model sees it."""
    items = list(expand(x))
    if len(items) != 1:
        raise TransferlabError(f"expected one picture, got {len(items)}")
    _, item = items[0]
    if isinstance(item, Image.Image):
        item = png_bytes(item)
    return load_image(item, pre, max_pixels=max_pixels)
