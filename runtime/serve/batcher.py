"""Dynamic batching: concurrent requests merged into one model call, run off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from runtime.serve.metrics import Metrics
from runtime.serve.protocol import ApiError

log = logging.getLogger("edgekiln.server")


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    t_enqueued: float


class DynamicBatcher:
    """Merges concurrent requests into one model call.

    A batch is dispatched when it holds `max_batch` rows, or `max_delay_s`
    after its first request arrived, whichever comes first; while the model
    runs, new requests queue up and form the next batch. The queue holds at
    most `max_queue` requests: `submit` raises ApiError(503) beyond that.
    """

    def __init__(self, run_fn, max_batch: int, max_delay_s: float, max_queue: int, metrics: Metrics):
        self.run_fn = run_fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._items: deque[_Item] = deque()
        self._rows = 0  # image rows in _items
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgekiln-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="edgekiln-batcher")

    @property
    def depth(self) -> int:
        return len(self._items)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self._closing:
            raise ApiError(503, "server is shutting down", {"Retry-After": "1"})
        if len(self._items) >= self.max_queue:
            raise ApiError(503, f"server busy: {len(self._items)} requests already queued (limit {self.max_queue}); "
                                "retry later", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop.time())
        self._items.append(item)
        self._rows += len(x)
        self.metrics.queue_depth.set(len(self._items))
        # Wake the batcher only when it has something to act on: the first request (it idles on an
        # empty queue) or a full batch. Waking it for every request in between, only for it to go
        # back to waiting on the deadline, cost a wait_for (a task and a timer) per request.
        if len(self._items) == 1 or self._rows >= self.max_batch:
            self._wakeup.set()
        return await item.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._items[0].t_enqueued + self.max_delay_s
            while not self._closing and self._rows < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            rows = 0
            while self._items and (not batch or rows + len(self._items[0].x) <= self.max_batch):
                it = self._items.popleft()
                self._rows -= len(it.x)
                if it.future.done():  # its request timed out or its client went away
                    continue
                batch.append(it)
                rows += len(it.x)
            self.metrics.queue_depth.set(len(self._items))
            if batch:
                await self._run(batch, rows)

    async def _run(self, batch: list[_Item], rows: int) -> None:
        t0 = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch], axis=0)
            y = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_fn, x)
        except Exception as e:  # noqa: BLE001 - one failed batch answers its requests with 500, the loop goes on
            log.exception("edgekiln server: model call failed")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(ApiError(500, f"inference failed: {e.__class__.__name__}: {e}"))
            return
        self.metrics.inference.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(rows)
        self.metrics.images.inc(rows)
        start = 0
        for it in batch:
            n = len(it.x)
            if not it.future.done():
                it.future.set_result(y[start : start + n])
            start += n

    async def close(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
