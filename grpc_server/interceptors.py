"""Server interceptors: access log + metrics (outermost), the message size limit, bearer-token
auth, per-peer rate limit, and admission (which thread pool runs a call; refusing Predict when
too many calls already wait for a handler thread).

Health and reflection stay open (no token, no rate limit) so load balancers and `grpcurl list`
work without credentials; every har.v1 call except Health needs the token when one is set.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from grpc_server.errors import RpcFailure, deadline_passed, shutting_down
from grpc_server.metrics import Metrics
from har_flax.images import human_bytes

access_log = logging.getLogger("grpc_server.access")
log = logging.getLogger(__name__)

# Methods that never need a token: the standard health and reflection services, and our own
# cheap Health (probes and dashboards should not need secrets).
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/har.v1.ActionRecognition/Health",
)
RATE_LIMITED_PREFIX = "/har.v1."
PREDICT = "/har.v1.ActionRecognition/Predict"
# Calls refused once the server is shutting down (health answers NOT_SERVING instead).
DRAINED_METHODS = (PREDICT, "/har.v1.ActionRecognition/Classes")
# Calls that never block (no model, no waiting on the client): they run on a small pool of their
# own, so probes and Classes answer even while every handler thread is busy with Predict.
FAST_METHODS = (
    "/grpc.health.v1.Health/",
    "/har.v1.ActionRecognition/Health",
    "/har.v1.ActionRecognition/Classes",
)
# Server reflection (grpcurl, GUI clients): bidirectional streams a client may hold open.
REFLECTION_METHODS = (
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
# The metrics label for methods the server does not have (client-chosen names would otherwise
# grow the label set without bound).
UNKNOWN_METHOD = "unknown"

# Per-call facts the servicer adds for the access log (batch size, frames, ...).
_call_fields: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "har_call_fields", default=None
)
# When the current call reached the server (time.perf_counter()), set by AccessLogInterceptor.
_call_arrival: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "har_call_arrival", default=None
)


def annotate(**fields) -> None:
    """Adds key=value facts to the current call's access-log line (no-op outside a call)."""
    current = _call_fields.get()
    if current is not None:
        current.update(fields)


def call_arrival() -> float:
    """time.perf_counter() when the current call reached the server (now, outside a call).

    Earlier than the handler's start by the time the call waited for a handler thread, which
    is what an overloaded server's clients wait for.
    """
    arrived = _call_arrival.get()
    return time.perf_counter() if arrived is None else arrived


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_METHODS)


