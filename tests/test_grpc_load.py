"""In-process servers under load: dynamic batching, its equality with unbatched answers, the
bounded queue, deadlines and cancellation before compute, and readiness before the model loads.

Uses a tiny random action model (32x32, 3 classes, buckets 1-8): these tests are about the
server's concurrency, not the model, and the tiny model keeps 3200 requests to seconds. Several
servers with different settings share one loaded Predictor.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import (
    ThrottlingProxy,
    assert_probes_serving,
    jpeg,
    probabilities,
    rich_details,
    shared_tmp,
    stub,
    tiny_model_dir,
)

from grpc_server.config import ServerConfig
from grpc_server.server import HarServer, ServerError
from har_flax.proto.har.v1 import har_pb2

CLIENTS, REQUESTS_PER_CLIENT = 64, 50


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from har_flax.predictor import Predictor

    return Predictor.load(tiny_model_dir(shared_tmp(tmp_path_factory)), batch_sizes=(1, 2, 4, 8))


def _server(predictor, load=True, **overrides) -> HarServer:
    config = ServerConfig(host="127.0.0.1", port=0, grace_s=2, drain_s=0, **overrides)
    server = HarServer(config)
    server.start()
    if load:
        server.load(predictor)
    return server


@pytest.fixture(scope="module")
def batched(predictor):
    server = _server(predictor, batching=True, max_batch_size=8, max_wait_us=2000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unbatched(predictor):
    server = _server(predictor, batching=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inputs(photo_arrays) -> list[bytes]:
    """16 distinct small JPEGs: crops of the four photographs."""
    out = []
    for array in photo_arrays.values():
        h, w = array.shape[:2]
        for top, left in ((0, 0), (h // 3, w // 3), (0, w // 2), (h // 2, 0)):
            out.append(jpeg(array[top : top + h // 2, left : left + w // 2], size=64))
    return out


@pytest.fixture(scope="module")
def sequential(unbatched, inputs) -> list[dict[str, float]]:
    """Each input's answer, one request at a time, from the server without batching."""
    client = stub(f"127.0.0.1:{unbatched.port}")
    return [probabilities(client.Predict(har_pb2.PredictRequest(images=[b]), timeout=30))
            for b in inputs]  # fmt: skip


# XLA may round a sample's float32 logits differently in a batch of 8 than alone (another
# vectorisation of the same sums), so "identical" means: same ranking, probabilities within a few
# float32 ulps. Anything a bug would cause (answers swapped between requests, padding rows leaking
# into real ones) is orders of magnitude larger: the inputs' answers differ by > 1e-3.
TOLERANCE = 1e-6


def _same_answer(got: dict[str, float], want: dict[str, float]) -> bool:
    return list(got) == list(want) and all(abs(got[k] - want[k]) <= TOLERANCE for k in want)


def _sample(server, name, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_unbatched_model_calls_are_counted_too(unbatched, inputs):
    """Batching is off on a CPU by default: the model metrics must not stay at 0 there."""
    calls, samples = (
        _sample(unbatched, n) for n in ("har_batch_size_count", "har_model_samples_total")
    )
    client = stub(f"127.0.0.1:{unbatched.port}")
    for image in inputs[:3]:
        client.Predict(har_pb2.PredictRequest(images=[image]), timeout=30)
    assert _sample(unbatched, "har_batch_size_count") == calls + 3
    assert _sample(unbatched, "har_batch_size_sum") >= 3
    assert _sample(unbatched, "har_model_samples_total") == samples + 3


def test_a_busy_metrics_port_is_a_clear_error_and_nothing_is_left_listening(predictor):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = HarServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=busy,
                                        metrics_host="127.0.0.1"))  # fmt: skip
        with pytest.raises(ServerError, match=rf"cannot serve metrics on 127.0.0.1:{busy} "
                           r"\(--metrics-port\): Address already in use"):  # fmt: skip
            server.start()
    assert server.port is None  # the gRPC port was never opened for business


def test_inputs_are_told_apart(sequential):
    """Otherwise the equality tests below could pass with answers mixed up between requests."""
    for i, a in enumerate(sequential):
        for b in sequential[i + 1 :]:
            assert max(abs(a[k] - b[k]) for k in a) > 1000 * TOLERANCE


def test_batching_on_and_off_answer_identically(batched, inputs, sequential):
    client = stub(f"127.0.0.1:{batched.port}")
    for data, expected in zip(inputs, sequential, strict=True):
        reply = client.Predict(har_pb2.PredictRequest(images=[data]), timeout=30)
        assert _same_answer(probabilities(reply), expected)


