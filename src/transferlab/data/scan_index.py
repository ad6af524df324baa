"""What the last scan of a dataset found, remembered per file, so a re-run reads only what changed.

One SQLite database per dataset root, under the cache dir (``<cache>/scans/<sha of the resolved
root>.sqlite``; never in the data folder), maps a file's identity on disk (absolute path, size,
mtime_ns, ctime_ns, inode) to what reading it found: its content digest
(:func:`~transferlab.data.images.bytes_digest`), whether it decoded (or why not) and its size in
pixels. A file whose stat no longer matches is simply a miss and is read again; a file modified
within :data:`RACY_NS` of being read is not remembered, since a filesystem with coarse timestamps
could give its next version the same stat (git's "racy clean" problem).

The index is an optimisation, never a requirement: a cache dir that cannot be written, a locked
or damaged database, anything :mod:`sqlite3` raises disables it for the run with one warning and
every file is read as before. WAL mode and a busy timeout let concurrent runs on the same root
read and write it; a corrupt file is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import __version__ as pillow_version

from transferlab.cache import default_cache_dir
from transferlab.data.images import DECODE_VERSION
from transferlab.progress import warn

__all__ = ["RACY_NS", "Checked", "FileKey", "ScanIndex", "file_key", "index_path"]

#: (size, mtime_ns, ctime_ns, inode): a file's identity on disk.
FileKey = tuple[int, int, int, int]

#: A file modified this recently (ns) when it was read is not remembered (see module docstring).
RACY_NS = 2_000_000_000

# Bumped when the table or what a check means changes; Pillow's version is part of it because a
# new decoder may accept or refuse different files. A mismatch empties the index.
_VERSION = f"1/decode{DECODE_VERSION}/pillow{pillow_version}"
_BUSY_TIMEOUT_S = 10.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL, reason TEXT,
    width INTEGER, height INTEGER, max_pixels INTEGER NOT NULL
);
"""
_warned: set[str] = set()  # one warning per database per process, however many scans


@dataclass(frozen=True)
class Checked:
    """What reading one file found: ``reason`` None means it decoded, at ``width × height``;
    a failure was found under ``max_pixels`` (the pixel limit is part of the check)."""

    digest: str
    reason: str | None
    width: int | None
    height: int | None
    max_pixels: int


def file_key(st: os.stat_result) -> FileKey:
    """The parts of a ``stat`` that change whenever the file's content may have."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def index_path(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where the index of dataset ``root`` lives: one file per resolved root."""
    resolved = os.path.realpath(os.fspath(root))
    name = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:32]
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / "scans" / f"{name}.sqlite"


class ScanIndex:
    """The scan index of one dataset root (see the module docstring). Use :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._stored: Iterable[bytes] = ()  # the paths the last lookup found rows for

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
    ) -> ScanIndex | None:
        """The index of ``root``, or None (after one warning) when it cannot be used."""
        path = index_path(root, cache_dir)
        try:
            return cls(_connect(path), path)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) or not _remove(path):
                _warn_once(path, e)
                return None
        try:  # a damaged file: it only ever held what a scan can find again
            return cls(_connect(path), path)
        except sqlite3.Error as e:
            _warn_once(path, e)
            return None

    def lookup(self, paths: Sequence[str], keys: Sequence[FileKey | None]) -> list[Checked | None]:
        """What was found for each path whose file still has the stat ``key``; None elsewhere."""
        try:
            rows = self._conn.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, digest, reason, width, height,"
                " max_pixels FROM files"
            ).fetchall()
        except sqlite3.Error as e:
            _warn_once(self.path, e)
            return [None] * len(paths)
        known = {r[0]: r[1:] for r in rows}
        self._stored = known.keys()
        out: list[Checked | None] = []
        for p, key in zip(paths, keys, strict=True):
            row = known.get(os.fsencode(os.path.abspath(p))) if key is not None else None
            out.append(Checked(*row[4:]) if row is not None and tuple(row[:4]) == key else None)
        return out

    def store(self, found: Iterable[tuple[str, FileKey, Checked]]) -> None:
        """Remember what was found for each (path, stat key at read time) unless it is racy."""
        limit = time.time_ns() - RACY_NS
        rows = [
            (
                os.fsencode(os.path.abspath(p)),
                *key,
                c.digest,
                _text(c.reason),
                c.width,
                c.height,
                c.max_pixels,
            )
            for p, key, c in found
            if key[1] < limit
        ]
        if not rows:
            return
        try:
            with self._conn:  # one transaction: concurrent writers queue on the busy timeout
                self._conn.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as e:
            _warn_once(self.path, e)

    def forget_missing(self, seen: Iterable[str]) -> int:
        """Drop the rows (read by the last :meth:`lookup`) of files that are no longer on disk,
        among those not in ``seen``: a dataset whose files come and go keeps an index of the
        files it has, not of every file it ever had. Returns how many rows went."""
        seen_keys = {os.fsencode(os.path.abspath(p)) for p in seen}
        gone = [(p,) for p in self._stored if p not in seen_keys and not os.path.lexists(p)]
        if not gone:
            return 0
        try:
            with self._conn:
                self._conn.executemany("DELETE FROM files WHERE path = ?", gone)
        except sqlite3.Error as e:
            _warn_once(self.path, e)
            return 0
        return len(gone)

    def close(self) -> None:
        self._conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database in WAL mode, emptied if written by another
    version. Raises :class:`sqlite3.Error` for anything that makes it unusable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise sqlite3.OperationalError(f"cannot create {path.parent}: {e.strerror or e}") from e
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a lost last commit only costs a re-read
        with conn:
            conn.executescript(_SCHEMA)
            got = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if got is None or got[0] != _VERSION:
                conn.execute("DELETE FROM files")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (_VERSION,))
        return conn
    except BaseException:
        conn.close()
        raise


def _remove(path: Path) -> bool:
    removed = True
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
        except OSError:
            removed = False
    return removed


def _text(reason: str | None) -> str | None:
    # a decoder message may quote undecodable bytes; SQLite TEXT must be valid UTF-8
    if reason is None:
        return None
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")


def _warn_once(path: Path, error: Exception) -> None:
    if str(path) in _warned:
        return
    _warned.add(str(path))
    warn(
        f"scan index {path} is unusable ({error}); every image is read and checked this "
        "time. Make the cache dir writable (--cache-dir or $TRANSFERLAB_CACHE) to skip "
        "unchanged files on the next run."
    )