def _replace_behavior(
    handler: grpc.RpcMethodHandler,
    decorate: Callable,
    request_deserializer: Callable | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `decorate(behaviour, response_streaming)`.

    The thread pool chosen for the behaviour (`experimental_thread_pool`, see `run_on`) carries
    over to the decorated one unless `decorate` picks its own.
    """
    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    decorated = decorate(behavior, handler.response_streaming)
    pool = getattr(behavior, "experimental_thread_pool", None)
    if pool is not None and getattr(decorated, "experimental_thread_pool", None) is None:
        decorated.experimental_thread_pool = pool
    return factory(
        decorated,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusal(
    handler: grpc.RpcMethodHandler, failure: RpcFailure, pool: futures.ThreadPoolExecutor
) -> grpc.RpcMethodHandler:
    """A handler for `handler`'s method that ends the call with `failure` without reading it.

    gRPC Python reads a unary request whole, on the pool thread, before the behaviour runs: a
    refused client uploading slowly would hold that thread for its whole upload, and a few such
    clients every thread of the pool. Installed as request-streaming, the refusal ends the call
    before a byte of the request is read, so the client hears it at once, mid-upload; a unary
    client cannot tell (both kinds are the same HTTP/2 stream on the wire).

    Args:
      handler: the method's own handler (its serializers are kept).
      failure: the status to end the call with.
      pool: where the refusal runs (a few threads, which it holds for microseconds).
    """

    def rejected(requests, context):
        annotate(reason=failure.reason)
        context.abort_with_status(failure.to_status())

    rejected.experimental_thread_pool = pool
    if handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    else:
        factory = grpc.stream_unary_rpc_method_handler
    return factory(
        rejected,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def run_on(pool: futures.ThreadPoolExecutor):
    """A behaviour decorator that runs the call on `pool` instead of the server's handler threads.

    Uses grpcio's `experimental_thread_pool` behaviour attribute (honoured for every method
    kind); a non-blocking behaviour (the health Watch) stays non-blocking.
    """

    def decorate(behavior, response_streaming):
        def pooled(*args):
            return behavior(*args)

        pooled.experimental_thread_pool = pool
        if getattr(behavior, "experimental_non_blocking", False):
            pooled.experimental_non_blocking = True
        return pooled

    return decorate


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every non-open method.

    The scheme is matched in any case (`bearer`, `BEARER`: RFC 7235 makes it case-insensitive);
    the token is compared in constant time. A refusal runs on `refusal_pool` without reading the
    request (see `_refusal`): a client without the token neither waits for a handler thread,
    nor holds one of the places that --max-queue keeps for Predict calls, nor holds a thread
    for as long as it takes to upload its request.
    """

    def __init__(self, token: str, refusal_pool: futures.ThreadPoolExecutor):
        self._expected = token.encode()
        self._refusals = refusal_pool

    def _valid(self, value: str) -> bool:
        scheme, _, credentials = value.strip().partition(" ")
        # Compare even when the scheme is wrong, so timing does not tell the two apart.
        same = hmac.compare_digest(credentials.strip().encode(), self._expected)
        return same and scheme.lower() == "bearer"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or _is_open(handler_call_details.method):
            return handler
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if got is not None and self._valid(got):
            return handler
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if got is None
            else "invalid bearer token"
        )
        failure = RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message, reason="UNAUTHENTICATED")
        return _refusal(handler, failure, self._refusals)


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> 'ipv4:1.2.3.4' (clients reconnect from new ports)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class RateLimitInterceptor(grpc.ServerInterceptor):
    """A token bucket per client address on har.v1 methods: `rate` calls/s, bursts of `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = max(1, burst or int(2 * rate))
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, last time)
        self._lock = threading.Lock()

    def _take(self, key: str) -> float:
        """Takes one token for `key`; returns 0 if allowed, else seconds until one is free."""
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > 10_000:
                # Forget full buckets (idle peers) so scanning clients cannot grow memory.
                horizon = self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < horizon}
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(RATE_LIMITED_PREFIX):
            return handler
        if handler_call_details.method == "/har.v1.ActionRecognition/Health":
            return handler

        def decorate(behavior, response_streaming):
            def limited(request, context):
                wait = self._take(peer_host(context.peer()))
                if wait > 0:
                    annotate(reason="RATE_LIMITED")
                    failure = RpcFailure(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"rate limit exceeded: at most {self.rate:g} requests/s per client "
                        f"(bursts of {self.burst}); retry in {wait:.2f} s",
                        reason="RATE_LIMITED",
                        retry_after_s=wait,
                    )
                    context.abort_with_status(failure.to_status())
                return behavior(request, context)

            return limited

        return _replace_behavior(handler, decorate)


class CountingThreadPool(futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows how many submitted calls have not finished yet.

    The server's handler pool: `pending` is the calls running on a handler thread plus those
    waiting for one, which is what AdmissionInterceptor bounds.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = 0
        self._count_lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn, /, *args, **kwargs):
        with self._count_lock:
            self._pending += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future) -> None:
        with self._count_lock:
            self._pending -= 1


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Picks the thread pool for each call; refuses Predict when the handler pool is full, and
    Predict and Classes once the server is shutting down.

    Runs in gRPC's polling thread as each call arrives, before it is queued for a thread, so
    the decisions are made before the call can wait. Cheap calls (FAST_METHODS) run on
    `fast_pool`, refusals on `refusal_pool` (without reading the request, see `_refusal`),
    Predict (and reflection) on the server's handler pool. A Predict that finds `limit` calls
    already running or waiting there is RESOURCE_EXHAUSTED / OVERLOADED with a RetryInfo at
    once, logged and counted by the access log like any other error. (gRPC's own
    `maximum_concurrent_rpcs` would refuse it bare, unlogged, and count health checks too.)

    Once `drain` is called, Predict and Classes calls that arrive are UNAVAILABLE /
    SHUTTING_DOWN; those that arrived before run as usual, even if they still wait for a
    handler thread (they finish within the server's grace period).

    Args:
      pool: the server's handler pool (its `pending` count is bounded).
      fast_pool: the pool for cheap calls.
      refusal_pool: the pool for refusals.
      limit: the most calls running or waiting in `pool` (--workers + --max-queue).
      retry_after_s: the RetryInfo delay of a refusal.
    """

    def __init__(
        self,
        pool: CountingThreadPool,
        fast_pool: futures.ThreadPoolExecutor,
        refusal_pool: futures.ThreadPoolExecutor,
        limit: int,
        retry_after_s: float = 0.5,
    ):
        self._pool = pool
        self._fast = fast_pool
        self._refusals = refusal_pool
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._draining = threading.Event()

    def drain(self) -> None:
        """Refuses Predict and Classes calls that arrive from now on (UNAVAILABLE)."""
        self._draining.set()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method in DRAINED_METHODS and self._draining.is_set():
            return _refusal(handler, shutting_down(), self._refusals)
        if method.startswith(FAST_METHODS):
            return _replace_behavior(handler, run_on(self._fast))
        if method == PREDICT and self._pool.pending >= self.limit:
            failure = RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded: {self.limit} calls are already running or waiting for a "
                "handler thread (--workers + --max-queue); retry with backoff",
                reason="OVERLOADED",
                retry_after_s=self.retry_after_s,
            )
            return _refusal(handler, failure, self._refusals)
        return handler


