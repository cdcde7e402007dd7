"""DynamicBatcher: grouping, ordering, bounded queue, cancellation and deadlines before compute.

The model function here is a plain function that records what it was given; a gate (an Event)
holds the worker busy so the queue state is deterministic, not timing-dependent.
"""

from __future__ import annotations

import threading
import time

import pytest

from grpc_server.batcher import (
    BatcherClosedError,
    CancelledError,
    DynamicBatcher,
    QueueFullError,
    Ticket,
)


class GatedModel:
    """Squares its inputs; the first call blocks until `release()` so requests pile up."""

    def __init__(self, gate_first_call: bool = True):
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self._gate = threading.Event()
        if not gate_first_call:
            self._gate.set()

    def __call__(self, samples):
        self.calls.append(list(samples))
        self.entered.set()
        self._gate.wait(10)
        return [s * s for s in samples]

    def release(self):
        self._gate.set()


def _busy(model, batcher):
    """Occupies the worker with sample 0 and returns its ticket."""
    first = batcher.submit(0)
    assert model.entered.wait(5), "worker never called the model"
    return first


def test_queued_requests_share_one_call_and_get_their_own_answers():
    model = GatedModel()
    b = DynamicBatcher(model, max_batch_size=4, max_wait_us=0, max_queue=64)
    first = _busy(model, b)
    tickets = [b.submit(i) for i in range(1, 11)]  # 10 waiting: batches of 4, 4, 2
    model.release()
    assert first.result(5) == 0
    assert [t.result(5) for t in tickets] == [i * i for i in range(1, 11)]
    assert [len(c) for c in model.calls] == [1, 4, 4, 2]
    assert [t.batch_size for t in tickets] == [4] * 8 + [2] * 2
    b.close(5)


def test_first_request_waits_max_wait_for_company():
    model = GatedModel(gate_first_call=False)
    b = DynamicBatcher(model, max_batch_size=8, max_wait_us=300_000, max_queue=8)
    t1 = b.submit(2)
    time.sleep(0.05)  # well inside the 300 ms window
    t2 = b.submit(3)
    assert (t1.result(5), t2.result(5)) == (4, 9)
    assert model.calls == [[2, 3]]
    b.close(5)


def test_a_request_that_waited_for_a_busy_model_does_not_wait_again_for_company():
    """max_wait counts from arrival: on a busy server, waiting in the queue is that wait."""
    model = GatedModel()
    b = DynamicBatcher(model, max_batch_size=8, max_wait_us=500_000, max_queue=8)
    _busy(model, b)
    queued = b.submit(3)
    time.sleep(0.6)  # longer than max_wait, behind the busy model
    released = time.monotonic()
    model.release()
    assert queued.result(5) == 9
    assert time.monotonic() - released < 0.3  # run at once, not after another 0.5 s
    assert model.calls == [[0], [3]]
    b.close(5)


def test_a_deadline_expires_at_its_instant():
    ticket = Ticket(sample=1, deadline=100.0)
    assert not ticket.expired(99.999) and ticket.expired(100.0) and ticket.expired(100.001)
    assert not Ticket(sample=1, deadline=None).expired(1e12)


def test_full_queue_is_refused():
    model = GatedModel()
    b = DynamicBatcher(model, max_batch_size=2, max_wait_us=0, max_queue=3)
    _busy(model, b)
    waiting = [b.submit(i) for i in (1, 2, 3)]
    assert b.queue_depth == 3
    with pytest.raises(QueueFullError, match="3 requests are already waiting"):
        b.submit(4)
    model.release()
    assert [t.result(5) for t in waiting] == [1, 4, 9]
    b.close(5)


def test_cancelled_request_leaves_the_queue_and_costs_no_compute():
    model = GatedModel()
    b = DynamicBatcher(model, max_batch_size=8, max_wait_us=0, max_queue=8)
    _busy(model, b)
    keep, drop = b.submit(5), b.submit(7)
    b.cancel(drop)
    assert b.queue_depth == 1
    with pytest.raises(CancelledError):
        drop.result(1)
    model.release()
    assert keep.result(5) == 25
    assert 7 not in [s for call in model.calls for s in call]
    b.close(5)


def test_expired_deadline_is_dropped_before_compute():
    model = GatedModel()
    dropped = []

    class Observer:
        def batch(self, n):
            pass

        def queue_depth(self, n):
            pass

        def dropped(self, reason):
            dropped.append(reason)

    b = DynamicBatcher(model, max_batch_size=8, max_wait_us=0, max_queue=8, observer=Observer())
    _busy(model, b)
    late = b.submit(3, deadline=time.monotonic() + 0.05)
    on_time = b.submit(4, deadline=time.monotonic() + 30)
    time.sleep(0.1)  # the first deadline passes while the worker is busy
    model.release()
    assert on_time.result(5) == 16
    with pytest.raises(CancelledError, match="deadline"):
        late.result(5)
    assert model.calls[1:] == [[4]]
    assert dropped == ["deadline"]
    b.close(5)


def test_model_failure_reaches_every_waiter_and_the_worker_survives():
    def model(samples):
        if -1 in samples:
            raise ValueError("bad batch")
        return samples

    b = DynamicBatcher(model, max_batch_size=1, max_wait_us=0, max_queue=8)
    with pytest.raises(ValueError, match="bad batch"):
        b.submit(-1).result(5)
    assert b.submit(6).result(5) == 6
    b.close(5)


def test_close_runs_what_is_queued_then_refuses():
    model = GatedModel()
    b = DynamicBatcher(model, max_batch_size=8, max_wait_us=0, max_queue=8)
    _busy(model, b)
    queued = b.submit(9)
    closer = threading.Thread(target=b.close, args=(5,))
    closer.start()
    time.sleep(0.05)
    with pytest.raises(BatcherClosedError):
        b.submit(1)
    model.release()
    closer.join(5)
    assert queued.result(1) == 81


def test_several_workers_run_batches_concurrently():
    inside, both_inside = [0], threading.Event()
    lock = threading.Lock()

    def model(samples):
        with lock:
            inside[0] += 1
            if inside[0] == 2:
                both_inside.set()
        both_inside.wait(5)  # returns at once only if another worker is inside too
        with lock:
            inside[0] -= 1
        return samples

    b = DynamicBatcher(model, max_batch_size=1, max_wait_us=0, max_queue=8, workers=2)
    tickets = [b.submit(i) for i in range(2)]
    assert [t.result(10) for t in tickets] == [0, 1]
    assert both_inside.is_set(), "the two batches did not overlap"
    b.close(5)
