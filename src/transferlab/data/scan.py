"""One pass over every file before training: content digest + a cheap full decode check.

The digest keys the feature cache and finds leakage (the same picture in two splits). The
decode check runs at 1/8 scale for JPEGs (Pillow ``draft``), so truncated or corrupt files are
found in a fraction of the time a real decode takes, before any strategy trips over them.

With a scan index (:mod:`~transferlab.data.scan_index`, one per dataset root) only new or changed
files are read: the others are a ``stat`` and a row of the index, failures included (a corrupt
file stays skipped, without being decoded again, until it changes).

The first read of a large folder runs in worker processes (Pillow's header parsing is Python
code, which threads would serialize). Workers run only Pillow, hashlib and this package's data
modules, so they start under any start method; under spawn or forkserver (macOS, Windows, and
Linux from Python 3.14) a script that calls ``fit`` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from transferlab.data.images import (
    MAX_PIXELS,
    bytes_digest,
    check_decodes,
    file_digest,
    pixel_limit_problem,
)
from transferlab.data.scan_index import Checked, FileKey, ScanIndex, file_key
from transferlab.errors import ImageError

__all__ = ["ScanResult", "file_digests", "scan_files"]

_CHECK_SIZE = (32, 32)
_CHUNK = 64  # progress granularity, and the smallest scan worth a process pool


@dataclass
class ScanResult:
    digests: list[str | None]  # None where the file could not be read at all
    failures: list[tuple[int, str]]  # (index, reason)
    unchanged: int = 0  # files answered by the scan index without reading them


# (digest or None, failure reason or None, (w, h) when it decoded, stat key of what was read)
_Found = tuple[str | None, str | None, tuple[int, int] | None, FileKey | None]


def _scan_one(args: tuple[str, int]) -> _Found:
    path, max_pixels = args
    try:
        with open(path, "rb") as f:
            before = file_key(os.fstat(f.fileno()))
            data = f.read()
            after = file_key(os.fstat(f.fileno()))
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}", None, None
    key = before if before == after else None  # written to while read: do not remember it
    digest = bytes_digest(data)
    try:
        size = check_decodes(data, max_pixels=max_pixels, draft=_CHECK_SIZE)
    except ImageError as e:
        return digest, e.reason, None, key
    return digest, None, size, key


def scan_files(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    on_progress: Callable[[int], None] | None = None,
    index_root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ScanResult:
    """Digest and decode-check ``paths`` in worker processes, keeping input order.

    ``index_root``: the dataset root whose scan index (under ``cache_dir``, default the user
    cache) answers for unchanged files and remembers the others; None reads every file.
    """
    index = ScanIndex.open(index_root, cache_dir) if index_root is not None else None
    try:
        known = _known(index, paths, max_pixels)
        todo = [i for i, k in enumerate(known) if k is None]
        if on_progress and len(todo) < len(paths):
            on_progress(len(paths) - len(todo))
        found = _read_all([(str(paths[i]), max_pixels) for i in todo], workers, on_progress)
        if index is not None:
            index.store(_checked(paths, todo, found, max_pixels))
            index.forget_missing(paths)
    finally:
        if index is not None:
            index.close()
    for i, (digest, reason, _, _) in zip(todo, found, strict=True):
        known[i] = (digest, reason)
    failures = [(i, k[1]) for i, k in enumerate(known) if k is not None and k[1] is not None]
    digests = [k[0] if k is not None else None for k in known]
    return ScanResult(digests=digests, failures=failures, unchanged=len(paths) - len(todo))


def file_digests(
    paths: Sequence[str],
    *,
    index_root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Content digests of ``paths``: from the scan index of ``index_root`` where the file is
    unchanged since it was scanned, hashed otherwise (no decode check; nothing is stored)."""
    index = ScanIndex.open(index_root, cache_dir) if index_root is not None else None
    try:
        known = _known(index, paths, None)
    finally:
        if index is not None:
            index.close()
    todo = [i for i, k in enumerate(known) if k is None]
    # hashlib releases the GIL: threads overlap the reads
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, digest in zip(todo, pool.map(file_digest, [paths[i] for i in todo]), strict=True):
            known[i] = (digest, None)
    return [k[0] for k in known]  # type: ignore[index]


def _known(
    index: ScanIndex | None, paths: Sequence[str], max_pixels: int | None
) -> list[tuple[str, str | None] | None]:
    """(digest, failure reason) per path that the index answers for; None for the others.

    A file that decoded is judged again against this run's ``max_pixels`` from its stored
    size; a failure stands only if found under the same limit. ``max_pixels`` None: digests
    only, whatever the check found."""
    if index is None:
        return [None] * len(paths)
    keys: list[FileKey | None] = []
    for p in paths:
        try:
            keys.append(file_key(os.stat(p)))
        except OSError:
            keys.append(None)  # the read reports it
    out: list[tuple[str, str | None] | None] = []
    for c in index.lookup(paths, keys):
        if c is None or max_pixels is None:
            out.append(None if c is None else (c.digest, None))
        elif c.reason is None and c.width is not None and c.height is not None:
            out.append((c.digest, pixel_limit_problem((c.width, c.height), max_pixels)))
        else:
            out.append((c.digest, c.reason) if c.max_pixels == max_pixels else None)
    return out


def _read_all(
    jobs: list[tuple[str, int]], workers: int | None, on_progress: Callable[[int], None] | None
) -> list[_Found]:
    """:func:`_scan_one` of every job, in order, in worker processes when there are enough."""
    if workers is None:
        workers = os.cpu_count() or 1
    found: list[_Found] = []
    if workers <= 1 or len(jobs) < _CHUNK:
        _consume(map(_scan_one, jobs), found, on_progress)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            _consume(pool.map(_scan_one, jobs, chunksize=32), found, on_progress)
    if on_progress and len(found) % _CHUNK:
        on_progress(len(found) % _CHUNK)
    return found


def _consume(
    results: Iterable[_Found], found: list[_Found], on_progress: Callable[[int], None] | None
) -> None:
    for result in results:
        found.append(result)
        if on_progress and len(found) % _CHUNK == 0:
            on_progress(_CHUNK)


def _checked(
    paths: Sequence[str], todo: Sequence[int], found: Sequence[_Found], max_pixels: int
) -> list[tuple[str, FileKey, Checked]]:
    """What the index should remember of the files just read: all but unreadable ones."""
    out = []
    for i, (digest, reason, size, key) in zip(todo, found, strict=True):
        if digest is not None and key is not None:
            w, h = size if size is not None else (None, None)
            out.append((str(paths[i]), key, Checked(digest, reason, w, h, max_pixels)))
    return out


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGTERM this worker when its parent dies (even by SIGKILL),
    so a killed `fit` never leaves scan workers behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