class ReflectionInterceptor(grpc.ServerInterceptor):
    """Runs reflection streams on a small pool of their own, bounded, and ends idle ones.

    A reflection stream holds its thread until the client closes it, and GUI clients (grpcui,
    Postman, Evans) keep theirs open. On the handler pool, a few of them would leave Predict
    no thread to run on while health still says SERVING. Here they never touch that pool: at
    most `max_streams` run at once (one more is RESOURCE_EXHAUSTED / TOO_MANY_STREAMS with a
    RetryInfo), a stream with no request for `idle_s` is cancelled, and `end_streams` cancels
    every open one at shutdown, so none holds the server for its grace period.

    Args:
      refusal_pool: where refusals run.
      max_streams: reflection streams open at once (grpcurl opens one per command).
      idle_s: seconds a stream may wait for its next request.
    """

    def __init__(self, refusal_pool: futures.ThreadPoolExecutor, max_streams: int, idle_s: float):
        self._pool = CountingThreadPool(max_streams, thread_name_prefix="grpc-reflection")
        self._refusals = refusal_pool
        self.max_streams = max_streams
        self.idle_s = idle_s
        self._open: set = set()  # The contexts of open streams.
        self._lock = threading.Lock()
        self._ended = False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(REFLECTION_METHODS):
            return handler
        if self._pool.pending >= self.max_streams:
            failure = RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} reflection streams are open already (--reflection-streams); "
                "close idle reflection clients or retry shortly",
                reason="TOO_MANY_STREAMS",
                retry_after_s=1.0,
            )
            return _refusal(handler, failure, self._refusals)

        def decorate(behavior, response_streaming):
            def guarded(requests, context, *rest):
                return self._guard(behavior, requests, context, *rest)

            guarded.experimental_thread_pool = self._pool
            return guarded

        return _replace_behavior(handler, decorate)

    def _guard(self, behavior, requests, context, *rest):
        last = [time.monotonic()]

        def check_idle():
            left = last[0] + self.idle_s - time.monotonic()
            if left > 0:
                start_timer(left)
            elif context.is_active():
                log.info("reflection stream from %s idle for %g s: cancelled", context.peer(),
                         self.idle_s)  # fmt: skip
                context.cancel()

        timer: list[threading.Timer] = []

        def start_timer(delay: float) -> None:
            t = threading.Timer(delay, check_idle)
            t.daemon = True
            timer[:] = [t]
            t.start()

        def watched():
            for request in requests:
                last[0] = time.monotonic()
                yield request

        with self._lock:
            ended = self._ended
            self._open.add(context)
        if ended:
            context.cancel()
        start_timer(self.idle_s)
        try:
            yield from behavior(watched(), context, *rest)
        finally:
            timer[0].cancel()
            with self._lock:
                self._open.discard(context)

    def end_streams(self) -> int:
        """Cancels every open reflection stream (and any opened later); returns how many."""
        with self._lock:
            self._ended = True
            contexts = list(self._open)
        for context in contexts:
            context.cancel()
        return len(contexts)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


