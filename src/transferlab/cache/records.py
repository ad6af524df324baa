"""The bytes of the feature store: pack records, index entries, and reading records in chunks.

A pack is a sequence of records, each self-describing and checksummed (little-endian)::

    fixed header (48 B: magic b"TLR1", u32 record length, u32 payload length, u8 ndim,
    u8 digest length, 2 pad, 8 B dtype string, 6 x u32 shape) | digest (ASCII hex) |
    zero pad to 16 B | payload (C-order array bytes) | u32 crc32 of everything before it

Its index (``<pack>.idx``) is a flat array of :data:`INDEX` entries (key, offset, length), one
per record, appended after the record. The key is a 64-bit hash of the digest: compact enough
to keep a million of them in 24 MB, and only a hint: the record's own header names its digest
and is checked on every read, so a stale, garbled or colliding index entry is a miss, never
wrong features.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

RECORD_MAGIC = b"TLR1"
_FIXED = struct.Struct("<4sIIBB2x8s6I")
_CRC = struct.Struct("<I")
MAX_NDIM = 6
_ALIGN = 16
INDEX = np.dtype([("key", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("pad", "<u4")])
# A read covers consecutive records up to this many bytes: large reads for cold disks and
# network filesystems, while what sits in memory at once stays bounded whatever N is.
CHUNK_BYTES = 8 << 20
# Wanted records closer than this are read in one go (the bytes between are skipped over).
_MAX_GAP = 64 << 10


def key_of(digest: str) -> int:
    """The 64-bit index key of a content digest."""
    return int.from_bytes(hashlib.blake2b(digest.encode(), digest_size=8).digest(), "little")


def keys_of(digests: Sequence[str]) -> np.ndarray:
    return np.fromiter((key_of(d) for d in digests), dtype=np.uint64, count=len(digests))


def encode_record(array: np.ndarray, digest: str) -> bytes:
    a = np.asarray(array)
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise TypeError(f"only plain numeric arrays can be cached, got dtype {a.dtype}")
    if a.ndim > MAX_NDIM:
        raise ValueError(f"cached arrays have at most {MAX_NDIM} dimensions, got {a.ndim}")
    # Little-endian on disk so packs are portable; '<' or '|' (byte-sized) after this.
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    payload = a.tobytes(order="C")  # C order whatever the input's layout (keeps 0-d as 0-d)
    name = digest.encode()
    start = _payload_start(len(name))
    length = start + len(payload) + _CRC.size
    shape = list(a.shape) + [0] * (MAX_NDIM - a.ndim)
    head = _FIXED.pack(
        RECORD_MAGIC, length, len(payload), a.ndim, len(name), a.dtype.str.encode(), *shape
    )
    body = head + name + b"\0" * (start - len(head) - len(name)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def _payload_start(digest_len: int) -> int:
    return -(-(_FIXED.size + digest_len) // _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=64)
def _dtype(raw: bytes) -> np.dtype | None:
    try:
        dtype = np.dtype(raw.rstrip(b"\0 ").decode("ascii"))
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    return None if dtype.hasobject or dtype.fields is not None else dtype


@dataclass(slots=True)
class Record:
    """A checked record inside a buffer: its digest and where its array lies."""

    digest: str
    start: int  # offset of the record in the buffer
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]
    payload: int  # offset of the payload in the buffer

    def array(self, buf: bytes | bytearray | memoryview) -> np.ndarray:
        """A read-only view into ``buf`` (copy it before the buffer is reused)."""
        view = np.frombuffer(
            buf, dtype=self.dtype, count=math.prod(self.shape), offset=self.payload
        )
        return view.reshape(self.shape)


def parse_record(buf: memoryview, pos: int, limit: int) -> Record | None:
    """The intact record at ``buf[pos:]`` (ending before ``limit``), or None: bad magic, length,
    header or CRC. The CRC covers header and payload, so it is checked before trusting either."""
    if limit - pos < _FIXED.size + _CRC.size:
        return None
    magic, length, n_payload, ndim, n_digest, raw_dtype, *dims = _FIXED.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or length > limit - pos or ndim > MAX_NDIM:
        return None
    start = _payload_start(n_digest)
    if start + n_payload + _CRC.size != length:
        return None
    (crc,) = _CRC.unpack_from(buf, pos + length - _CRC.size)
    if zlib.crc32(buf[pos : pos + length - _CRC.size]) != crc:
        return None
    dtype = _dtype(bytes(raw_dtype))
    shape = tuple(dims[:ndim])
    if dtype is None or math.prod(shape) * dtype.itemsize != n_payload:
        return None
    try:
        digest = bytes(buf[pos + _FIXED.size : pos + _FIXED.size + n_digest]).decode("ascii")
    except UnicodeDecodeError:
        return None
    return Record(digest, pos, length, dtype, shape, pos + start)


def scan(path: str, start: int, end: int) -> Iterator[tuple[int, Record]]:
    """(offset, record) of the intact records from ``start`` until the first damaged or
    incomplete one (a crash mid-write, or a writer still appending) or ``end``."""
    with open(path, "rb") as f:
        pos = start
        while pos < end:
            buf = memoryview(_pread(f.fileno(), min(CHUNK_BYTES, end - pos), pos))
            at = 0
            while (rec := parse_record(buf, at, len(buf))) is not None:
                yield pos + at, rec
                at += rec.length
            if at == 0:  # damaged, incomplete, or one record larger than a chunk
                claimed = _FIXED.unpack_from(buf, 0)[1] if len(buf) >= _FIXED.size else 0
                if not CHUNK_BYTES < claimed <= end - pos:
                    return
                buf = memoryview(_pread(f.fileno(), claimed, pos))
                if (rec := parse_record(buf, 0, len(buf))) is None:
                    return
                yield pos, rec
                at = rec.length
            pos += at


def read_chunks(
    fd: int, offsets: np.ndarray, lengths: np.ndarray
) -> Iterator[tuple[int, int, memoryview, np.ndarray]]:
    """(first entry, end entry, buffer, their positions in it) for entries sorted by offset:
    neighbours come from one large read. An entry past the end of the file lies past the
    buffer's end."""
    i, n = 0, len(offsets)
    while i < n:
        start = int(offsets[i])
        j, end = i + 1, start + int(lengths[i])
        while (
            j < n
            and int(offsets[j]) - end <= _MAX_GAP
            and int(offsets[j]) + int(lengths[j]) - start <= CHUNK_BYTES
        ):
            end = max(end, int(offsets[j]) + int(lengths[j]))
            j += 1
        buf = memoryview(_pread(fd, end - start, start))
        yield i, j, buf, (offsets[i:j] - start).astype(np.int64)
        i = j


