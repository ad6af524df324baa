"""Bottleneck features for a list of images: cache lookup, then decode ‖ frozen base for misses.

Decoding runs in threads while the engine runs the backbone on the previous batch (see
``data.loader.iter_decoded``), so the slower of the two sets the pace.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from transferlab.backbones import Backbone
from transferlab.cache import FeatureCache
from transferlab.data.images import MAX_PIXELS
from transferlab.data.loader import iter_decoded
from transferlab.progress import warn
from transferlab.runtime import FeatureRuntime, make_runtime

# Feature matrices larger than this are memory-mapped (FeatureExtractor._matrix).
IN_RAM_MAX_BYTES = 1 << 30


def extraction_stats(
    images: int,
    misses: int,
    failed: int,
    cache_read_s: float,
    extract_s: float = 0.0,
    engine: str = "cache",
) -> dict[str, Any]:
    """The record of one extraction pass (``Extracted.stats``, metrics.json's "extraction")."""
    computed = misses - failed
    return {
        "images": images,
        "cache_hits": images - misses,
        "computed": computed,
        "failed": failed,
        "cache_read_s": cache_read_s,
        "extract_s": extract_s,
        "images_per_s": computed / extract_s if computed and extract_s > 0 else 0.0,
        "engine": engine,
    }


@dataclass
class Extracted:
    """Features in input order; rows of failed images are zero and ``ok`` is False there."""

    features: np.ndarray
    ok: np.ndarray
    failures: list[tuple[str, str]]  # (path, reason)
    stats: dict[str, Any] = field(default_factory=dict)


class FeatureExtractor:
    """A backbone + its fastest runtime + the feature cache, built once and reused."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        cache: FeatureCache | None = None,
        engine: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int = MAX_PIXELS,
        identity: str | None = None,
        threads: int | None = None,
        runtime: FeatureRuntime | None = None,
    ) -> None:
        self.backbone = backbone
        self.cache = cache if cache is not None else FeatureCache()
        self.identity = identity or backbone.identity()
        self.store = self.cache.namespace(self.identity)
        self.engine = engine
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.threads = threads  # engine threads; None: every CPU this process may use
        self._runtime = runtime  # None: built on first use (see ``runtime``)
        self._cache_broken = False

    @property
    def runtime(self) -> FeatureRuntime:
        # Built lazily: a warm re-fit served entirely from the cache never exports the model.
        if self._runtime is None:
            self._runtime = make_runtime(
                self.backbone,
                engine=self.engine,
                export_dir=self.cache.exports_dir,
                threads=self.threads,
            )
        return self._runtime

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned ranks (engine.shards): a compiled engine and an open cache writer
        # cannot travel between processes, so each rank opens its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("store", "_runtime")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _runtime=None)
        self.store = self.cache.namespace(self.identity)

    def _remember(self, items: dict[str, np.ndarray]) -> None:
        # A cache that can't be written (read-only home, full disk) costs speed, not the run.
        if self._cache_broken:
            return
        try:
            self.store.put_many(items)
        except OSError as e:
            self._cache_broken = True
            warn(f"feature cache {self.store.path} is not writable ({e}); continuing without it")

    def cached_chunks(
        self, digests: Sequence[str], rows: int = 4096
    ) -> Iterator[np.ndarray | None]:
        """The cached features of ``digests`` in order, ``rows`` at a time, or None for a chunk
        holding a miss (the caller falls back to ``self(...)``): a pass over N cached images in
        memory bounded by one chunk."""
        dim = self.backbone.num_features
        for start in range(0, len(digests), rows):
            part = digests[start : start + rows]
            out = np.empty((len(part), dim), dtype=np.float32)
            yield out if self.store.read_into(part, out).all() else None

    def _matrix(self, n: int, dim: int) -> np.ndarray:
        """A zeroed float32 ``(n, dim)`` matrix: in RAM up to :data:`IN_RAM_MAX_BYTES`, past it
        memory-mapped from an unlinked temporary file in the cache folder, whose pages the
        kernel may write out and evict: a million images' features (4.8 GiB at 1,280-d) need
        not fit in RAM (the head's mini-batch solver and the evaluation read them in chunks).
        Where no folder has room for the file (or none can be written), in RAM after all."""
        size = n * dim * 4
        if size > IN_RAM_MAX_BYTES:
            for folder in (self.cache.root, None):  # then the system's temporary folder
                try:
                    if folder is not None:
                        folder.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryFile(dir=folder, prefix="features-") as fh:
                        # Reserve the blocks now: writing a page of a sparse file on a full
                        # disk would kill the process with SIGBUS; this fails with ENOSPC.
                        if hasattr(os, "posix_fallocate"):
                            os.posix_fallocate(fh.fileno(), 0, size)
                        return np.memmap(fh, dtype=np.float32, mode="w+", shape=(n, dim))
                except OSError:
                    continue
        return np.zeros((n, dim), dtype=np.float32)

    def _compute(
        self,
        misses: list[int],
        paths: Sequence[str],
        digests: Sequence[str],
        features: np.ndarray,
        ok: np.ndarray,
        on_progress: Callable[[int], None] | None,
    ) -> list[tuple[str, str]]:
        """Decode ‖ run the engine on rows ``misses``, filling ``features``/``ok`` and the cache;
        the (path, reason) of the images that failed to decode."""
        failures: list[tuple[str, str]] = []
        if not misses:
            return failures
        miss_paths = [paths[i] for i in misses]
        waiting: deque[list[int]] = deque()  # rows of the batches handed to the engine

        def decoded() -> Iterator[np.ndarray]:
            for batch in iter_decoded(
                miss_paths,
                self.backbone.preprocess,
                batch_size=self.batch_size,
                workers=self.workers,
                max_pixels=self.max_pixels,
            ):
                failures.extend((miss_paths[j], reason) for j, reason in batch.failures)
                if on_progress and batch.failures:
                    on_progress(len(batch.failures))
                if len(batch.indices):
                    waiting.append([misses[j] for j in batch.indices])
                    yield batch.images

        # The engine is built once a batch is decoded (the threads decode on meanwhile; none is
        # built when every image fails) and may run a batch while the next is pulled
        # (runtime.map): in order.
        batches = decoded()
        first = next(batches, None)
        for feats in self.runtime.map(chain([first], batches)) if first is not None else ():
            rows = waiting.popleft()
            features[rows] = feats
            ok[rows] = True
            self._remember({digests[r]: f for r, f in zip(rows, feats, strict=True)})
            if on_progress:
                on_progress(len(rows))
        return failures

    def __call__(
        self,
        paths: Sequence[str],
        digests: Sequence[str],
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> Extracted:
        t0 = time.perf_counter()
        n = len(paths)
        features = self._matrix(n, self.backbone.num_features)
        ok = self.store.read_into(digests, features)  # rows streamed in; no second copy
        misses: list[int] = np.flatnonzero(~ok).tolist()
        if on_progress and n - len(misses):
            on_progress(n - len(misses))
        t1 = time.perf_counter()
        failures = self._compute(misses, paths, digests, features, ok, on_progress)
        t2 = time.perf_counter()
        engine = self._runtime.engine if self._runtime else "cache"
        stats = extraction_stats(n, len(misses), len(failures), t1 - t0, t2 - t1, engine)
        return Extracted(features=features, ok=ok, failures=failures, stats=stats)