def test_64_clients_x_50_requests_no_errors_answers_equal_sequential(batched, inputs, sequential):
    target = f"127.0.0.1:{batched.port}"
    batches_before = _sample(batched, "har_batch_size_count")
    samples_before = _sample(batched, "har_batch_size_sum")
    start = threading.Barrier(CLIENTS)

    def client_run(k: int) -> list[tuple[int, object]]:
        client = stub(target)  # one channel (connection) per client
        start.wait()
        out = []
        for i in range(REQUESTS_PER_CLIENT):
            index = (k * 7 + i) % len(inputs)
            try:
                reply = client.Predict(har_pb2.PredictRequest(images=[inputs[index]]), timeout=120)
                out.append((index, probabilities(reply)))
            except grpc.RpcError as e:
                out.append((index, e.code()))
        return out

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client_run, range(CLIENTS)) for r in rs]
    elapsed = time.perf_counter() - t0
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    errors = [r for _, r in results if not isinstance(r, dict)]
    assert not errors, f"{len(errors)} errors, e.g. {errors[:5]}"
    wrong = [(i, r) for i, r in results if not _same_answer(r, sequential[i])]
    assert not wrong, (
        f"{len(wrong)} answers differ from the sequential ones, e.g. input {wrong[0][0]}: "
        f"{wrong[0][1]} != {sequential[wrong[0][0]]}"
    )
    # Batching really happened (otherwise this test would not test it).
    batches = _sample(batched, "har_batch_size_count") - batches_before
    samples = _sample(batched, "har_batch_size_sum") - samples_before
    assert samples == CLIENTS * REQUESTS_PER_CLIENT
    assert samples / batches > 1.5, f"mean batch {samples / batches:.2f}"
    print(f"{len(results)} requests in {elapsed:.1f} s, mean batch {samples / batches:.2f}")


def test_full_queue_is_resource_exhausted_with_retry_info(predictor, inputs):
    server = _server(
        predictor, batching=True, max_batch_size=1, max_wait_us=0, max_queue=1, workers=48
    )
    client = stub(f"127.0.0.1:{server.port}")
    try:
        codes, details = [], []
        for _ in range(5):  # bursts until the single queue slot overflows
            barrier = threading.Barrier(48)

            def call(i, barrier=barrier):
                barrier.wait()
                try:
                    client.Predict(har_pb2.PredictRequest(images=[inputs[i % 16]]), timeout=60)
                    return grpc.StatusCode.OK
                except grpc.RpcError as e:
                    details.append(rich_details(e))
                    return e.code()

            with futures.ThreadPoolExecutor(48) as pool:
                codes += list(pool.map(call, range(48)))
            if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
                break
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(d["reason"] == "OVERLOADED" and d["retry_s"] > 0 for d in details)
        # Still serving.
        assert client.Predict(har_pb2.PredictRequest(images=[inputs[0]]), timeout=30).action
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow_batcher(predictor):
    """The first request of a batch waits 3 s for company: time to give up in the queue.

    The tests below give up after 1.2 s: long enough for the request to be decoded and queued
    on a busy machine, where 0.3 s may not be.
    """
    server = _server(predictor, batching=True, max_batch_size=8, max_wait_us=3_000_000)
    yield server
    server.stop()


