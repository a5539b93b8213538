"""Micro-batching: concurrent requests gathered into one encoder call in one worker thread; bounded queue, health."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger("negvision.api")


class QueueFullError(Exception):
    """The encoder queue holds ``max_queue`` images."""


@dataclass
class _Job:
    items: list
    fut: asyncio.Future
    request_id: str | None = None


@dataclass
class BatcherHealth:
    consecutive_failures: int = 0
    last_error: str | None = None
    busy_since: float | None = None


class MicroBatcher:
    """Gathers concurrent requests (up to ``max_batch`` images or ``wait_ms``) into one call of ``fn`` in one
    worker thread (which also serialises updates of the ANTS state). The queue holds at most ``max_queue`` images;
    a request whose caller stopped waiting (timeout) is dropped before it reaches the model."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 64, wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ood-encoder")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pending = 0  # images queued, not yet taken by the worker
        self.health = BatcherHealth()
        self.batches = 0
        self.batch_images = 0
        self.batch_requests = 0

    def ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled() and self._loop is loop:
                exc = self._task.exception()
                if exc is not None:
                    logger.error("micro-batch worker died (%r); restarting it", exc)
            self._loop = loop
            self._queue = asyncio.Queue()
            self.pending = 0
            self._task = loop.create_task(self._worker())
        return self._queue

    @property
    def alive(self) -> bool:
        """The worker task runs (or has not been needed yet)."""
        return self._task is None or not self._task.done()

    def room_for(self, n: int) -> bool:
        return self.pending + n <= self.max_queue

    async def submit(self, items: list, request_id: str | None = None) -> list:
        q = self.ensure_worker()
        if not self.room_for(len(items)):
            raise QueueFullError(f"{self.pending} images queued; the limit is {self.max_queue}")
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(items)
        q.put_nowait(_Job(items, fut, request_id))
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # the worker skips it if it has not started it
            raise

    async def run_exclusive(self, fn):
        """Run ``fn()`` in the worker thread (serialised with scoring)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _worker(self) -> None:
        q = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await q.get()
            group = [first]
            n = len(first.items)
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    break
                group.append(nxt)
                n += len(nxt.items)
            self.pending -= n
            group = [j for j in group if not j.fut.done()]  # timed out while queued: never computed
            if not group:
                continue
            items = [it for j in group for it in j.items]
            t0 = time.perf_counter()
            self.health.busy_since = time.monotonic()
            try:
                out = await loop.run_in_executor(self.executor, self.fn, items)
                if len(out) != len(items):
                    raise RuntimeError(f"scoring returned {len(out)} results for {len(items)} images")
            except Exception as e:  # hand the error to every waiting request
                self.health.consecutive_failures += 1
                self.health.last_error = f"{type(e).__name__}: {e}"
                ids = ", ".join(str(j.request_id) for j in group)
                logger.error("model error on a batch of %d images (requests %s)", len(items), ids, exc_info=e)
                for j in group:
                    if not j.fut.done():
                        j.fut.set_exception(e)
                continue
            finally:
                dt = time.perf_counter() - t0
                self.health.busy_since = None
            self.health.consecutive_failures = 0
            self.batches += 1
            self.batch_images += len(items)
            self.batch_requests += len(group)
            if self.on_batch is not None:
                self.on_batch(len(items), dt)
            i = 0
            for j in group:
                if not j.fut.done():
                    j.fut.set_result(out[i : i + len(j.items)])
                i += len(j.items)
