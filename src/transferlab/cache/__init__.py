"""Content-addressed cache of bottleneck features, built for millions of images.

Layout under the cache root::

    features/<namespace>/packs/<host>-<pid>-<random>.pack   records, appended by one writer
    features/<namespace>/packs/<same name>.idx               (key, offset, length) per record
    features/<namespace>/<digest[:2]>/<digest>.feat          the old one-file-per-image entries
    exports/<backbone identity>.onnx                         written by transferlab.runtime

The namespace comes from the backbone identity (spec, weights hash, preprocessing, network
structure, decode version: ``Backbone.identity``), and the key inside it is the image's content
digest, so changing any of those simply misses.

Why packs and not a file per image, LMDB or Arrow: a file per image meant a million files (one
inode and a 4 KB block each, ~95 s to read cold, far worse on a network filesystem); LMDB needs
a lock file that network filesystems and several hosts do not share safely, and Arrow files are
immutable (no appends). Append-only packs need no new dependency, no lock between writers (each
writer has its own pack, so ranks on several machines can share one cache folder), and are read
with a few large sequential reads. Formats: :mod:`transferlab.cache.records`; writers and the
index: :mod:`transferlab.cache.packs`.

Every record carries its digest and a CRC over header and payload, checked on every read: a
truncated, bit-flipped or misfiled record is a miss (and remembered as damaged, so the next copy
of that digest, e.g. the recomputed one, is read instead), never returned. Old-format entries
are read and moved into this process's pack as they are read; :meth:`FeatureStore.compact`
(``transferlab cache prune``) merges finished packs and migrates what is left of the old ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import platformdirs

from transferlab.cache import legacy
from transferlab.cache.compact import compact_namespace
from transferlab.cache.packs import PackIndex, PackWriter
from transferlab.cache.records import encode_record, keys_of
from transferlab.progress import warn
from transferlab.storage import printable_path

__all__ = ["FeatureCache", "FeatureStore", "default_cache_dir"]

# sha256 hex from the data module; also accept other hex digests, but nothing that could escape
# the namespace folder as a path.
_DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")
PACKS = "packs"


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
    """Features of one backbone identity, keyed by image content digest.

    Thread-safe; a forked child gets a pack of its own on its first write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._index = PackIndex(self.path / PACKS)
        self._writer: PackWriter | None = None
        self._unwritable = False
        self._lock = threading.Lock()
        self._legacy: bool | None = None

    def get_many(self, digests: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached arrays for ``digests`` that are present and intact (hits only), each the
        caller's own (writable) array."""
        wanted = list(dict.fromkeys(digests))
        hits = {}
        for found, arrays in self._arrays(wanted):
            for i, array in zip(found.tolist(), arrays, strict=True):
                hits[wanted[i]] = array.copy()  # not a view that keeps the whole batch alive
        return hits

    def read_into(self, digests: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached features of ``digests[i]`` into ``out[i]`` (shape ``(n, *feature
        shape)``, any float dtype; a ``np.memmap`` works) and return the hit mask. Rows of
        misses are left as they were. Memory: one read chunk, whatever ``n`` is."""
        if len(out) != len(digests):
            raise ValueError(f"out has {len(out)} rows for {len(digests)} digests")
        first: dict[str, int] = {}
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        got = np.zeros(len(digests), dtype=bool)
        for found, arrays in self._arrays(list(first)):
            if arrays.shape[1:] == out.shape[1:]:  # another shape is not this namespace's
                out[rows[found]] = arrays
                got[rows[found]] = True
        if len(first) < len(digests):  # repeated digests: copy the first row's features
            source = np.fromiter((first[d] for d in digests), dtype=np.int64, count=len(digests))
            dup = np.flatnonzero((source != np.arange(len(digests))) & got[source])
            out[dup] = out[source[dup]]
            got[dup] = True
        return got

    def _arrays(self, wanted: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``wanted``, their arrays stacked) of the hits, a batch at a time."""
        for d in wanted:
            _check_digest(d)
        keys = keys_of(wanted)
        found = np.zeros(len(wanted), dtype=bool)
        with self._lock:
            self._index.refresh(self._own_pack())
        for _ in range(2):  # a second pass if packs were compacted away while being read
            todo = np.flatnonzero(~found)
            for i, arrays in self._index.fetch([wanted[j] for j in todo], keys[todo]):
                found[todo[i]] = True
                yield todo[i], arrays
            with self._lock:
                if found.all() or not self._index.refresh(self._own_pack()):
                    break
        if not found.all() and self._has_legacy():
            yield from self._legacy_arrays(wanted, np.flatnonzero(~found))

    def _legacy_arrays(
        self, wanted: list[str], todo: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Hits move into this process's pack (then the old file goes), unless the cache is
        # read-only to us: then they are only read.
        movable = os.access(self.path, os.W_OK)
        moved: dict[str, np.ndarray] = {}
        for i in todo:
            entry = legacy.entry_path(self.path, wanted[i])
            try:
                array = legacy.decode(entry.read_bytes(), wanted[i])
            except OSError:
                continue  # absent or unreadable: a miss
            if array is not None:
                yield np.array([i]), array[None]
                if not movable:
                    continue
                moved[wanted[i]] = array
            with contextlib.suppress(OSError):
                entry.unlink()  # damaged (dropped, to be recomputed) or moved below
                entry.parent.rmdir()  # the last of its shard: later misses need not look here
        if moved:
            self.put_many(moved)

    def _has_legacy(self) -> bool:
        if self._legacy is None:
            self._legacy = legacy.has_entries(self.path)
        return self._legacy

    def _own_pack(self) -> str | None:
        return None if self._writer is None else self._writer.path.name

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """Append arrays to this process's pack; a digest put again is read from its newest
        record.

        The cache only saves time: when it cannot be written (full disk, no permission) that is
        said once, and the run goes on without it (a half-written record is never read)."""
        if self._unwritable or not items:
            return
        records = [(_check_digest(d), encode_record(a, d)) for d, a in items.items()]
        try:
            with self._lock:
                self._writable_pack().append(records)
        except OSError as exc:
            self._unwritable = True
            warn(
                f"feature cache {printable_path(self.path)}: cannot write "
                f"({exc.strerror or exc}); continuing without caching"
            )

    def _writable_pack(self) -> PackWriter:
        w = self._writer
        if w is None or w.pid != os.getpid() or w.full:
            if w is not None and w.pid == os.getpid():
                w.close()  # full: the next pack takes over (a fork child leaves the parent's)
            self._writer = w = PackWriter(self.path / PACKS)
        return w

    def close(self) -> None:
        """Finish this process's pack (compaction may then merge it); later puts start another."""
        with self._lock:
            if self._writer is not None and self._writer.pid == os.getpid():
                self._writer.close()
            self._writer = None

    def compact(self) -> dict[str, int]:
        """Finish this process's pack, then merge the namespace's finished packs and old-format
        entries into one pack (see :mod:`transferlab.cache.compact`); returns its counts."""
        self.close()
        self._legacy = None
        return compact_namespace(self.path)

    def __len__(self) -> int:
        """Records in the packs (a digest put twice counts twice), old-format entries aside."""
        with self._lock:
            self._index.refresh(self._own_pack())
            return len(self._index)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a lowercase hex content digest: {digest!r}")
    return digest


def _namespace_dirname(identity: str) -> str:
    # Identities from Backbone.identity() are already filename-safe; anything else is slugged,
    # and the hash suffix keeps distinct identities apart after slugging/truncation.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("._")[:64] or "ns"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
