"""From a request body to model-ready pixels: the uploaded files (multipart field ``file``,
base64 in JSON, or one image as the raw body), each sniffed by its magic bytes (never its name
or content type), its pixel count checked from the header before decoding, then decoded with
the model's preprocessing."""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from transferlab.errors import ImageError, TransferlabError
from transferlab.serve.guards import ApiError

# Magic bytes of the formats Pillow decodes for us; anything else is refused unread.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
)


def sniff_image(data: bytes) -> str | None:
    """The image format named by ``data``'s first bytes, or None when it is not an image."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """The uploaded files' bytes, at most ``max_images`` of them (else 413)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        blobs = await _form_images(request, max_images)
    elif ctype == "application/json" or ctype.endswith("+json"):
        blobs = _json_images(await request.body())
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        blobs = [await request.body()]  # one raw image (curl --data-binary); sniffed as any
    else:
        raise ApiError(
            415,
            "unsupported content type",
            f"got {ctype or 'no content type'}; send multipart/form-data with field 'file', "
            'application/json {"images": [base64, ...]}, or one image as the raw body '
            "(image/jpeg, image/png, …)",
        )
    if len(blobs) > max_images:
        raise ApiError(
            413, "too many images", f"{len(blobs)} images; at most {max_images} per request"
        )
    return blobs


async def _form_images(request: Request, max_images: int) -> list[bytes]:
    try:
        form = await request.form(max_files=max_images, max_fields=max_images + 16)
    except StarletteHTTPException as exc:  # malformed multipart, too many parts
        if "Too many files" in str(exc.detail):
            raise ApiError(
                413, "too many images", f"at most {max_images} images per request"
            ) from None
        raise ApiError(422, "bad multipart body", exc.detail) from None
    items = form.getlist("file")
    if not items:
        fields = sorted(set(form.keys()))
        raise ApiError(
            422,
            "missing file",
            "send the image(s) in multipart form field 'file'"
            + (f"; got field(s): {', '.join(fields)}" if fields else "; the form is empty"),
        )
    blobs = []
    for item in items:
        if isinstance(item, str):  # a text field named 'file': its bytes, sniffed like any
            blobs.append(item.encode("utf-8"))
        else:
            blobs.append(await item.read())
            await item.close()
    return blobs


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid JSON", str(exc)) from None
    except RecursionError:
        raise ApiError(422, "invalid JSON", 'nested too deeply; send {"images": [...]}') from None
    if not isinstance(doc, dict) or "images" not in doc:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ApiError(422, "missing images", f'expected {{"images": [base64, ...]}}; got {got}')
    items = doc["images"]
    if not isinstance(items, list) or not items:
        raise ApiError(422, "missing images", "'images' must be a non-empty list of base64 strings")
    blobs = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(
                422, "invalid base64", f"images[{i}] is a {type(item).__name__}, not a string"
            )
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            blobs.append(base64.b64decode("".join(text.split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(422, "invalid base64", f"images[{i}]: {exc}") from None
    return blobs


def decode_upload(
    engine: Any, data: bytes, index: int, max_pixels: int, slots: threading.BoundedSemaphore
) -> np.ndarray:
    """Sniff → header size check → full decode with the model's preprocessing (a thread)."""
    with slots:
        return _decode_checked(engine, data, index, max_pixels)


def _decode_checked(engine: Any, data: bytes, index: int, max_pixels: int) -> np.ndarray:
    which = f"image {index + 1}"
    if not data:
        raise ApiError(422, "empty file", f"{which} is empty (0 bytes)")
    fmt = sniff_image(data[:16])
    if fmt is None:
        raise ApiError(
            415,
            "not an image",
            f"{which} is not a JPEG/PNG/GIF/BMP/TIFF/WebP/PNM file (first bytes {data[:8]!r}); "
            "the file's content is checked, not its name or content type",
        )
    _check_header(data, which, fmt, max_pixels)
    try:
        return engine.decode(data)
    except ImageError as exc:
        raise ApiError(422, "corrupt image", f"{which} ({fmt}): {exc.reason}") from None
    except TransferlabError as exc:
        raise ApiError(422, "unreadable image", f"{which} ({fmt}): {exc}") from None


def _check_header(data: bytes, which: str, fmt: str, max_pixels: int) -> None:
    """Refuse an image whose header claims more than ``max_pixels``, before decoding it."""
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            w, h = header.size
    except Image.DecompressionBombError:
        # Pillow's own ceiling (2 × MAX_IMAGE_PIXELS) tripped on the header: far over ours.
        raise ApiError(
            413,
            "image too large",
            f"{which}: its header claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
            f"over the limit of {max_pixels}",
        ) from None
    except Exception as exc:
        raise ApiError(422, "corrupt image", f"{which}: damaged {fmt} header ({exc})") from None
    if w * h > max_pixels:
        raise ApiError(
            413,
            "image too large",
            f"{which} is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}",
        )
