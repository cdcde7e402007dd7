"""What clients do besides Predict: reflection streams held open, keepalive pings, the standard
health List, and bytes that are not a request message. In-process servers on port 0; most need
no model (a Predict before the model is attached is answered UNAVAILABLE / MODEL_LOADING at once,
which shows whether a handler thread was free to answer it).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_support import rich_details, stub

from grpc_server.config import ServerConfig
from grpc_server.server import HarServer
from har_flax.proto.har.v1 import har_pb2

LIST = reflection_pb2.ServerReflectionRequest(list_services="")


@contextlib.contextmanager
def _connected(channel_options=(), **overrides) -> Iterator[tuple[HarServer, grpc.Channel]]:
    """A server without a model (port 0, settings ``overrides``) and a channel to it; both
    closed at the end (stopping a stopped server is a no-op)."""
    server = HarServer(ServerConfig(host="127.0.0.1", port=0, grace_s=10, drain_s=0, **overrides))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=list(channel_options))
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop()


class ReflectionStream:
    """One open ServerReflectionInfo stream that sends requests when told to."""

    def __init__(self, channel: grpc.Channel):
        self._requests: queue.Queue = queue.Queue()
        self.replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(self._requests.get, None), timeout=60
        )

    def ask(self, request=LIST, timeout: float = 5.0) -> reflection_pb2.ServerReflectionResponse:
        self._requests.put(request)
        result: list = []

        def read():
            try:
                result.append(next(self.replies))
            except grpc.RpcError as e:
                result.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        assert result, f"no reflection reply within {timeout} s"
        if isinstance(result[0], grpc.RpcError):
            raise result[0]
        return result[0]

    def close(self) -> None:
        self._requests.put(None)


def _services(reply) -> set[str]:
    return {s.name for s in reply.list_services_response.service}


def test_open_reflection_streams_leave_predict_its_threads_and_end_at_shutdown(caplog):
    """GUI clients hold reflection streams open. Before, 16 of them took every handler thread:
    Predict hung (not even refused) while health said SERVING, and shutdown waited its grace."""
    caplog.set_level(logging.INFO, logger="grpc_server")
    with _connected(workers=2, reflection_streams=3) as (server, channel):
        streams = [ReflectionStream(channel) for _ in range(3)]
        try:
            for s in streams:
                assert "har.v1.ActionRecognition" in _services(s.ask())
            # More streams than there are handler threads are open; Predict still gets a thread.
            with pytest.raises(grpc.RpcError) as e:
                stub(f"127.0.0.1:{server.port}").Predict(har_pb2.PredictRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert rich_details(e.value)["reason"] == "MODEL_LOADING"
            # One stream over the limit is refused at once, saying which setting bounds it.
            extra = ReflectionStream(channel)
            with pytest.raises(grpc.RpcError) as e:
                extra.ask()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = rich_details(e.value)
            assert details["reason"] == "TOO_MANY_STREAMS" and details["retry_s"] == 1.0
            assert "--reflection-streams" in e.value.details()
            # Shutdown cancels the open streams instead of waiting the 10 s grace for them.
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 3
            for s in streams:
                with pytest.raises(grpc.RpcError) as e:
                    next(s.replies)
                # Cancelled, or cut by the server's GOAWAY if the cancel lost the race.
                assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert any("ended 3 reflection stream(s)" in r.getMessage() for r in caplog.records)
        finally:
            for s in streams:
                s.close()


def test_an_idle_reflection_stream_is_ended_and_an_active_one_is_not():
    with _connected(reflection_idle_s=1.0) as (_, channel):
        idle, active = ReflectionStream(channel), ReflectionStream(channel)
        try:
            idle.ask()
            for _ in range(5):  # 2 s in all, never 1 s without a request
                assert _services(active.ask())
                time.sleep(0.4)
            with pytest.raises(grpc.RpcError) as e:
                next(idle.replies)
            assert e.value.code() == grpc.StatusCode.CANCELLED
            assert _services(active.ask())
        finally:
            idle.close()
            active.close()


def test_reflection_off():
    with _connected(reflection_streams=0) as (_, channel):
        with pytest.raises(grpc.RpcError) as e:
            ReflectionStream(channel).ask()
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_standard_health_list_reports_both_services():
    with _connected() as (_, channel):
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    statuses = {name: r.status for name, r in reply.statuses.items()}
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING  # no model attached
    assert statuses == {"": not_serving, "har.v1.ActionRecognition": not_serving}


def test_bytes_that_are_not_a_request_are_invalid_argument_logged(caplog):
    caplog.set_level(logging.INFO, logger="grpc_server.access")
    with _connected() as (_, channel):
        raw = channel.unary_unary("/har.v1.ActionRecognition/Predict")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff", timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_details(e.value)["reason"] == "MALFORMED_REQUEST"
    assert "not a valid message for /har.v1.ActionRecognition/Predict" in e.value.details()
    assert "protos/har/v1/har.proto" in e.value.details()
    lines = [r.getMessage() for r in caplog.records if r.name == "grpc_server.access"]
    assert any("code=INVALID_ARGUMENT" in x and "reason=MALFORMED_REQUEST" in x for x in lines)


def test_idle_connection_keepalive_pings_are_welcome():
    """A client pinging every second with no call in flight (as clients behind NATs do) keeps its
    connection. gRPC's server defaults answered the third ping with GOAWAY too_many_pings."""
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with _connected(options, keepalive_min_interval_s=0.5) as (_, channel):
        states: list = []
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.subscribe(states.append)
        try:
            time.sleep(6)  # about six pings, no calls
        finally:
            channel.unsubscribe(states.append)
    assert set(states) == {grpc.ChannelConnectivity.READY}, states
