"""One pass over every file before training: content digest + a cheap full decode check.

The digest keys the feature cache and finds leakage (the same picture in two splits). The
decode check runs at 1/8 scale for JPEGs (Pillow ``draft``), so truncated or corrupt files are
found in a fraction of the time a real decode takes, before any strategy trips over them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from transferlab.data.images import MAX_PIXELS, bytes_digest, open_rgb
from transferlab.data.loader import init_worker
from transferlab.errors import ImageError

_CHECK_SIZE = (32, 32)


@dataclass
class ScanResult:
    digests: list[str | None]  # None where the file could not be read at all
    failures: list[tuple[int, str]]  # (index, reason)


def _scan_one(args: tuple[str, int]) -> tuple[str | None, str | None]:
    path, max_pixels = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"
    digest = bytes_digest(data)
    try:
        open_rgb(data, max_pixels=max_pixels, draft=_CHECK_SIZE)
    except ImageError as e:
        return digest, e.reason
    return digest, None


def scan_files(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    on_progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Digest and decode-check ``paths`` in worker processes, keeping input order."""
    if workers is None:
        workers = os.cpu_count() or 1
    jobs = [(str(p), max_pixels) for p in paths]
    digests: list[str | None] = []
    failures: list[tuple[int, str]] = []

    def consume(results) -> None:
        for i, (digest, problem) in enumerate(results, start=len(digests)):
            digests.append(digest)
            if problem is not None:
                failures.append((i, problem))
            if on_progress and i % 64 == 63:
                on_progress(64)

    if workers <= 1 or len(jobs) < 64:
        consume(map(_scan_one, jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=init_worker) as pool:
            consume(pool.map(_scan_one, jobs, chunksize=32))
    if on_progress and len(digests) % 64:
        on_progress(len(digests) % 64)
    return ScanResult(digests=digests, failures=failures)
