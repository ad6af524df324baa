"""Decode images in worker processes while the caller runs the backbone on earlier batches.

With a frozen backbone in a fast runtime, JPEG decode + resize is the bottleneck, and it is
CPU-bound Python/Pillow work: processes, not threads. Batches are fixed slices of the input
(batch ``k`` holds ``sources[k*batch_size:(k+1)*batch_size]`` minus failures), produced in order,
a bounded number ahead of the consumer so memory stays flat on any dataset size. Workers write
pixels straight into shared-memory batch buffers where Linux allows (see :class:`_SharedSlots`).

Workers run only this module, numpy and Pillow (never torch) and get all they need in the job, so
they work under any start method: the platform default is used (fork on Linux up to Python 3.13:
instant start, and unguarded scripts work; spawn/forkserver elsewhere, which need the usual
``if __name__ == "__main__":`` guard). Workers ignore Ctrl-C so the parent alone decides to stop;
closing the iterator early cancels queued work and joins the workers.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from transferlab.data.images import MAX_PIXELS, load_image
from transferlab.errors import ImageError, TransferlabError
from transferlab.preprocess import Preprocess
from transferlab.system import available_cpus

__all__ = ["DecodedBatch", "iter_decoded"]

# (index of the first source, paths, preprocessing, pixel limit): one batch of work.
_Job = tuple[int, list[str], Preprocess, int]

# Batches in flight per worker: enough to hide scheduling jitter, little memory (a 32-image
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

    ``workers=None`` uses every available CPU, ``0`` decodes in this process (no overlap with
    the consumer). Unusable images are reported in ``failures`` with their reason, never raised.
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
    yield from _iter_pool(jobs, n_workers)


def _iter_pool(jobs: list[_Job], n_workers: int) -> Iterator[DecodedBatch]:
    n_slots = n_workers * _PREFETCH_PER_WORKER
    pending: deque[tuple[Future[Any], int]] = deque()
    # Cleanup runs in reverse order, also when the consumer stops early (generator closed) or
    # raises: cancel queued batches, join the workers, then free the shared blocks.
    with ExitStack() as cleanup:
        slots = _SharedSlots.create(n_slots, (len(jobs[0][1]), 3, *jobs[0][2].input_size))
        if slots is not None:
            cleanup.callback(slots.release)
        executor = ProcessPoolExecutor(max_workers=n_workers, initializer=init_worker)
        cleanup.callback(executor.shutdown, wait=True, cancel_futures=True)
        cleanup.callback(lambda: [future.cancel() for future, _ in pending])

        def submit(job: _Job, slot: int) -> None:
            if slots is None:
                pending.append((executor.submit(_decode_batch, job), slot))
            else:
                pending.append((executor.submit(_decode_shared, job, slots.names[slot]), slot))

        todo = iter(jobs)
        for slot, job in zip(range(n_slots), todo, strict=False):  # range first: no job lost
            submit(job, slot)
        done = 0
        while pending:
            future, slot = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise TransferlabError(
                    "an image-decoding worker process died (a decoder crash, or killed for lack "
                    f"of memory) in the images from {jobs[done][1][0]} onwards; rerun with "
                    "workers=0 to find the file"
                ) from None
            if slots is None:
                batch = result
            else:
                indices, failures = result
                batch = DecodedBatch(indices, slots.take(slot, len(indices)), failures)
            done += 1
            job = next(todo, None)
            if job is not None:
                submit(job, slot)  # the slot's pixels were copied out above
            yield batch


class _SharedSlots:
    """Batch-sized shared-memory buffers that workers decode straight into.

    Sending pixels back through the executor's pipe (pickle, write, read, unpickle) costs about
    12% of a worker's CPU; with these, a worker writes each image once and the parent copies
    the batch out once. Used only where POSIX shared memory is a tmpfs with room to spare
    (Linux's /dev/shm; containers often make it small), else results travel pickled.
    """

    def __init__(self, blocks: list[shared_memory.SharedMemory], shape: tuple[int, ...]) -> None:
        self.blocks = blocks
        self.shape = shape
        self.names = [b.name for b in blocks]

    @classmethod
    def create(cls, count: int, shape: tuple[int, ...]) -> _SharedSlots | None:
        nbytes = math.prod(shape)
        try:
            shm = os.statvfs("/dev/shm")
        except (OSError, AttributeError):  # not Linux
            return None
        if shm.f_bavail * shm.f_frsize < 2 * count * nbytes:
            return None
        blocks: list[shared_memory.SharedMemory] = []
        try:
            for _ in range(count):
                blocks.append(shared_memory.SharedMemory(create=True, size=nbytes))
        except OSError:
            cls(blocks, shape).release()
            return None
        return cls(blocks, shape)

    def take(self, slot: int, n: int) -> np.ndarray:
        """A private copy of the first ``n`` images in ``slot`` (which is then free for reuse)."""
        view = np.ndarray(self.shape, dtype=np.uint8, buffer=self.blocks[slot].buf)
        out = view[:n].copy()
        del view  # no buffer export may outlive the block, or close() fails
        return out

    def release(self) -> None:
        for block in self.blocks:
            block.close()
            block.unlink()


# Worker side: shared blocks attached so far, by name (a worker lives for one iter_decoded call).
_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def _decode_shared(job: _Job, slot_name: str) -> tuple[list[int], list[tuple[int, str]]]:
    block = _ATTACHED.get(slot_name)
    if block is None:
        block = _ATTACHED[slot_name] = shared_memory.SharedMemory(name=slot_name)
    h, w = job[2].input_size
    out = np.ndarray((len(job[1]), 3, h, w), dtype=np.uint8, buffer=block.buf)
    try:
        return _decode_into(job, out)
    finally:
        del out  # drop the buffer export so the block can close at exit


def _decode_batch(job: _Job) -> DecodedBatch:
    h, w = job[2].input_size
    images = np.empty((len(job[1]), 3, h, w), dtype=np.uint8)
    indices, failures = _decode_into(job, images)
    return DecodedBatch(indices=indices, images=images[: len(indices)], failures=failures)


def _decode_into(job: _Job, out: np.ndarray) -> tuple[list[int], list[tuple[int, str]]]:
    """Decode a job's images into ``out[0..k)`` (good ones, in order); return indices, failures."""
    start, paths, pre, max_pixels = job
    indices: list[int] = []
    failures: list[tuple[int, str]] = []
    for offset, path in enumerate(paths):
        try:
            out[len(indices)] = load_image(path, pre, max_pixels=max_pixels)
        except ImageError as exc:
            failures.append((start + offset, exc.reason))
            continue
        indices.append(start + offset)
    return indices, failures


def init_worker() -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGTERM this worker when its parent dies (even by SIGKILL),
    so a killed `fit`/`predict` never leaves decode workers behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
