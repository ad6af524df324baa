"""Compaction: one namespace's finished packs and old one-file entries merged into one pack.

A pack is finished when no writer holds its lock (its process closed it or ended). Live packs
are left alone, so compaction may run while fits write; on a network filesystem without
working ``flock`` run it when nothing writes. Readers that still hold the old index see the
merged pack at their next refresh (a pack vanishing mid-read makes them refresh and retry).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from transferlab.cache import legacy
from transferlab.cache.packs import PACK_SUFFIX, PackIndex, PackWriter, index_path, try_lock
from transferlab.cache.records import CHUNK_BYTES, encode_record, parse_record, read_chunks


def compact_namespace(folder: Path) -> dict[str, int]:
    """Merge the finished packs under ``folder/packs`` and the old-format entries under
    ``folder`` into one new pack, keeping one intact record per digest. Returns counts: packs
    merged, records kept, records dropped (duplicates, damaged), old entries migrated."""
    packs_dir = folder / "packs"
    locked = _lock_finished(packs_dir)
    done = {"packs": len(locked), "records": 0, "dropped": 0, "migrated": 0}
    old = list(legacy.all_entries(folder))
    try:
        if len(locked) < 2 and not old:
            return done  # nothing to merge
        writer = PackWriter(packs_dir)
        try:
            seen: set[str] = set()
            batch = _Batch(writer)
            index = PackIndex(packs_dir)
            index.refresh()
            for name in locked:
                _copy_pack(packs_dir / name, index, seen, batch, done)
            for digest, path in old:
                _migrate(digest, path, seen, batch, done)
            batch.flush()
        finally:
            writer.close()
        for name in locked:  # only now: the merged pack holds everything they did
            for path in (packs_dir / name, index_path(packs_dir / name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for _, path in old:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_empty_shards(folder)
    finally:
        for f in locked.values():
            f.close()
    return done


def _lock_finished(packs_dir: Path) -> dict[str, BinaryIO]:
    """Open and lock every pack no writer holds (name -> open file holding the lock)."""
    locked: dict[str, BinaryIO] = {}
    names = sorted(n for n in os.listdir(packs_dir) if n.endswith(PACK_SUFFIX)) if (
        packs_dir.is_dir()
    ) else []  # fmt: skip
    for name in names:
        try:
            f = open(packs_dir / name, "rb")  # noqa: SIM115 (closed by the caller)
        except FileNotFoundError:
            continue
        if try_lock(f):
            locked[name] = f
        else:
            f.close()
    return locked


class _Batch:
    """Records collected for the writer and appended a chunk at a time."""

    def __init__(self, writer: PackWriter) -> None:
        self.writer = writer
        self.records: list[tuple[str, bytes]] = []
        self.size = 0

    def add(self, digest: str, blob: bytes) -> None:
        self.records.append((digest, blob))
        self.size += len(blob)
        if self.size >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.records:
            self.writer.append(self.records)
        self.records, self.size = [], 0


def _copy_pack(
    path: Path, index: PackIndex, seen: set[str], batch: _Batch, done: dict[str, int]
) -> None:
    """Copy the intact records of one pack, located through its index (or a scan of it)."""
    offsets, lengths = index.entries_of(path.name)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, j, buf, positions in read_chunks(fd, offsets, lengths):
            for pos, length in zip(positions.tolist(), lengths[i:j].tolist(), strict=True):
                rec = parse_record(buf, pos, min(len(buf), pos + length))
                if rec is None or rec.length != length or rec.digest in seen:
                    done["dropped"] += 1
                    continue
                seen.add(rec.digest)
                batch.add(rec.digest, bytes(buf[pos : pos + length]))
                done["records"] += 1
    finally:
        os.close(fd)


def _migrate(digest: str, path: Path, seen: set[str], batch: _Batch, done: dict[str, int]) -> None:
    try:
        array = legacy.decode(path.read_bytes(), digest)
    except OSError:
        return
    if array is None or digest in seen:
        done["dropped"] += 1
        return
    seen.add(digest)
    batch.add(digest, encode_record(array, digest))
    done["migrated"] += 1


def _remove_empty_shards(folder: Path) -> None:
    for shard in folder.iterdir():
        if shard.is_dir() and shard.name != "packs":
            with contextlib.suppress(OSError):  # not empty
                shard.rmdir()
