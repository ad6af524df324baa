"""Safe, fast image decoding with exactly the backbone's eval geometry.

Every image that reaches a model goes through :func:`open_rgb` (any file → 8-bit RGB, or a clear
:class:`~transferlab.errors.ImageError`) and :func:`load_image` (RGB → the uint8 array timm's eval
transform would produce). Keeping both here means training, prediction, the feature cache and the
HTTP server can never disagree about what a picture looks like.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from transferlab.data import fast_pixels
from transferlab.data.colour import to_rgb
from transferlab.errors import ImageError, TransferlabError
from transferlab.preprocess import Preprocess

__all__ = [
    "DECODE_VERSION", "IMAGE_EXTENSIONS", "MAX_PIXELS", "bytes_digest", "check_decodes",
    "file_digest", "load_image", "open_rgb", "pixel_limit_problem", "png_bytes",
]  # fmt: skip

#: Bump whenever open_rgb/load_image change the pixels a model sees (resampling, EXIF, colour
#: conversion, draft decoding): it is part of every feature-cache key, so cached features of the
#: old pixels are never served for the new ones.
DECODE_VERSION = 2  # 2: torch's resize for bilinear/bicubic (fast_pixels), within 2 levels of 1

#: Pillow's own default decompression-bomb limit; images with more pixels are refused unless the
#: caller raises ``max_pixels`` (the CLI's ``--max-pixels``).
MAX_PIXELS = 89_478_485

#: Lower-case file extensions treated as images when scanning folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    | {".ppm", ".pgm"}
)

UPLOAD_NAME = "<upload>"

# The fast path resizes whole images: up to this many times the crop's area (a 4:3 photo at
# crop_pct 0.875 is 1.7x), beyond it Pillow resamples only the window.
_FAST_MAX_AREA = 4

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Filter half-widths (in source pixels at scale 1), as in Pillow's Resample.c.
_SUPPORT = {
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Serialises the rare moment when Pillow's process-wide bomb ceiling is lifted (see _open).
_BOMB_LIMIT_LOCK = threading.Lock()


def open_rgb(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or the raw bytes of an upload) into a fully loaded 8-bit RGB image.

    EXIF orientation is applied, transparency is composited onto white and every Pillow mode is
    mapped to RGB (16-bit and float data are rescaled rather than clipped). ``draft=(w, h)`` is the
    smallest size the caller needs (after orientation): JPEGs are then decoded at a reduced
    power-of-two scale that never goes below it, which is far cheaper than decoding full size and
    throwing pixels away in the resize.

    Raises :class:`ImageError` naming the file and what is wrong with it; the image size is checked
    against ``max_pixels`` from the header, before any pixel is decoded.
    """
    img, _ = _decode(source, max_pixels, None if draft is None else lambda w, h: draft)
    return img


def check_decodes(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] = (32, 32),
) -> tuple[int, int]:
    """Prove ``source`` decodes, as cheaply as :func:`open_rgb` with ``draft`` (raising where it
    would); return its displayed size (w, h), which the scan index keeps for later runs."""
    seen: list[int] = []

    def want(w: int, h: int) -> tuple[int, int]:
        # _decode asks last with the final oriented header size, whatever the format.
        seen[:] = (w, h)
        return draft

    _decode(source, max_pixels, want)
    return seen[0], seen[1]


def pixel_limit_problem(size: tuple[int, int], max_pixels: int) -> str | None:
    """Why an image of ``size`` (w, h) is refused under ``max_pixels``, or None if it is not."""
    w, h = size
    if w * h <= max_pixels:
        return None
    return (
        f"image is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}; "
        "raise --max-pixels if you trust it"
    )


