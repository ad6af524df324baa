"""Decode images in threads while the caller runs the backbone on earlier batches.

With a frozen backbone in a fast runtime, JPEG decode + resize is the bottleneck. Its heavy parts
(libjpeg-turbo, torch's and Pillow's resampling) release the GIL, so threads of this process do it:
no pickling, no shared memory and no fork, hence no ``__main__`` guard and no start-method caveats.
Against the worker processes this replaced, on the 2-core box with OpenVINO running MobileNetV2
(cats_vs_dogs_small, 3 alternated passes), Pillow decoding in 2 threads gave 226-228 img/s vs
213-221 in 2 processes, and with :mod:`.fast_pixels` 241-251 img/s.

Batches are fixed slices of the input (batch ``k`` holds ``sources[k*batch_size:(k+1)*batch_size]``
minus failures), produced in order, a bounded number ahead of the consumer so memory stays flat on
any dataset size. Closing the iterator early (or Ctrl-C in the consumer) cancels queued batches
and waits for the ones being decoded, a batch at most per thread. An error other than an
unusable image (reported per file) reaches the consumer; a decoder that crashes the process
(a segfault, the OOM killer) now takes the caller with it, where a worker process used to die
alone.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from transferlab.data.images import MAX_PIXELS, load_image
from transferlab.errors import ImageError
from transferlab.preprocess import Preprocess
from transferlab.system import available_cpus

__all__ = ["DecodedBatch", "iter_decoded"]

# (index of the first source, paths, preprocessing, pixel limit): one batch of work.
_Job = tuple[int, list[str], Preprocess, int]

# Batches in flight per thread: enough to hide scheduling jitter, little memory (a 32-image
# 224² batch is 4.8 MB).
_PREFETCH_PER_WORKER = 2


@dataclass
class DecodedBatch:
    """One batch: ``images[i]`` is ``sources[indices[i]]``; failed sources are in ``failures``."""

    indices: list[int]
    images: np.ndarray  # uint8 (n, 3, H, W)
    failures: list[tuple[int, str]]  # (index into sources, reason)


def iter_decoded(
    sources: Sequence[str],
    pre: Preprocess,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Iterator[DecodedBatch]:
    """Yield :class:`DecodedBatch` es of ``sources`` decoded with :func:`load_image`, in order.

    ``workers``: decoding threads; None uses every available CPU, ``0`` decodes in the caller's
    thread (no overlap with the consumer). Unusable images are reported in ``failures`` with
    their reason, never raised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    jobs = [
        (start, [os.fspath(s) for s in sources[start : start + batch_size]], pre, max_pixels)
        for start in range(0, len(sources), batch_size)
    ]
    n_workers = min(available_cpus() if workers is None else workers, len(jobs))
    if n_workers <= 0:
        for job in jobs:
            yield _decode_batch(job)
        return
    yield from _iter_threads(jobs, n_workers)


def _iter_threads(jobs: list[_Job], n_workers: int) -> Iterator[DecodedBatch]:
    # Pillow registers its format plugins on first use; threads doing that at once can find a
    # valid file "unidentified" (Image.open compares the registry around init()): do it here.
    Image.init()
    pending: deque[Future[DecodedBatch]] = deque()
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="transferlab-decode")
    try:
        todo = iter(jobs)
        for _, job in zip(range(n_workers * _PREFETCH_PER_WORKER), todo, strict=False):
            pending.append(pool.submit(_decode_batch, job))  # range first: no job lost
        while pending:
            batch = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(_decode_batch, job))
            yield batch
    finally:  # also when the consumer stops early (generator closed) or raises
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_batch(job: _Job) -> DecodedBatch:
    """Decode a job's good images, in order, into one array; report the others."""
    start, paths, pre, max_pixels = job
    images = np.empty((len(paths), 3, *pre.input_size), dtype=np.uint8)
    indices: list[int] = []
    failures: list[tuple[int, str]] = []
    for offset, path in enumerate(paths):
        try:
            images[len(indices)] = load_image(path, pre, max_pixels=max_pixels)
        except ImageError as exc:
            failures.append((start + offset, exc.reason))
            continue
        indices.append(start + offset)
    return DecodedBatch(indices=indices, images=images[: len(indices)], failures=failures)
