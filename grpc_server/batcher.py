"""Dynamic batching: concurrent requests share one model call, through a bounded queue.

Worker threads (one by default) own the model. A request waits in the queue; a free worker takes
the oldest one, waits at most `max_wait_us` for more (up to `max_batch_size`), drops every request
that was cancelled or whose deadline passed while waiting, and runs the rest in one call. A
request that leaves early therefore costs no compute. Several workers overlap model calls, which
helps where one call does not use the whole machine (small batches on a multi-core CPU).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue holds `max_queue` requests already; the caller should retry later."""


class CancelledError(RuntimeError):
    """The request was cancelled or its deadline passed before the model ran it."""


class BatcherClosedError(RuntimeError):
    """The batcher was stopped before the request was run."""


class Ticket:
    """One queued request: its sample, its deadline, and (later) its result or error."""

    __slots__ = (
        "sample",
        "deadline",
        "enqueued",
        "batch_size",
        "_done",
        "_finishing",
        "_result",
        "_error",
    )

    def __init__(self, sample: Any, deadline: float | None):
        self.sample = sample
        self.deadline = deadline  # time.monotonic() value, or None for no deadline.
        self.enqueued = time.monotonic()
        self.batch_size = 0  # Size of the model call that answered it (0 = never ran).
        self._done = threading.Event()
        self._finishing = threading.Lock()
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _finish(self, result: Any = None, error: BaseException | None = None) -> bool:
        """Sets the outcome once; later calls are ignored (a cancel racing a result).

        Returns:
          True for the one call that set it. Under a lock: a cancel and a deadline drop at the
          same instant must not both count as har_batch_dropped_total.
        """
        with self._finishing:
            if self._done.is_set():
                return False
            self._result, self._error = result, error
            self._done.set()
        return True

    def result(self, timeout: float | None = None) -> Any:
        """Blocks until the request is answered.

        Raises:
          CancelledError, BatcherClosedError: the request never ran.
          TimeoutError: `timeout` seconds passed first.
          Exception: whatever the model function raised for this batch.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"no result within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


class DynamicBatcher:
    """Groups concurrently submitted samples into calls of `predict_fn`.

    Args:
      predict_fn: list of N samples -> list of N results, in order (e.g.
        `Predictor.predict_samples`). Called only from the worker thread.
      max_batch_size: the most samples in one call.
      max_wait_us: how long the first sample of a batch waits for more, in microseconds.
      max_queue: the most samples waiting (not yet taken by a worker).
      workers: threads calling `predict_fn` concurrently (it must be thread-safe if > 1).
      observer: optional callbacks for metrics: `observer.batch(size)`,
        `observer.queue_depth(n)`, `observer.dropped(reason)`.
    """

    def __init__(
        self,
        predict_fn: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int,
        max_wait_us: int,
        max_queue: int,
        workers: int = 1,
        observer: Any = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or workers < 1 or max_wait_us < 0:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1, max_wait_us >= 0")
        self._predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_us / 1e6
        self.max_queue = max_queue
        self._observer = observer
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._run, name=f"batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, sample: Any, deadline: float | None = None) -> Ticket:
        """Queues one sample.

        Args:
          sample: one model-ready sample (whatever `predict_fn` takes a list of).
          deadline: a `time.monotonic()` time after which the result is useless.

        Returns:
          The ticket; `ticket.result()` waits for the answer, `cancel(ticket)` withdraws it.

        Raises:
          QueueFullError: `max_queue` samples are waiting already.
          BatcherClosedError: the batcher is stopped.
        """
        ticket = Ticket(sample, deadline)
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(
                    f"server overloaded: {self.max_queue} requests are already waiting for the "
                    "model; retry with backoff"
                )
            self._queue.append(ticket)
            depth = len(self._queue)
            self._cond.notify()
        self._notify("queue_depth", depth)
        return ticket

    def cancel(self, ticket: Ticket, reason: str = "cancelled") -> None:
        """Withdraws a ticket: it leaves the queue now, or is skipped if the worker holds it."""
        if not ticket._finish(error=CancelledError(f"request {reason} before the model ran it")):
            return
        with self._cond:
            try:
                self._queue.remove(ticket)
            except ValueError:
                pass  # Already taken by a worker, which skips finished tickets.
            depth = len(self._queue)
        self._notify("dropped", reason)
        self._notify("queue_depth", depth)

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests, runs the ones already queued, and stops the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if end is None else max(0.0, end - time.monotonic()))

    def _notify(self, event: str, value: Any) -> None:
        if self._observer is not None:
            getattr(self._observer, event)(value)

    def _take_batch(self) -> list[Ticket] | None:
        """Waits for the next batch; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            # The first request waits at most max_wait for company; a request that arrives
            # while the model is busy already waited, so a busy server batches without delay.
            until = batch[0].enqueued + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            depth = len(self._queue)
        self._notify("queue_depth", depth)
        return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            now = time.monotonic()
            live = []
            for ticket in batch:
                if ticket.done:
                    continue  # Cancelled while the worker was collecting.
                if ticket.expired(now):
                    if ticket._finish(error=CancelledError("deadline passed in the queue")):
                        self._notify("dropped", "deadline")
                    continue
                live.append(ticket)
            if not live:
                continue
            self._notify("batch", len(live))
            try:
                results = self._predict_fn([t.sample for t in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(live)}")
            except Exception as e:  # Every waiter must be woken, whatever went wrong.
                log.exception("model call failed for a batch of %d", len(live))
                for ticket in live:
                    ticket._finish(error=e)
                continue
            for ticket, result in zip(live, results, strict=True):
                ticket.batch_size = len(live)
                ticket._finish(result=result)