def load_image(
    source: str | os.PathLike[str] | bytes, pre: Preprocess, *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode ``source`` and apply the backbone's eval geometry: a uint8 array ``(3, H, W)``.

    This reproduces ``timm.data.create_transform(**data_config)`` (eval) up to, not including,
    ``ToTensor``/``Normalize``: "center" resizes the shorter side to ``floor(size / crop_pct)``
    (torchvision's ``Resize(int)``; for a non-square ``input_size`` timm's ``ResizeKeepRatio``)
    and centre-crops; "squash" resizes both sides to ``resize_size`` and centre-crops ("border"
    is refused). Bilinear and bicubic resizes run on torch's SIMD kernels (:mod:`.fast_pixels`),
    within 2 grey levels of timm's Pillow resize (mean ~0.004); other filters, and very elongated
    images, resample only the crop window in Pillow (see :func:`_resize_window`). JPEGs at least
    twice the resize size are draft-decoded (DCT-downscaled) toward it, which is much faster and
    differs from timm by about a grey level; bytes are accepted as well as paths.
    """
    if pre.crop_mode not in ("center", "squash"):
        raise TransferlabError(
            f"crop_mode {pre.crop_mode!r} is unsupported; use 'center' or 'squash'"
        )
    resample = _RESAMPLE.get(pre.interpolation)
    if resample is None:
        raise TransferlabError(
            f"interpolation {pre.interpolation!r} is unsupported; use one of {sorted(_RESAMPLE)}"
        )
    fast = pre.interpolation in fast_pixels.MODES
    pixels, (resized_w, resized_h) = _decode(
        source, max_pixels, lambda w, h: _resized_size(w, h, pre), fast=fast
    )
    crop_h, crop_w = pre.input_size
    left = _crop_offset(resized_w, crop_w)
    top = _crop_offset(resized_h, crop_h)
    window = (left, top, crop_w, crop_h)
    # torch resizes the whole image; a panorama's would dwarf the crop: Pillow does the window.
    if fast and resized_w * resized_h <= _FAST_MAX_AREA * crop_w * crop_h:
        return fast_pixels.resize_crop(pixels, (resized_w, resized_h), window, pre.interpolation)
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if left < 0 or top < 0 or resample == Image.Resampling.NEAREST:
        # Plain resize-then-crop: nearest is cheap anyway, and a resized image smaller than the
        # crop (crop_pct > 1) is padded with black, as torchvision's center_crop does.
        out = img.resize((resized_w, resized_h), resample)
        out = out.crop((left, top, left + crop_w, top + crop_h))
    else:
        out = _resize_window(img, (resized_w, resized_h), window, resample)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))


def png_bytes(img: Image.Image) -> bytes:
    """A decoded picture as lossless PNG bytes (every mode, alpha too), so that it is read
    again by :func:`load_image` exactly as a file would be: one path for every input."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # level 1: the cheapest that compresses
    return buf.getvalue()


def file_digest(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (streamed): the content identity for caches and leak checks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def bytes_digest(data: bytes) -> str:
    """Hex SHA-256 of in-memory bytes, equal to :func:`file_digest` of a file holding them."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# helpers


def _describe(source: str | os.PathLike[str] | bytes) -> tuple[str, bytes | None]:
    """(name shown in errors, bytes or None for a path)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return UPLOAD_NAME, bytes(source)
    return os.fspath(source), None


def _open(fh: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    """``Image.open`` plus our own pixel limit, checked from the header before decoding."""
    try:
        img = Image.open(fh)
    except Image.DecompressionBombError:
        # Over Pillow's process-wide ceiling (2 × Image.MAX_IMAGE_PIXELS). Re-read the header with
        # the ceiling lifted, so the limit that applies is ``max_pixels`` (the user may trust it).
        fh.seek(0)
        with _BOMB_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = _open_plain(fh, name)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        fh.seek(0)
        fmt = _sniff_format(fh.read(16))
        if fmt is not None:  # a known signature, but no plugin could parse the header
            raise ImageError(
                name, f"truncated or corrupt image data: damaged {fmt} header"
            ) from None
        raise ImageError(name, "not an image file (cannot identify format)") from None
    except MemoryError:
        raise
    except Exception as exc:  # broken headers surface as OSError, SyntaxError, ValueError, ...
        raise ImageError(name, f"truncated or corrupt image data: {exc}") from None
    _check_pixels(img.size, name, max_pixels)
    return img


def _open_plain(fh: IO[bytes], name: str) -> Image.Image:
    try:
        return Image.open(fh)
    except Exception as exc:
        raise ImageError(name, f"truncated or corrupt image data: {exc}") from None


def _sniff_format(head: bytes) -> str | None:
    """The format named by a file's magic bytes, to tell "damaged image" from "not an image"."""
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    problem = pixel_limit_problem(size, max_pixels)
    if problem is not None:
        raise ImageError(name, problem)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag, or None; a malformed EXIF block must not cost the image."""
    try:
        return img.getexif().get(ExifTags.Base.Orientation)
    except Exception:
        return None


def _decode(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int,
    want: Callable[[int, int], tuple[int, int]] | None,
    *,
    fast: bool = False,
) -> tuple[Any, tuple[int, int]]:
    """Open, check, draft, load, orient and convert to RGB in one pass over the file.

    ``want(w, h)`` maps the displayed (oriented) header size to the smallest size the caller needs;
    for JPEGs it is asked before decoding, to draft-decode. Returns the image and ``want``'s answer
    (the oriented header size when ``want`` is None). With ``fast``, a JPEG that needs no draft,
    rotation or colour conversion comes back from :func:`.fast_pixels.decode_jpeg`, a uint8
    ``(H, W, 3)`` array with the same pixels; anything it refuses is left to Pillow.
    """
    name, data = _describe(source)
    try:
        fh: IO[bytes] = io.BytesIO(data) if data is not None else open(name, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read file: {exc.strerror or exc}") from None
    with fh:
        if (len(data) if data is not None else os.fstat(fh.fileno()).st_size) == 0:
            raise ImageError(name, "empty file (0 bytes)")
        img = _open(fh, name, max_pixels)
        header_w, header_h = img.size
        is_jpeg = img.format == "JPEG"
        # A JPEG's EXIF is in its header. Other formats may keep it after the pixel data, and
        # Pillow's getexif() would decode the image to find it, swallowing decode errors here.
        orientation = _orientation(img) if is_jpeg else None
        if is_jpeg and want is not None:
            swap = orientation in _SWAPS_AXES
            need_w, need_h = want(*((header_h, header_w) if swap else (header_w, header_h)))
            if swap:
                need_w, need_h = need_h, need_w
            img.draft("RGB", (max(1, need_w), max(1, need_h)))
            plain = orientation in (None, 1) and img.mode in ("RGB", "L")
            if fast and plain and img.size == (header_w, header_h):  # no draft scaling
                fh.seek(0)  # an upload's bytes are at hand: no second copy of them
                pixels = fast_pixels.decode_jpeg(data if data is not None else fh.read())
                if pixels is not None:
                    return pixels, (need_w, need_h)
        try:
            img.load()
        except MemoryError:
            raise
        except Exception as exc:  # Pillow's plugins raise many types on damaged data.
            raise ImageError(name, f"truncated or corrupt image data: {exc}") from None
    if not is_jpeg:
        orientation = _orientation(img)
    if orientation in _SWAPS_AXES:
        header_w, header_h = header_h, header_w
    if orientation not in (None, 1):
        ImageOps.exif_transpose(img, in_place=True)
    needed = (header_w, header_h) if want is None else want(header_w, header_h)
    return to_rgb(img, name), needed


def _resized_size(w: int, h: int, pre: Preprocess) -> tuple[int, int]:
    """(w, h) after timm's eval resize step, before the centre crop."""
    scale_h, scale_w = pre.resize_size
    if pre.crop_mode == "squash":
        return scale_w, scale_h
    if scale_h == scale_w:
        # torchvision Resize(int): shorter side → size, longer side truncated (int()).
        if w <= h:
            return scale_w, int(scale_w * h / w)
        return int(scale_h * w / h), scale_h
    # timm ResizeKeepRatio(longest=0): the side that needs the least scaling hits its target.
    ratio = min(h / scale_h, w / scale_w)
    return round(w / ratio), round(h / ratio)


def _resize_window(
    img: Image.Image,
    resized: tuple[int, int],
    window: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> Image.Image:
    """The ``window`` (left, top, w, h) of ``img.resize(resized)``, computing only that window.

    Resampling only the window costs ~60% of resize-then-crop, the single biggest item in decode
    time. Pillow resizes in two 8-bit passes; a one-call ``resize(box=...)`` does not always round
    the intermediate like the full-image resize timm runs (±1 on a quarter of the pixels), so the
    two single-axis passes are run explicitly, horizontal then vertical like a full resize, each
    over only the rows and columns the window needs. Measured on the cats-vs-dogs photos: equal to
    resize-then-crop bar float32 box rounding (mean |diff| 1e-4); on some size combinations
    Pillow 13 rounds its full resize differently and the mean |diff| rises to ~0.3 grey levels.
    """
    (resized_w, resized_h), (left, top, crop_w, crop_h) = resized, window
    sx, sy = img.width / resized_w, img.height / resized_h
    # Source rows the vertical filter reads for output rows top .. top+crop_h, plus a margin,
    # so that only the image's real edges clamp the filter, as in a full resize.
    support = _SUPPORT[resample] * max(sy, 1.0)
    row0 = max(0, math.floor(top * sy - support) - 2)
    row1 = min(img.height, math.ceil((top + crop_h) * sy + support) + 2)
    if (row0, row1) != (0, img.height):
        img = img.crop((0, row0, img.width, row1))
    strip = img.resize(
        (crop_w, img.height), resample, box=(left * sx, 0, (left + crop_w) * sx, img.height)
    )
    return strip.resize(
        (crop_w, crop_h), resample, box=(0, top * sy - row0, crop_w, (top + crop_h) * sy - row0)
    )


def _crop_offset(size: int, crop: int) -> int:
    """torchvision center_crop's offset; negative when it pads (image smaller than the crop)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))
