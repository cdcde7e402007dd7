"""DynamicBatcher: grouping, ordering, bounded queue, cancellation and deadlines before compute;
and the server settings that let batches reach --max-batch-size.

The model function here is a plain function that records what it was given; a gate (an Event)
holds the worker busy so the queue state is deterministic, not timing-dependent. One test runs a
real server over the tiny model, for what only handler threads and gRPC clients can show.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent import futures

import numpy as np
import pytest
from grpc_support import jpeg, shared_tmp, stub, tiny_model_dir

from grpc_server.batcher import (
    BatcherClosedError,
    CancelledError,
    DynamicBatcher,
    QueueFullError,
    Ticket,
)
from grpc_server.config import DEFAULT_WORKERS, ServerConfig


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


class DropCounter:
    """An observer that records every drop the batcher reports (har_batch_dropped_total)."""

    def __init__(self):
        self.drops: list[str] = []

    def batch(self, n):
        pass

    def queue_depth(self, n):
        pass

    def dropped(self, reason):
        self.drops.append(reason)


def test_a_request_withdrawn_by_several_threads_at_once_is_dropped_once():
    """A cancel and a deadline drop at the same instant both try to finish the ticket; only one
    may count. Eight threads cancel the same 2000 queued requests in step (five times), the
    interpreter switching threads as often as it can: without a lock, requests counted twice."""
    model = GatedModel()
    drops = DropCounter()
    n = 2000
    b = DynamicBatcher(model, max_batch_size=1, max_wait_us=0, max_queue=n, observer=drops)
    _busy(model, b)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            tickets = [b.submit(i) for i in range(n)]
            start = threading.Barrier(8)

            def cancel_all(tickets=tickets, start=start):
                start.wait()
                for ticket in tickets:
                    b.cancel(ticket)

            threads = [threading.Thread(target=cancel_all) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert b.queue_depth == 0
    finally:
        sys.setswitchinterval(interval)
    assert len(drops.drops) == 5 * n, f"{len(drops.drops) - 5 * n} requests were counted twice"
    model.release()
    b.close(5)
    assert model.calls == [[0]]


def test_default_workers_can_fill_every_batch():
    """Each request waiting for the model holds a handler thread: with batching possible, the
    default leaves model_threads full batches running and as many waiting or decoding."""
    auto = ServerConfig()  # batching auto: on with an accelerator, off on a CPU
    assert auto.resolved_workers("gpu") == 2 * auto.max_batch_size == 64
    assert auto.resolved_workers("cpu") == DEFAULT_WORKERS == 16
    config = ServerConfig(batching=True, max_batch_size=8, model_threads=3)
    assert config.resolved_workers("cpu") == 32
    assert ServerConfig(batching=True, max_batch_size=4).resolved_workers("gpu") == 16
    # Without batching the model runs in the handler threads: the CPU default stays.
    assert ServerConfig(batching=False).resolved_workers("gpu") == DEFAULT_WORKERS
    assert ServerConfig(batching=True, workers=5).resolved_workers("gpu") == 5  # set: kept


def test_workers_below_max_batch_size_are_warned_about(caplog):
    config = ServerConfig(batching=True, max_batch_size=8, workers=4)
    with caplog.at_level(logging.WARNING, logger="grpc_server.config"):
        assert config.use_batching("gpu")
    assert "--workers 4 is below --max-batch-size 8" in caplog.text
    assert "no batch will be larger than 4" in caplog.text
    assert "raise --workers to 16 (or leave it unset), or lower --max-batch-size to 4" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grpc_server.config"):
        # auto on a CPU does not batch; enough workers batch without a word
        assert not ServerConfig(max_batch_size=8, workers=4).use_batching("cpu")
        assert ServerConfig(batching=True, max_batch_size=8, workers=8).use_batching("cpu")
    assert not caplog.records


def test_a_server_with_default_workers_runs_a_batch_of_max_batch_size(tmp_path_factory):
    """32 concurrent calls, the first waiting up to 5 s for company: one model call of 32 (with
    16 handler threads, the old default, it was two of 16)."""
    from grpc_server.server import HarServer
    from har_flax.predictor import Predictor
    from har_flax.proto.har.v1 import har_pb2

    predictor = Predictor.load(tiny_model_dir(shared_tmp(tmp_path_factory)), batch_sizes=(32,))
    config = ServerConfig(host="127.0.0.1", port=0, grace_s=2, drain_s=0, batching=True,
                          max_wait_us=5_000_000)  # fmt: skip
    assert config.max_batch_size == 32  # the default
    server = HarServer(config)
    server.start()
    try:
        assert server.workers == 64
        server.load(predictor)
        client = stub(f"127.0.0.1:{server.port}")
        image = jpeg(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        request = har_pb2.PredictRequest(images=[image])
        with futures.ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda _: client.Predict(request, timeout=60), range(32)))
        assert len({r.action for r in replies}) == 1
        registry = server.metrics.registry
        sizes = [registry.get_sample_value(f"har_batch_size_{s}") for s in ("count", "sum")]
        assert sizes == [1, 32], f"{sizes[0]:.0f} model calls for {sizes[1]:.0f} requests"
    finally:
        server.stop()
