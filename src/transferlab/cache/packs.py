"""Pack files of one namespace: the writer that appends to this process's own pack, and the
index of every pack in the folder that readers look digests up in.

Every writer (a :class:`FeatureStore` in one process: a fit, one rank of a distributed run on
any host) appends to a pack of its own, named ``<host>-<pid>-<random>.pack``, so writers never
share a file and need no lock to coordinate. A record goes to the pack first and its index
entry after, each flushed, so a crash leaves at worst a record without an index entry (found
again by scanning the pack's tail) or an incomplete last record (failing its CRC). A writer
holds ``flock(LOCK_EX)`` on its pack while it may append, which is how compaction tells a live
pack from a finished one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from transferlab.cache.records import (
    DAMAGED,
    INDEX,
    OK,
    check_chunk,
    key_of,
    read_chunks,
    scan,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; compaction then relies on being run alone
    fcntl = None  # type: ignore[assignment]

PACK_SUFFIX = ".pack"
INDEX_SUFFIX = ".idx"
# A writer starts a new pack past this size: bounded files for copying and compaction, and at a
# million 1280-d float32 entries still only ~5 packs.
PACK_BYTES = 1 << 30


def index_path(pack: Path) -> Path:
    return pack.with_suffix(INDEX_SUFFIX)


def try_lock(f: BinaryIO) -> bool:
    """Take the writer lock on an open pack without waiting; False if someone holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class PackWriter:
    """Appends records to a new pack of this process's own (created on first use)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32] or "host"
        fd, name = tempfile.mkstemp(prefix=f"{host}-{os.getpid()}-", suffix=PACK_SUFFIX, dir=folder)
        self.pid = os.getpid()
        self.path = Path(name)
        self.pack = os.fdopen(fd, "ab")
        # mkstemp makes 0600 files; a cache shared via $TRANSFERLAB_CACHE must be readable by
        # the other users of that folder.
        with contextlib.suppress(OSError, AttributeError):
            os.fchmod(fd, 0o644)
        try_lock(self.pack)
        self.index = open(index_path(self.path), "ab")  # noqa: SIM115 (lives as long as self)
        self.offset = 0

    def append(self, records: list[tuple[str, bytes]]) -> None:
        entries = np.zeros(len(records), dtype=INDEX)
        offset = self.offset
        for i, (digest, blob) in enumerate(records):
            entries[i] = (key_of(digest), offset, len(blob), 0)
            offset += len(blob)
        self.pack.write(b"".join(blob for _, blob in records))
        self.pack.flush()
        self.index.write(entries.tobytes())
        self.index.flush()
        self.offset = offset

    @property
    def full(self) -> bool:
        return self.offset >= PACK_BYTES

    def close(self) -> None:
        for f in (self.index, self.pack):
            with contextlib.suppress(OSError):
                f.close()


@dataclass
class _Pack:
    """What a reader knows about one pack: its index entries so far, and how far they reach."""

    number: int
    entries: list[np.ndarray] = field(default_factory=list)
    index_read: int = 0  # bytes of the .idx consumed (whole entries)
    covered: int = 0  # end of the last record known (from the index or a scan)


class PackIndex:
    """Every pack's index entries in the folder, merged and sorted by key, kept up to date
    incrementally (index files only grow; a pack's tail beyond its index is scanned)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.packs: dict[str, _Pack] = {}
        self.names: list[str] = []  # pack number -> file name
        self.bad: set[tuple[int, int]] = set()  # (pack number, offset) found damaged
        self._merged: tuple[np.ndarray, ...] | None = None

    def refresh(self, own: str | None = None) -> bool:
        """Read what was appended since the last call; True if any pack came, went or grew."""
        try:
            present = {n for n in os.listdir(self.folder) if n.endswith(PACK_SUFFIX)}
        except FileNotFoundError:
            present = set()
        changed = set(self.packs) - present
        for name in changed:
            del self.packs[name]
        for name in sorted(present):
            pack = self.packs.get(name)
            if pack is None:
                pack = self.packs[name] = _Pack(number=len(self.names))
                self.names.append(name)
            if self._update(name, pack):
                changed.add(name)
        if changed or self._merged is None:
            self._merge(own)
        return bool(changed)

    def _update(self, name: str, pack: _Pack) -> bool:
        path = self.folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False  # compacted or pruned since the listing; dropped at the next refresh
        try:
            with open(index_path(path), "rb") as f:
                f.seek(pack.index_read)
                data = f.read()
        except FileNotFoundError:
            data = b""  # lost index: the tail scan below rebuilds it (in memory) from the pack
        whole = len(data) // INDEX.itemsize * INDEX.itemsize
        grew = False
        if whole:
            new = np.frombuffer(data[:whole], dtype=INDEX)
            pack.entries.append(new)
            pack.index_read += whole
            ends = new["offset"] + new["length"].astype(np.uint64)
            inside = ends[ends <= size]
            if len(inside):
                pack.covered = max(pack.covered, int(inside.max()))
            grew = True
        if size > pack.covered:  # records without index entries: a crash, or a live writer
            found = [
                (key_of(r.digest), off, r.length, 0) for off, r in scan(path, pack.covered, size)
            ]
            if found:
                pack.entries.append(np.array(found, dtype=INDEX))
                pack.covered = found[-1][1] + found[-1][2]
                grew = True
        return grew

    def _merge(self, own: str | None) -> None:
        keys, packs, offsets, lengths = [], [], [], []
        for pack in self.packs.values():
            for e in pack.entries:
                keys.append(e["key"])
                packs.append(np.full(len(e), pack.number, dtype=np.int32))
                offsets.append(e["offset"])
                lengths.append(e["length"])
        if not keys:
            empty = np.zeros(0, dtype=np.uint64)
            self._merged = (empty, np.zeros(0, np.int32), empty, np.zeros(0, np.uint32))
            return
        k, p, o, n = (np.concatenate(a) for a in (keys, packs, offsets, lengths))
        # Among a key's records the newest goes first: this process's own pack, then later
        # offsets (a re-put after damage lands after the damaged record).
        own_number = self.packs[own].number if own in self.packs else -1
        order = np.lexsort((-o.astype(np.int64), p != own_number, k))
        self._merged = (k[order], p[order], o[order], n[order])

    def __len__(self) -> int:
        return 0 if self._merged is None else len(self._merged[0])

    def entries_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) of one pack's known records, by offset, each record once."""
        pack = self.packs.get(name)
        if pack is None or not pack.entries:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        entries = np.concatenate(pack.entries)
        entries = entries[np.argsort(entries["offset"], kind="stable")]
        offsets = entries["offset"]
        first = np.r_[True, offsets[1:] != offsets[:-1]]
        return offsets[first], entries["length"][first]

    def fetch(
        self, digests: list[str], keys: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(request numbers, their stacked arrays) of the first intact record of each wanted
        digest (``keys`` are their index keys). A damaged record is remembered and the key's
        next candidate tried; so is a record of another digest (a colliding or garbled entry)."""
        merged = self._merged
        assert merged is not None, "refresh() first"
        mk = merged[0]
        pos = np.searchsorted(mk, keys)
        todo = np.flatnonzero(pos < len(mk))
        while len(todo):
            todo = todo[mk[pos[todo]] == keys[todo]]
            failed: list[np.ndarray] = []
            yield from self._read(merged, todo, pos[todo], digests, failed)
            todo = np.concatenate(failed) if failed else todo[:0]
            pos[todo] += 1
            todo = todo[pos[todo] < len(mk)]

    def _read(
        self,
        merged: tuple[np.ndarray, ...],
        reqs: np.ndarray,
        at: np.ndarray,
        digests: list[str],
        failed: list[np.ndarray],
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        _, mp, mo, ml = merged
        order = np.lexsort((mo[at], mp[at]))
        reqs, at = reqs[order], at[order]
        for number in np.unique(mp[at]).tolist():
            sel = np.flatnonzero(mp[at] == number)
            r, where = reqs[sel], (number, mo[at[sel]], ml[at[sel]])
            yield from self._read_pack(where, r, [digests[k] for k in r], failed)

    def _read_pack(
        self,
        where: tuple[int, np.ndarray, np.ndarray],
        reqs: np.ndarray,
        digests: list[str],
        failed: list[np.ndarray],
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        number, offsets, lengths = where
        known_bad = np.array([(number, int(o)) in self.bad for o in offsets], dtype=bool)
        if known_bad.any():
            failed.append(reqs[known_bad])
            digests = [d for d, b in zip(digests, known_bad, strict=True) if not b]
            reqs = reqs[~known_bad]
            offsets, lengths = offsets[~known_bad], lengths[~known_bad]
        try:
            fd = os.open(self.folder / self.names[number], os.O_RDONLY)
        except OSError:  # pruned or compacted away since the index was read
            failed.append(reqs)
            return
        try:
            for i, j, buf, positions in read_chunks(fd, offsets, lengths):
                status, groups = check_chunk(buf, positions, lengths[i:j], digests[i:j])
                damaged = np.flatnonzero(status == DAMAGED)
                self.bad.update((number, int(o)) for o in offsets[i:j][damaged])
                failed.append(reqs[i:j][status != OK])
                for k, arrays in groups:
                    yield reqs[i:j][k], arrays
        finally:
            os.close(fd)
