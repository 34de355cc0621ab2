"""Server-side dynamic batching with Triton's semantics.

Requests queue up; a worker thread takes the oldest and waits for more until the batch holds
`max_batch` tiles or the oldest has waited `max_delay_s`, whichever comes first, then runs the
model once on all of them. A request is never split across batches; one larger than `max_batch`
runs alone, in chunks of `max_batch`. The model runs in the worker thread, never on the event
loop: callers get a concurrent Future (await it with `asyncio.wrap_future`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from histocsc.serve.metrics import Metrics

log = logging.getLogger("histocsc.serve")


class Overloaded(Exception):
    """The queue already holds too many tiles; the client should retry later."""


@dataclass
class _Request:
    tiles: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Merges concurrent tile requests into batches for one `predict` function."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 max_delay_s: float, metrics: Metrics | None = None,
                 max_pending_tiles: int | None = None) -> None:
        self.predict = predict
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self.max_pending_tiles = max_pending_tiles or 16 * max_batch
        self._queue: deque[_Request] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="histocsc-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, fail the queued requests (the server is stopping: their
        clients had their grace period), then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            left, self._queue = list(self._queue), deque()
            self._pending = 0
        for r in left:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(Overloaded("the server is shutting down"))

    def submit(self, tiles: np.ndarray) -> Future[np.ndarray]:
        """Queue uint8 tiles (N, H, W, 3); the future gives their probabilities (N, markers)."""
        request = _Request(tiles)
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if self._pending and self._pending + len(tiles) > self.max_pending_tiles:
                raise Overloaded(f"{self._pending} tiles already queued")
            self._queue.append(request)
            self._pending += len(tiles)
            self._cond.notify_all()
        return request.future

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch by Triton's rule; None when stopping with an empty queue."""
        with self._cond:
            while not self._queue or self._stopping:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_delay_s
            while self._pending < self.max_batch and not self._stopping:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._queue.popleft()]
            size = len(batch[0].tiles)
            while self._queue and size + len(self._queue[0].tiles) <= self.max_batch:
                size += len(self._queue[0].tiles)
                batch.append(self._queue.popleft())
            self._pending -= size
        # requests whose client went away were cancelled: skip them
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        try:
            tiles = batch[0].tiles if len(batch) == 1 else np.concatenate([r.tiles for r in batch])
            outs = []
            for i in range(0, len(tiles), self.max_batch):
                t0 = time.perf_counter()
                outs.append(self.predict(tiles[i:i + self.max_batch]))
                if self.metrics:
                    self.metrics.compute_seconds.observe(time.perf_counter() - t0)
                    self.metrics.exec_count.inc()
            probs = outs[0] if len(outs) == 1 else np.concatenate(outs)
        except Exception as exc:  # noqa: BLE001 - the error goes to every waiting client
            log.exception("model execution failed on a batch of %d request(s)", len(batch))
            for r in batch:
                r.future.set_exception(exc)
            return
        if self.metrics:
            self.metrics.inference_count.inc(len(tiles))
            self.metrics.tiles.labels(source="infer").inc(len(tiles))
            for r in batch:
                self.metrics.queue_seconds.observe(start - r.arrived)
        offset = 0
        for r in batch:
            r.future.set_result(probs[offset:offset + len(r.tiles)])
            offset += len(r.tiles)
