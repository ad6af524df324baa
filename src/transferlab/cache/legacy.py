"""The first cache format: one file per image, ``<namespace>/<digest[:2]>/<digest>.feat``.

Still read (and moved into the store's pack as it is read, or all at once by compaction), never
written. Entry format (little-endian)::

    b"TLF1" | u32 header_len | header (JSON: dtype, shape, digest; space-padded so the payload
    starts 64-byte aligned) | payload (raw C-order array bytes) | u32 crc32 of everything before it
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SUFFIX = ".feat"
_MAGIC = b"TLF1"
_MAX_HEADER = 4096
_SHARD_RE = re.compile(r"[0-9a-f]{2}")


def entry_path(folder: Path, digest: str) -> Path:
    return folder / digest[:2] / f"{digest}{SUFFIX}"


def has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds shard folders of the old layout (cheap: one listing)."""
    try:
        return any(_SHARD_RE.fullmatch(n) for n in os.listdir(folder))
    except OSError:
        return False


def all_entries(folder: Path) -> Iterator[tuple[str, Path]]:
    """(digest, path) of every old-format file under ``folder``."""
    for shard in sorted(folder.iterdir()) if folder.is_dir() else ():
        if shard.is_dir() and _SHARD_RE.fullmatch(shard.name):
            for path in sorted(shard.glob(f"*{SUFFIX}")):
                yield path.name[: -len(SUFFIX)], path


def decode(blob: bytes, digest: str) -> np.ndarray | None:
    """The array in ``blob``, or None when anything about it is off or it belongs to an image
    other than ``digest``."""
    if len(blob) < 12 or blob[:4] != _MAGIC:
        return None
    (header_len,) = struct.unpack_from("<I", blob, 4)
    if header_len > _MAX_HEADER or 8 + header_len + 4 > len(blob):
        return None
    (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    # The CRC covers header and payload, so it is checked before trusting either.
    if zlib.crc32(memoryview(blob)[:-4]) != crc:
        return None
    try:
        header = json.loads(blob[8 : 8 + header_len])
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(d) for d in header["shape"])
        owner = header["digest"]
    except (ValueError, KeyError, TypeError):
        return None
    if owner != digest or dtype.hasobject or any(d < 0 for d in shape):
        return None
    start = 8 + header_len
    count = int(np.prod(shape, dtype=np.int64))
    if start + count * dtype.itemsize != len(blob) - 4:
        return None
    return np.frombuffer(blob, dtype=dtype, count=count, offset=start).reshape(shape).copy()
