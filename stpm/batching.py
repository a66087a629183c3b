"""A bounded queue in front of the model, with micro-batching: what keeps a service steady under load.

Requests wait in a queue of at most `queue_size`; a full queue is refused at once (Overloaded:
the service answers 503 with Retry-After), so memory and latency stay bounded whatever the load.
`workers` threads take requests off the queue: each takes one, then up to `max_batch - 1` more,
and hands them to `handle` as one batch. It waits up to `max_wait` seconds for the batch to fill
only while the last batch had company: a lone client (a camera sending one part at a time)
never waits for a partner that is not coming, while concurrent clients, whose requests arrive a
little apart, get full batches (a closed loop of 4 clients otherwise settles into batches of 1
and 3). A request not taken by a worker by its deadline is answered Expired, not scored late;
one whose caller has gone (its future cancelled) is dropped unscored.

The batch runs on a worker thread: the event loop only enqueues and awaits (asyncio futures,
resolved with call_soon_threadsafe), so one slow image never blocks another request's I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The queue is full: come back after retry_after seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the queue is full; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class Expired(Exception):
    """The request waited in the queue past its deadline and was not scored."""


class Closed(Exception):
    """The batcher is shutting down."""


@dataclass
class _Entry:
    item: Any
    deadline: float  # time.monotonic()
    queued: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    taken: bool = False  # a worker has it: it will be scored


class Batcher:
    """handle(items, waited) -> one result (or exception) per item, in order; waited[i] is how
    long item i queued, in seconds. Called on a worker thread with 1 to max_batch items."""

    def __init__(
        self,
        handle: Callable[[list, list[float]], Sequence[Any]],
        workers: int = 1,
        max_batch: int = 1,
        max_wait: float = 0.0,
        queue_size: int = 16,
    ) -> None:
        if workers < 1 or max_batch < 1 or queue_size < 1 or max_wait < 0:
            raise ValueError("workers, max_batch and queue_size must be >= 1, max_wait >= 0")
        self.handle, self.max_batch, self.max_wait = handle, max_batch, max_wait
        self.queue: queue.Queue[_Entry | None] = queue.Queue(queue_size)
        self.seconds_per_batch = 0.05  # a running estimate, for Retry-After
        self.last_size = 1  # the last batch's size: above 1, the next one waits to fill
        self.threads = [
            threading.Thread(target=self._work, name=f"stpm-worker-{index}", daemon=True)
            for index in range(workers)
        ]
        self.closed = False
        for thread in self.threads:
            thread.start()

    @property
    def full(self) -> bool:
        """Whether a request now would be refused (checked before its body is even read)."""
        return self.queue.full()

    @property
    def depth(self) -> int:
        """Requests waiting now (not those being scored)."""
        return self.queue.qsize()

    async def submit(self, item: Any, deadline: float) -> Any:
        """Queue item and wait for its result. Raises Overloaded at once when the queue is full,
        Expired at deadline (time.monotonic()) if no worker has taken it by then; cancelling the
        awaiting task drops the item unscored if no worker has taken it yet."""
        if self.closed:
            raise Closed("the service is shutting down")
        loop = asyncio.get_running_loop()
        entry = _Entry(item, deadline, time.monotonic(), loop, loop.create_future())
        try:
            self.queue.put_nowait(entry)
        except queue.Full:
            raise Overloaded(self.retry_after()) from None
        try:
            wait = deadline - time.monotonic()
            return await asyncio.wait_for(asyncio.shield(entry.future), wait)
        except asyncio.TimeoutError:
            if entry.taken:  # being scored: its answer is moments away
                return await entry.future
            entry.future.cancel()  # a worker that reaches it now skips it
            waited = time.monotonic() - entry.queued
            raise Expired(f"waited {waited:.2f} s in the queue, past its deadline") from None
        except asyncio.CancelledError:  # the caller left: drop it unless a worker has it
            entry.future.cancel()
            raise

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: batches ahead times a batch's time."""
        batches = (self.queue.qsize() + self.max_batch - 1) // self.max_batch
        return max(1.0, batches * self.seconds_per_batch / len(self.threads))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers after the batches in hand; what still waits is answered Closed."""
        self.closed = True
        for _ in self.threads:
            self._put_stop()
        for thread in self.threads:
            thread.join(timeout)
        while True:
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                _resolve(entry, Closed("the service is shutting down"))

    def _put_stop(self) -> None:
        while True:  # the stop signal must get in even when the queue is full
            try:
                self.queue.put_nowait(None)
                return
            except queue.Full:
                entry = self.queue.get_nowait()
                if entry is not None:
                    _resolve(entry, Closed("the service is shutting down"))

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            live = self._live(batch)
            if not live:
                continue
            started = time.monotonic()
            waited = [started - entry.queued for entry in live]
            try:
                results = list(self.handle([entry.item for entry in live], waited))
            except Exception as error:  # a failure of the whole batch answers each request
                results = [error] * len(live)
            self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * (
                time.monotonic() - started
            )
            for entry, result in zip(live, results, strict=True):
                _resolve(entry, result)

    def _collect(self) -> list[_Entry] | None:
        """One entry, waiting as long as it takes, then more until max_batch or max_wait."""
        first = self.queue.get()
        if first is None:
            return None
        first.taken = True
        wait = self.max_wait if self.last_size > 1 else 0.0
        batch, until = [first], time.monotonic() + wait
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                entry = (
                    self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                )
            except queue.Empty:
                break
            if entry is None:  # a stop signal: pass it on after this batch
                self.queue.put(None)
                break
            entry.taken = True
            batch.append(entry)
        self.last_size = len(batch)
        return batch

    @staticmethod
    def _live(batch: list[_Entry]) -> list[_Entry]:
        """The entries still worth scoring: neither abandoned by their caller nor expired."""
        now, live = time.monotonic(), []
        for entry in batch:
            if entry.future.cancelled():
                continue
            if now > entry.deadline:
                _resolve(entry, Expired(f"waited {now - entry.queued:.2f} s, past its deadline"))
                continue
            live.append(entry)
        return live


def _resolve(entry: _Entry, result: Any) -> None:
    """Hand a result (or exception) to the waiting coroutine, on its own event loop."""

    def settle() -> None:
        if entry.future.done():  # cancelled meanwhile: the caller left
            return
        if isinstance(result, BaseException):
            entry.future.set_exception(result)
        else:
            entry.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        entry.loop.call_soon_threadsafe(settle)