def test_expired_deadline_leaves_the_queue_without_compute(slow_batcher, inputs):
    client = stub(f"127.0.0.1:{slow_batcher.port}")
    before = _sample(slow_batcher, "har_model_samples_total")
    ended = {"method": "/har.v1.ActionRecognition/Predict", "code": "DEADLINE_EXCEEDED"}
    ended_before = _sample(slow_batcher, "har_grpc_requests_total", **ended)
    with pytest.raises(grpc.RpcError) as e:
        client.Predict(har_pb2.PredictRequest(images=[inputs[0]]), timeout=1.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(2.5)  # past the batch window: the worker would have run it by now
    assert _sample(slow_batcher, "har_model_samples_total") == before
    # Counted as what it was: gRPC's timer ends a call 2-3 ms before time_remaining() reaches
    # 0, and on a busy machine such calls were counted as cancelled by the client.
    assert _sample(slow_batcher, "har_batch_dropped_total", reason="deadline") >= 1
    assert _sample(slow_batcher, "har_grpc_requests_total", **ended) == ended_before + 1
    assert _sample(slow_batcher, "har_batch_queue_depth") == 0


class _EndedCall:
    """What grpc's ServicerContext says of a call that has ended (grpc's object, not ours)."""

    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining

    def is_active(self):
        return False

    def code(self):
        return None


@pytest.mark.parametrize(
    ("remaining", "status"),
    [(0.003, "DEADLINE_EXCEEDED"), (0.0, "DEADLINE_EXCEEDED"), (-1.0, "DEADLINE_EXCEEDED"),
     (5.0, "CANCELLED"), (None, "CANCELLED")],
)  # fmt: skip
def test_a_call_ended_at_its_deadline_is_told_from_a_cancel(remaining, status):
    # 3 ms left when the call ended: what time_remaining() said, read in the call's callback,
    # after gRPC's timer had ended calls for their deadline (measured under load).
    from grpc_server.errors import deadline_passed
    from grpc_server.interceptors import _final_code
    from grpc_server.servicer import _gone

    call = _EndedCall(remaining)
    assert deadline_passed(call) is (status == "DEADLINE_EXCEEDED")
    assert _final_code(call, raised=True) == getattr(grpc.StatusCode, status)
    assert _gone(call).code == getattr(grpc.StatusCode, status)


def test_cancelled_call_leaves_the_queue_without_compute(slow_batcher, inputs):
    client = stub(f"127.0.0.1:{slow_batcher.port}")
    before = _sample(slow_batcher, "har_model_samples_total")
    call = client.Predict.future(har_pb2.PredictRequest(images=[inputs[1]]), timeout=30)
    time.sleep(1.2)
    assert call.cancel()
    time.sleep(2.5)
    assert _sample(slow_batcher, "har_model_samples_total") == before
    assert _sample(slow_batcher, "har_batch_dropped_total", reason="cancelled") >= 1
    # A patient request on the same server is still answered (after its 3 s window).
    reply = client.Predict(har_pb2.PredictRequest(images=[inputs[1]]), timeout=30)
    assert reply.all_predictions and _sample(slow_batcher, "har_model_samples_total") == before + 1


def test_a_client_gone_while_its_images_decode_stops_the_decoding(unbatched, photo_arrays):
    # 40 frames of 2.9 megapixels: about a second of decoding here, the deadline 0.2 s.
    frame = jpeg(photo_arrays["astronaut"], size=1700, quality=80)
    client = stub(f"127.0.0.1:{unbatched.port}")
    before = _sample(unbatched, "har_requests_abandoned_total", stage="decoding")
    with pytest.raises(grpc.RpcError) as e:
        client.Predict(har_pb2.PredictRequest(images=[frame] * 40), timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler stops at its next frame, rather than decoding the other 30-odd for no one.
    deadline = time.monotonic() + 10
    while _sample(unbatched, "har_requests_abandoned_total", stage="decoding") == before:
        assert time.monotonic() < deadline, "the decoding was not abandoned"
        time.sleep(0.02)
    # A patient client of the same server is answered.
    reply = client.Predict(har_pb2.PredictRequest(images=[frame] * 2), timeout=30)
    assert reply.num_frames == 2 and reply.all_predictions


def test_not_serving_and_unavailable_until_the_model_is_attached(predictor, inputs):
    server = _server(predictor, load=False)
    target = f"127.0.0.1:{server.port}"
    client = stub(target)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.Health(har_pb2.HealthRequest(), timeout=5).status == (
            har_pb2.HealthResponse.NOT_SERVING
        )
        for call, request in (
            (client.Predict, har_pb2.PredictRequest(images=[inputs[0]])),
            (client.Classes, har_pb2.ClassesRequest()),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in e.value.details()
            assert rich_details(e.value)["reason"] == "MODEL_LOADING"
        server.load(predictor)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert client.Predict(har_pb2.PredictRequest(images=[inputs[0]]), timeout=30).action
    finally:
        server.stop()


def test_tiny_model_classes_reach_the_client(batched):
    reply = stub(f"127.0.0.1:{batched.port}").Classes(har_pb2.ClassesRequest(), timeout=5)
    assert list(reply.classes) == ["clapping", "dancing", "running"]
    assert reply.model.kind == "action" and reply.model.image_size == 32
    assert np.isclose(sum(probabilities(
        stub(f"127.0.0.1:{batched.port}").Predict(
            har_pb2.PredictRequest(images=[jpeg(np.zeros((40, 40, 3), np.uint8))]), timeout=30)
    ).values()), 1.0, atol=1e-5)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Overload, health under load, and calls refused before a handler runs.

PREDICT = "/har.v1.ActionRecognition/Predict"
HOLD_S = 1.5  # how long each Predict holds the only handler thread in `one_worker`


@pytest.fixture(scope="module")
def one_worker(predictor):
    """One handler thread and one queue slot: at most 2 Predict calls in the server at once.

    Each Predict's batch waits HOLD_S for company that cannot come (the only handler thread is
    the one waiting), so a burst of calls finds the server saturated for seconds.
    """
    server = _server(
        predictor,
        batching=True,
        max_batch_size=8,
        max_wait_us=int(HOLD_S * 1e6),
        workers=1,
        max_queue=1,
    )
    yield server
    server.stop()


def _access_lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "grpc_server.access" and needle in r.getMessage()]  # fmt: skip


def _outcome(call) -> tuple[grpc.StatusCode, dict, str]:
    try:
        call.result()
        return grpc.StatusCode.OK, {}, ""
    except grpc.RpcError as e:
        return e.code(), rich_details(e), e.details()


def test_a_bug_is_internal_to_the_client_and_found_by_its_id_in_the_log(predictor, inputs, caplog):
    """An unexpected exception in a handler: the client gets INTERNAL and an id, never the
    exception's text; the access log, the metrics and the traceback in the log carry the id."""
    broken = copy.copy(predictor)

    def predict_samples(samples):
        raise RuntimeError("secret internals")

    broken.predict_samples = predict_samples  # a bug, as the servicer would meet it
    server = _server(broken, batching=False)
    try:
        caplog.set_level(logging.INFO, logger="grpc_server")
        with pytest.raises(grpc.RpcError) as e:
            stub(f"127.0.0.1:{server.port}").Predict(
                har_pb2.PredictRequest(images=[inputs[0]]), timeout=30
            )
        assert e.value.code() == grpc.StatusCode.INTERNAL
        found = re.fullmatch(
            r"internal server error \(id ([0-9a-f]{12})\); the operator can find it in the "
            r"server log",
            e.value.details(),
        )
        assert found, e.value.details()
        error_id = found.group(1)
        (line,) = _access_lines(caplog, "Predict code=INTERNAL")
        assert f"reason=INTERNAL error_id={error_id}" in line, line
        assert _sample(server, "har_grpc_refusals_total", method=PREDICT, reason="INTERNAL") == 1
        (logged,) = [r for r in caplog.records if r.name == "grpc_server.errors"]
        assert error_id in logged.getMessage() and "secret internals" in logged.getMessage()
        assert logged.exc_info is not None  # the traceback, for whoever looks the id up
    finally:
        server.stop()


def test_overload_is_refused_by_the_server_with_overloaded_retry_info_logged_and_counted(
    one_worker, inputs, caplog
):
    client = stub(f"127.0.0.1:{one_worker.port}")
    labels = {"method": PREDICT, "code": "RESOURCE_EXHAUSTED"}
    before = _sample(one_worker, "har_grpc_requests_total", **labels)
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    request = har_pb2.PredictRequest(images=[inputs[0]])
    calls = [client.Predict.future(request, timeout=30) for _ in range(5)]
    outcomes = [_outcome(c) for c in calls]
    codes = sorted(code.name for code, _, _ in outcomes)
    # One call runs, one waits for the thread (--max-queue 1); the other three are refused.
    assert codes == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 3, outcomes
    for code, details, message in outcomes:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert details["reason"] == "OVERLOADED", (details, message)
            assert details["retry_s"] and details["retry_s"] > 0
            assert "overloaded" in message
    assert _sample(one_worker, "har_grpc_requests_total", **labels) - before == 3
    refused = _access_lines(caplog, "Predict code=RESOURCE_EXHAUSTED")
    assert len(refused) == 3 and all("reason=OVERLOADED" in line for line in refused), refused


def test_health_answers_promptly_while_predict_is_saturated(one_worker, inputs):
    target = f"127.0.0.1:{one_worker.port}"
    client = stub(target)
    request = har_pb2.PredictRequest(images=[inputs[1]])
    calls = [client.Predict.future(request, timeout=30) for _ in range(4)]
    try:
        time.sleep(0.3)  # every call has arrived: the handler thread and the queue are taken
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        t0 = time.monotonic()
        for service in ("", "har.v1.ActionRecognition"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        own = client.Health(har_pb2.HealthRequest(), timeout=1.0)
        assert own.status == har_pb2.HealthResponse.SERVING
        assert time.monotonic() - t0 < 1.0
        # The checks really ran under load: admitted Predict calls are still running.
        assert not all(c.done() for c in calls)
    finally:
        codes = [_outcome(c)[0] for c in calls]
    assert grpc.StatusCode.OK in codes


def test_a_call_without_the_token_is_refused_at_once_while_predict_is_busy(predictor, inputs):
    """The refusal runs on the fast pool: it neither waits for the only handler thread nor
    takes the one queue place from a client with the token."""
    token = "t0ken"
    server = _server(predictor, batching=True, max_batch_size=8, max_wait_us=int(HOLD_S * 1e6),
                     workers=1, max_queue=1, auth_token=token)  # fmt: skip
    client = stub(f"127.0.0.1:{server.port}")
    request = har_pb2.PredictRequest(images=[inputs[2]])
    bearer = (("authorization", f"Bearer {token}"),)
    try:
        held = client.Predict.future(request, timeout=30, metadata=bearer)
        time.sleep(0.3)  # it holds the only handler thread, waiting HOLD_S for company
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                client.Predict(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not held.done(), "the refusals waited for the handler thread"
        # The queue place is still free for a client with the token.
        queued = client.Predict.future(request, timeout=30, metadata=bearer)
        assert _outcome(held)[0] == _outcome(queued)[0] == grpc.StatusCode.OK
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_messages(predictor):
    server = _server(predictor, batching=False, max_message_bytes=256 * 1024)
    yield server
    server.stop()


def test_message_over_the_limit_is_refused_logged_and_counted(small_messages, caplog):
    client = stub(f"127.0.0.1:{small_messages.port}")
    labels = {"method": PREDICT, "code": "RESOURCE_EXHAUSTED"}
    before = _sample(small_messages, "har_grpc_requests_total", **labels)
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    over = b"\xff\xd8" + bytes(300 * 1024)
    with pytest.raises(grpc.RpcError) as e:
        client.Predict(har_pb2.PredictRequest(images=[over]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rich_details(e.value)
    # No RetryInfo: the same request can never succeed (the web UI maps this to 413, not 429).
    assert details["reason"] == "MESSAGE_TOO_LARGE" and details["retry_s"] is None
    assert "--max-message-bytes" in e.value.details()
    assert _sample(small_messages, "har_grpc_requests_total", **labels) - before == 1
    lines = _access_lines(caplog, "Predict code=RESOURCE_EXHAUSTED")
    assert len(lines) == 1 and "reason=MESSAGE_TOO_LARGE" in lines[0], lines
    # Past twice the limit gRPC itself refuses the message before any handler runs: the same
    # code, but bare (documented in docs/API.md, Operations).
    with pytest.raises(grpc.RpcError) as e:
        client.Predict(har_pb2.PredictRequest(images=[bytes(600 * 1024)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(e.value)["reason"] is None
    # Still serving.
    ok = client.Predict(
        har_pb2.PredictRequest(images=[jpeg(np.zeros((40, 40, 3), np.uint8))]), timeout=30
    )
    assert ok.all_predictions


def test_unknown_method_is_logged_and_counted(small_messages, caplog):
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    channel = grpc.insecure_channel(f"127.0.0.1:{small_messages.port}")
    labels = {"method": "unknown", "code": "UNIMPLEMENTED"}
    before = _sample(small_messages, "har_grpc_requests_total", **labels)
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/har.v1.ActionRecognition/Nope")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _sample(small_messages, "har_grpc_requests_total", **labels) - before == 1
    assert _access_lines(caplog, "method=/har.v1.ActionRecognition/Nope code=UNIMPLEMENTED")


def test_overloaded_slow_uploads_are_refused_at_once_and_never_hold_the_probes_threads(
    one_worker, inputs
):
    """Predict calls refused as OVERLOADED are answered before their request is read: six slow
    uploads neither wait for their upload to end nor take the threads health checks run on."""
    target = f"127.0.0.1:{one_worker.port}"
    request = har_pb2.PredictRequest(images=[inputs[3]])
    held = [stub(target).Predict.future(request, timeout=30) for _ in range(2)]
    upload = har_pb2.PredictRequest(images=[b"\xff\xd8" + bytes(1_000_000)])
    try:
        time.sleep(0.3)  # the handler thread and the queue place are taken
        with ThrottlingProxy(one_worker.port, rate=100_000) as proxy:  # 10 s per upload
            started = time.monotonic()
            uploads = proxy.uploads(upload, 6)
            time.sleep(0.5)  # every call has arrived and is uploading
            assert_probes_serving(one_worker.port, timeout=1.0)
            outcomes = [_outcome(u) for u in uploads]
            assert all(details.get("reason") == "OVERLOADED" for _, details, _ in outcomes)
            assert time.monotonic() - started < 3, "the refusals waited for the uploads"
    finally:
        codes = [_outcome(c)[0] for c in held]
    assert codes == [grpc.StatusCode.OK] * 2


def test_calls_received_before_shutdown_finish_even_if_they_wait_for_a_thread(predictor, inputs):
    """Shutdown refuses the Predict and Classes calls that arrive once it has begun; a call that
    arrived before, still waiting for the only handler thread, is answered within the grace."""
    server = _server(predictor, batching=True, max_batch_size=8, max_wait_us=int(HOLD_S * 1e6),
                     workers=1, max_queue=2)  # fmt: skip
    client = stub(f"127.0.0.1:{server.port}")
    request = har_pb2.PredictRequest(images=[inputs[4]])
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 10, "drain_s": 1.0})
    try:
        running = client.Predict.future(request, timeout=30)  # holds the thread for HOLD_S
        time.sleep(0.2)
        waiting = client.Predict.future(request, timeout=30)  # received, waits for the thread
        time.sleep(0.2)
        stopper.start()
        time.sleep(0.2)  # draining: NOT_SERVING, the port still open
        for call in (client.Predict, client.Classes):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call(request if call is client.Predict else har_pb2.ClassesRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert rich_details(e.value)["reason"] == "SHUTTING_DOWN"
            assert time.monotonic() - started < 0.5, "refused only once a thread was free"
        assert _outcome(running)[0] == grpc.StatusCode.OK
        code, details, message = _outcome(waiting)
        assert code == grpc.StatusCode.OK, (details, message)
    finally:
        if stopper.ident is None:
            stopper.start()
        stopper.join(30)


def test_latency_counts_the_wait_for_a_handler_thread(one_worker, inputs, caplog):
    """The reply's latency_ms ("from receipt to reply"), the access log and the latency
    histogram all run from the call's arrival, so the wait for a busy handler thread shows."""
    client = stub(f"127.0.0.1:{one_worker.port}")
    observed = _sample(one_worker, "har_grpc_request_latency_seconds_sum", method=PREDICT)
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    request = har_pb2.PredictRequest(images=[inputs[5]])
    first = client.Predict.future(request, timeout=30)  # holds the only thread for HOLD_S
    time.sleep(0.2)
    sent = time.monotonic()
    second = client.Predict(request, timeout=30)  # waits for the thread, then HOLD_S itself
    waited = time.monotonic() - sent
    assert first.result().latency_ms > 0
    assert waited > 1.5 * HOLD_S  # the wait for the thread really happened
    # Loopback and (de)serialisation cost milliseconds; the thread wait alone is ~HOLD_S.
    assert second.latency_ms / 1e3 > waited - 0.25, (second.latency_ms, waited)
    logged = [float(re.search(r"latency_ms=(\S+)", line).group(1))
              for line in _access_lines(caplog, "Predict code=OK")]  # fmt: skip
    assert len(logged) == 2 and max(logged) / 1e3 > waited - 0.25, (logged, waited)
    total = _sample(one_worker, "har_grpc_request_latency_seconds_sum", method=PREDICT) - observed
    assert total > waited - 0.25 + HOLD_S - 0.25, total


def test_a_method_name_cannot_forge_access_log_lines(small_messages, caplog):
    """The method name of an unknown method is the client's text: logged quoted and escaped."""
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    channel = grpc.insecure_channel(f"127.0.0.1:{small_messages.port}")
    # No spaces (a value with one was always quoted): a newline, then a whole fake line.
    forged = "/x\n2026-11-27\tINFO\tgrpc_server.access:\tevent=rpc\tmethod=/har.v1.Fake\tcode=OK"
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(forged)(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    (line,) = _access_lines(caplog, "code=UNIMPLEMENTED")[-1:]
    assert "\n" not in line and "\t" not in line, line
    assert line.startswith('event=rpc method="/x\\n2026-11-27\\tINFO'), line
    # Quoted values are JSON strings: a reader gets the exact name back.
    quoted = re.match(r'event=rpc method=("(?:[^"\\]|\\.)*") code=UNIMPLEMENTED$', line)
    assert quoted and json.loads(quoted.group(1)) == forged, line
