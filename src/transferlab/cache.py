"""Content-addressed cache of bottleneck features.

Layout under the cache root::

    features/<namespace>/<digest[:2]>/<digest>.feat   one entry per image
    exports/<backbone identity>.onnx                  written by transferlab.runtime

The namespace comes from the backbone identity (spec, weights hash, preprocessing, network
structure, decode version: ``Backbone.identity``), and the key inside it is the image's content
digest, so changing any of those simply misses.

Entry format (no pickle anywhere; little-endian)::

    b"TLF1" | u32 header_len | header (JSON: dtype, shape, digest; space-padded so the payload
    starts 64-byte aligned) | payload (raw C-order array bytes) | u32 crc32 of everything before it

A truncated, padded or bit-flipped entry fails the length or CRC check and is treated as a miss
(and deleted), never returned. The header names the content digest of the image the features
belong to; an entry under another digest's name (copied over, or edited with its CRC recomputed)
does not match the name it is read by, and is a miss that gets recomputed too. Writes go to a
temp file in the same folder and are published with ``os.replace``, which is atomic, so
concurrent writers and readers only ever see whole entries; two processes writing the same
digest simply race to publish identical content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import platformdirs

from transferlab.progress import warn
from transferlab.storage import printable_path

__all__ = ["FeatureCache", "FeatureStore", "default_cache_dir"]

_MAGIC = b"TLF1"
_ALIGN = 64
_SUFFIX = ".feat"
# sha256 hex from the data module; also accept other hex digests, but nothing that could escape
# the namespace folder as a path.
_DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")
_MAX_HEADER = 4096


def default_cache_dir() -> Path:
    """``$TRANSFERLAB_CACHE`` if set, else the platform's user cache dir for transferlab."""
    env = os.environ.get("TRANSFERLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("transferlab"))


class FeatureCache:
    """The cache root; hands out one :class:`FeatureStore` per backbone identity."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    @property
    def exports_dir(self) -> Path:
        """Where the feature runtimes keep exported ONNX graphs (created on first export)."""
        return self.root / "exports"

    def namespace(self, backbone_identity: str) -> FeatureStore:
        if not backbone_identity:
            raise ValueError("backbone_identity must be a non-empty string")
        return FeatureStore(self.root / "features" / _namespace_dirname(backbone_identity))

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"


class FeatureStore:
    """Features of one backbone identity, keyed by image content digest."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._unwritable = False

    def get_many(self, digests: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached arrays for ``digests`` that are present and intact (hits only)."""
        hits: dict[str, np.ndarray] = {}
        for digest in digests:
            if digest in hits:
                continue
            entry = self._entry_path(digest)
            try:
                with open(entry, "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                continue
            except OSError:
                continue  # unreadable (permissions, I/O error): a miss; the put will retry
            array = _decode(blob, digest)
            if array is None:
                # Corrupt or truncated: drop it so the recomputed features replace it.
                with contextlib.suppress(OSError):
                    entry.unlink()
                continue
            hits[digest] = array
        return hits

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """Store arrays atomically (temp file + os.replace); existing entries are overwritten.

        The cache only saves time: when it cannot be written (full disk, no permission) that is
        said once, and the run goes on without it (nothing half-written is left)."""
        if self._unwritable:
            return
        try:
            self._put_many(items)
        except OSError as exc:
            self._unwritable = True
            warn(
                f"feature cache {printable_path(self.path)}: cannot write "
                f"({exc.strerror or exc}); continuing without caching"
            )

    def _put_many(self, items: dict[str, np.ndarray]) -> None:
        made: set[Path] = set()
        for digest, array in items.items():
            entry = self._entry_path(digest)
            shard = entry.parent
            if shard not in made:
                shard.mkdir(parents=True, exist_ok=True)
                made.add(shard)
            blob = _encode(array, digest)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=shard)
            try:
                with os.fdopen(fd, "wb") as f:
                    # mkstemp makes 0600 files; a cache shared via $TRANSFERLAB_CACHE must be
                    # readable by the other users of that folder.
                    with contextlib.suppress(OSError, AttributeError):
                        os.fchmod(f.fileno(), 0o644)
                    f.write(blob)
                os.replace(tmp, entry)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def _entry_path(self, digest: str) -> Path:
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a lowercase hex content digest: {digest!r}")
        return self.path / digest[:2] / f"{digest}{_SUFFIX}"

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"


def _namespace_dirname(identity: str) -> str:
    # Identities from Backbone.identity() are already filename-safe; anything else is slugged,
    # and the hash suffix keeps distinct identities apart after slugging/truncation.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("._")[:64] or "ns"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _encode(array: np.ndarray, digest: str) -> bytes:
    a = np.asarray(array)
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise TypeError(f"only plain numeric arrays can be cached, got dtype {a.dtype}")
    # Store little-endian so entries are portable; '<' or '|' (byte-sized) after this.
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    header = json.dumps({"dtype": a.dtype.str, "shape": list(a.shape), "digest": digest}).encode()
    header_len = len(header)
    pad = (-(len(_MAGIC) + 4 + header_len)) % _ALIGN
    header += b" " * pad
    head = _MAGIC + struct.pack("<I", len(header)) + header
    body = head + a.tobytes(order="C")  # C order whatever the input's layout (keeps 0-d as 0-d)
    return body + struct.pack("<I", zlib.crc32(body))


def _decode(blob: bytes, digest: str) -> np.ndarray | None:
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
    if owner != digest:
        return None
    if dtype.hasobject or any(d < 0 for d in shape):
        return None
    start = 8 + header_len
    count = int(np.prod(shape, dtype=np.int64))
    if start + count * dtype.itemsize != len(blob) - 4:
        return None
    # Copy into a writable array of its own so callers may modify it and the blob can be freed.
    return np.frombuffer(blob, dtype=dtype, count=count, offset=start).reshape(shape).copy()
