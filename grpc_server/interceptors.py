"""Server interceptors: access log + metrics (outermost), bearer-token auth, per-peer rate limit.

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
from collections.abc import Callable, Iterable

import grpc

from grpc_server.errors import RpcFailure
from grpc_server.metrics import Metrics

access_log = logging.getLogger("grpc_server.access")

# Methods that never need a token: the standard health and reflection services, and our own
# cheap Health (probes and dashboards should not need secrets).
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/har.v1.ActionRecognition/Health",
)
RATE_LIMITED_PREFIX = "/har.v1."

# Per-call facts the servicer adds for the access log (batch size, frames, ...).
_call_fields: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "har_call_fields", default=None
)


def annotate(**fields) -> None:
    """Adds key=value facts to the current call's access-log line (no-op outside a call)."""
    current = _call_fields.get()
    if current is not None:
        current.update(fields)


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_METHODS)


def _replace_behavior(handler: grpc.RpcMethodHandler, decorate: Callable) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `decorate(behaviour, response_streaming)`."""
    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return factory(
        decorate(behavior, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _reject(failure: RpcFailure):
    """A behaviour decorator that ends the call with `failure` without running it."""

    def decorate(behavior, response_streaming):
        def rejected(request, context):
            context.abort_with_status(failure.to_status())

        return rejected

    return decorate


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every non-open method."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or _is_open(handler_call_details.method):
            return handler
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if got is not None and hmac.compare_digest(got.encode(), self._expected):
            return handler
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if got is None
            else "invalid bearer token"
        )
        failure = RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message, reason="UNAUTHENTICATED")
        return _replace_behavior(handler, _reject(failure))


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


def _final_code(context: grpc.ServicerContext, raised: bool) -> grpc.StatusCode:
    code = context.code()
    if code is not None:
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code)
    if not context.is_active():
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK


def format_access_line(fields: dict) -> str:
    """One request as one `key=value ...` line (values with spaces are quoted)."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
    return " ".join(parts)


class AccessLogInterceptor(grpc.ServerInterceptor):
    """One log line and the metrics per call: method, status code, latency, peer, annotations.

    Outermost, so calls refused by auth or the rate limit are logged and counted too. Never logs
    request or response bodies (no image bytes in logs). The fields also travel as
    `record.fields`, which the JSON log format writes as one object.
    """

    def __init__(self, metrics: Metrics | None):
        self._metrics = metrics

    def _record(self, method: str, context, start: float, fields: dict, raised: bool) -> None:
        latency = time.perf_counter() - start
        code = _final_code(context, raised)
        if self._metrics is not None:
            self._metrics.requests.labels(method, code.name).inc()
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

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if getattr(handler.unary_stream, "experimental_non_blocking", False):
            # Health Watch streams answer from a callback, not a thread; wrapping would lose that
            # and pin a handler thread per watcher for its whole (long) life. Not logged.
            return handler

        def decorate(behavior, response_streaming):
            def logged(request, context):
                start = time.perf_counter()
                fields: dict = {}
                token = _call_fields.set(fields)
                if self._metrics is not None:
                    self._metrics.in_flight.inc()
                try:
                    result = behavior(request, context)
                except BaseException:
                    self._record(method, context, start, fields, raised=True)
                    raise
                finally:
                    _call_fields.reset(token)
                if response_streaming:
                    return self._stream(result, method, context, start, fields)
                self._record(method, context, start, fields, raised=False)
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