OK, DAMAGED, OTHER = 0, 1, 2  # a record's status after check_chunk


def check_chunk(
    buf: memoryview, positions: np.ndarray, lengths: np.ndarray, digests: list[str]
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Check the records at ``positions`` of ``buf`` that should hold ``digests``.

    Returns each one's status (OK, DAMAGED or OTHER: intact but another digest's) and the
    arrays of the OK ones as groups (their numbers, stacked arrays). Records of one length (one
    shape, one dtype: the usual case) are checked together, with one CRC call per record as
    the only per-record Python work."""
    m = len(positions)
    length = int(lengths[0])
    first = parse_record(buf, int(positions[0]), int(positions[0]) + length) if m > 1 else None
    if (
        first is None
        or np.any(lengths != length)
        or any(len(d) != len(first.digest) for d in digests)
    ):
        return _check_each(buf, positions, lengths, digests)
    status = np.full(m, DAMAGED, dtype=np.int8)
    whole = np.flatnonzero(positions + length <= len(buf))
    rows = _rows(buf, positions[whole], length)
    body = rows[:, : length - _CRC.size]
    crc = np.ascontiguousarray(rows[:, length - _CRC.size :]).view("<u4")[:, 0]
    template = np.frombuffer(buf, np.uint8, count=_FIXED.size, offset=first.start)
    intact = (rows[:, : _FIXED.size] == template).all(1)
    intact &= np.fromiter((zlib.crc32(r) for r in body), np.uint32, len(body)) == crc
    n_digest = len(first.digest)
    wanted = np.frombuffer("".join(digests[k] for k in whole).encode(), np.uint8)
    same = (rows[:, _FIXED.size : _FIXED.size + n_digest] == wanted.reshape(-1, n_digest)).all(1)
    status[whole] = np.where(intact, np.where(same, OK, OTHER), DAMAGED)
    good = np.flatnonzero(intact & same)
    at = first.payload - first.start
    payload = np.ascontiguousarray(rows[good, at : length - _CRC.size])
    arrays = payload.view(first.dtype).reshape(len(good), *first.shape)
    return status, [(whole[good], arrays)]


def _rows(buf: memoryview, positions: np.ndarray, length: int) -> np.ndarray:
    """``(m, length)`` bytes of the records at ``positions``: a view when they are back to back."""
    u8 = np.frombuffer(buf, np.uint8)
    if len(positions) and np.all(np.diff(positions) == length):
        p0 = int(positions[0])
        return u8[p0 : p0 + len(positions) * length].reshape(-1, length)
    return u8[positions[:, None] + np.arange(length)]


def _check_each(
    buf: memoryview, positions: np.ndarray, lengths: np.ndarray, digests: list[str]
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    status = np.full(len(positions), DAMAGED, dtype=np.int8)
    groups = []
    for k, (pos, length) in enumerate(zip(positions.tolist(), lengths.tolist(), strict=True)):
        rec = parse_record(buf, pos, min(len(buf), pos + length))
        if rec is None or rec.length != length:
            continue
        if rec.digest != digests[k]:
            status[k] = OTHER
            continue
        status[k] = OK
        groups.append((np.array([k]), rec.array(buf)[None].copy()))
    return status, groups


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
