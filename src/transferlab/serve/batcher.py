"""Micro-batching: images from concurrent requests join one queue, and a single task runs them
in batches on one inference thread (the runtime is fastest on whole batches and is not shared
between threads)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# One queued image and the future its request awaits.
_Item = tuple[np.ndarray, asyncio.Future[np.ndarray]]


class MicroBatcher:
    """Collect images from concurrent requests into batches for one inference thread.

    ``infer``: uint8 (n, 3, H, W) → probabilities (n, C), called on a single dedicated thread.
    A batch closes at ``max_batch`` images or ``wait_s`` after its first image arrived.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, wait_s: float
    ) -> None:
        self.infer = infer
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_s)
        self.batches = 0
        self.images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferlab-infer")
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Bind to the running event loop (idempotent; also done by the first ``submit``)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(), name="transferlab-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for ``images`` (n, 3, H, W), computed together with other requests'."""
        self.start()
        assert self._queue is not None and self._loop is not None
        futures = []
        for image in images:
            fut: asyncio.Future[np.ndarray] = self._loop.create_future()
            self._queue.put_nowait((image, fut))
            futures.append(fut)
        try:
            return np.stack(await asyncio.gather(*futures))
        finally:
            for fut in futures:  # a timed-out request: its images are dropped, not computed
                fut.cancel()

    async def _run(self) -> None:
        assert self._queue is not None and self._loop is not None
        queue, loop = self._queue, self._loop
        while True:
            items = await self._collect(queue, loop)
            live = [(im, fut) for im, fut in items if not fut.done()]
            if live:
                await self._run_batch(live, loop)

    async def _collect(
        self, queue: asyncio.Queue[_Item], loop: asyncio.AbstractEventLoop
    ) -> list[_Item]:
        """The next batch: waits for one image, then takes more until full or ``wait_s`` passed."""
        items = [await queue.get()]
        deadline = loop.time() + self.wait_s
        while len(items) < self.max_batch:
            try:
                items.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Short polls instead of wait_for(queue.get()): a cancelled get can lose an item.
            await asyncio.sleep(min(remaining, 0.001))
        return items

    async def _run_batch(self, live: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        """One inference call; its rows (or its exception) go to the waiting requests."""
        batch = np.stack([im for im, _ in live])
        try:
            probs = await loop.run_in_executor(self._executor, self.infer, batch)
        except Exception as exc:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.batches += 1
        self.images += len(live)
        for (_, fut), p in zip(live, probs, strict=True):
            if not fut.done():
                fut.set_result(p)