class _Oversized:
    """Stands in for a request message over the limit (the bytes are dropped at once)."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


class _Malformed:
    """Stands in for request bytes that are not a valid message of the method's type."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


class MessageSizeInterceptor(grpc.ServerInterceptor):
    """Refuses request messages over `max_bytes` itself, so the refusal is logged and counted.

    gRPC's own receive limit (set higher, as a hard ceiling) ends a call without running its
    handler, and no server hook reports that, so nothing could log it. Here the request
    deserializer sees the message's size first and hands an over-limit message on as a marker
    instead of parsing it; the behaviour then ends the call with RESOURCE_EXHAUSTED /
    MESSAGE_TOO_LARGE (no RetryInfo: the same request can never succeed).

    Bytes that do not parse as the method's request type are INVALID_ARGUMENT /
    MALFORMED_REQUEST the same way (gRPC's own answer is a bare, unlogged INTERNAL).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def _failure(self, size: int) -> RpcFailure:
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request message is {human_bytes(size)} ({size} bytes); this server accepts at most "
            f"{human_bytes(self.max_bytes)} ({self.max_bytes} bytes, --max-message-bytes): send "
            "smaller images or fewer frames",
            reason="MESSAGE_TOO_LARGE",
        )

    def _refuse(self, message: _Oversized | _Malformed, context, method: str) -> None:
        if isinstance(message, _Oversized):
            annotate(reason="MESSAGE_TOO_LARGE", bytes=message.size)
            context.abort_with_status(self._failure(message.size).to_status())
        annotate(reason="MALFORMED_REQUEST")
        failure = RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid message for {method} ({message.error}); build it "
            "with stubs generated from protos/har/v1/har.proto",
            reason="MALFORMED_REQUEST",
        )
        context.abort_with_status(failure.to_status())

    def _checked(self, requests: Iterator, context, method: str) -> Iterator:
        for request in requests:
            if isinstance(request, (_Oversized, _Malformed)):
                self._refuse(request, context, method)
            yield request

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        limit, parse = self.max_bytes, handler.request_deserializer
        method = handler_call_details.method

        def deserialize(data: bytes):
            if len(data) > limit:
                return _Oversized(len(data))
            if parse is None:
                return data
            try:
                return parse(data)
            except DecodeError as e:
                return _Malformed(str(e) or "unparsable protobuf")

        def decorate(behavior, response_streaming):
            if handler.request_streaming:

                def gated(requests, context, *rest):
                    return behavior(self._checked(requests, context, method), context, *rest)
            else:

                def gated(request, context, *rest):
                    if isinstance(request, (_Oversized, _Malformed)):
                        self._refuse(request, context, method)
                    return behavior(request, context, *rest)

            if getattr(behavior, "experimental_non_blocking", False):
                gated.experimental_non_blocking = True
            return gated

        return _replace_behavior(handler, decorate, request_deserializer=deserialize)


def _final_code(context: grpc.ServicerContext, raised: bool) -> grpc.StatusCode:
    code = context.code()
    if code is not None:
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code)
    if not context.is_active():
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if deadline_passed(context)
            else grpc.StatusCode.CANCELLED
        )
    return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK


def _plain(text: str) -> bool:
    return bool(text) and '"' not in text and all(c.isprintable() and not c.isspace() for c in text)


def format_access_line(fields: dict) -> str:
    """One request as one `key=value ...` line.

    A value with whitespace, quotes or unprintable characters is JSON-quoted (escaped), so no
    value, not even a method name a client made up, can end the line or forge another field.
    """
    parts = []
    for key, value in fields.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text if _plain(text) else json.dumps(text)}")
    return " ".join(parts)


class AccessLogInterceptor(grpc.ServerInterceptor):
    """One log line and the metrics per call: method, status code, latency, peer, annotations.

    Outermost, so calls refused by auth, the rate limit, admission or the message size limit are
    logged and counted too, and so are calls to a method the server does not have
    (UNIMPLEMENTED, counted under method="unknown"). Latency runs from the call's arrival (this
    interceptor runs then, in gRPC's polling thread), so time spent waiting for a handler
    thread is in it; `call_arrival` gives the servicer the same start. Never logs request or
    response bodies (no image bytes in logs). The fields also travel as `record.fields`, which
    the JSON log format writes as one object.
    """

    def __init__(self, metrics: Metrics | None):
        self._metrics = metrics

    def _record(self, method: str, context, start: float, fields: dict, raised: bool) -> None:
        latency = time.perf_counter() - start
        code = _final_code(context, raised)
        if self._metrics is not None:
            self._metrics.requests.labels(method, code.name).inc()
            if "reason" in fields:
                self._metrics.refusals.labels(method, fields["reason"]).inc()
            self._metrics.latency.labels(method).observe(latency)
            self._metrics.in_flight.dec()
        line = {
            "event": "rpc",
            "method": method,
            "code": code.name,
            "latency_ms": latency * 1e3,
            **fields,
            "peer": context.peer(),
        }
        access_log.info(format_access_line(line), extra={"fields": line})

    def _unknown(self, method: str) -> None:
        """An unknown method: gRPC answers UNIMPLEMENTED without a handler (so no peer here)."""
        if self._metrics is not None:
            self._metrics.requests.labels(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
        line = {"event": "rpc", "method": method[:200], "code": "UNIMPLEMENTED"}
        access_log.info(format_access_line(line), extra={"fields": line})

    def intercept_service(self, continuation, handler_call_details):
        arrived = time.perf_counter()
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            self._unknown(method)
            return None
        if getattr(handler.unary_stream, "experimental_non_blocking", False):
            # Health Watch streams answer from a callback, not a thread; wrapping would lose that
            # and pin a handler thread per watcher for its whole (long) life. Not logged.
            return handler

        def decorate(behavior, response_streaming):
            def logged(request, context):
                fields: dict = {}
                token, arrival_token = _call_fields.set(fields), _call_arrival.set(arrived)
                if self._metrics is not None:
                    self._metrics.in_flight.inc()
                try:
                    result = behavior(request, context)
                except BaseException:
                    self._record(method, context, arrived, fields, raised=True)
                    raise
                finally:
                    _call_fields.reset(token)
                    _call_arrival.reset(arrival_token)
                if response_streaming:
                    return self._stream(result, method, context, arrived, fields)
                self._record(method, context, arrived, fields, raised=False)
                return result

            return logged

        return _replace_behavior(handler, decorate)

    def _stream(self, responses: Iterable, method, context, start, fields):
        raised = False
        try:
            yield from responses
        except BaseException:
            raised = True
            raise
        finally:
            self._record(method, context, start, fields, raised=raised)
