"""Server assembly: the servicer, standard health, reflection, interceptors, TLS, metrics.

server = HarServer(ServerConfig(port=0))
server.start()          # listening, health NOT_SERVING
server.load()           # Predictor loaded and warmed up, health SERVING
...
server.stop()           # NOT_SERVING, drain, Watch streams end, in-flight calls finish (grace)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from grpc_server.config import ServerConfig
from grpc_server.interceptors import (
    AccessLogInterceptor,
    AdmissionInterceptor,
    AuthInterceptor,
    CountingThreadPool,
    MessageSizeInterceptor,
    RateLimitInterceptor,
    ReflectionInterceptor,
)
from grpc_server.metrics import Metrics
from grpc_server.reflection import enable_documented_reflection
from grpc_server.servicer import ActionRecognitionServicer
from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = har_pb2.DESCRIPTOR.services_by_name["ActionRecognition"].full_name
# Threads for calls that never block (health, Classes), apart from the handler threads.
FAST_THREADS = 4
# Threads for refusals (no token, overloaded, shutting down), apart from the probes' threads: a
# refusal never reads the request and holds its thread for microseconds, but a flood of them
# (a client retrying without its token) must not queue ahead of health checks.
REFUSAL_THREADS = 2
# gRPC's own limits, kept only as safety nets far above the ones the server enforces (and logs):
# a message over MESSAGE_CEILING x --max-message-bytes, or more than concurrency_ceiling() calls
# at once, is refused by gRPC without running a handler, and no server hook reports that, so it
# is neither logged nor counted (docs/API.md, Operations).
MESSAGE_CEILING = 2
_GRPC_MAX_MESSAGE = 2**31 - 1


def concurrency_ceiling(workers: int, max_queue: int) -> int:
    """gRPC's maximum_concurrent_rpcs: 4x what admission lets in, at least 256."""
    return max(256, 4 * (workers + max_queue))


class ServerError(RuntimeError):
    """The server cannot start as configured (port in use, unreadable certificate, ...)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ServerError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS (and, with tls_client_ca, mutual TLS) credentials from the configured PEM files."""
    key = _read(config.tls_key, "TLS private key (--tls-key)")
    cert = _read(config.tls_cert, "TLS certificate (--tls-cert)")
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read(config.tls_client_ca, "client CA bundle (--tls-client-ca)")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class EndableHealthServicer(health.HealthServicer):
    """The standard grpc.health.v1 servicer, with List, and `end_watches` to close open Watches.

    grpcio-health-checking's `enter_graceful_shutdown` sends NOT_SERVING but leaves Watch streams
    open, and a server stopping with a grace period waits for every open call: one watcher
    would hold shutdown for the whole grace. Ending the streams (status OK, after the
    NOT_SERVING they already got) lets the server stop once real work is done.
    """

    def __init__(self):
        super().__init__()  # Marks our Watch non-blocking, as the base class does its own.
        self._ends: set = set()
        self._ends_lock = threading.Lock()
        self._ended = False

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is None:  # A server without non-blocking streams.
            return super().Watch(request, context)
        done = False

        def send(response):
            # Ends the stream once; later sends (the base class's own close callback) are
            # dropped, since a finished call cannot be given a second status.
            nonlocal done
            with self._ends_lock:
                if done:
                    return
                if response is None:
                    done = True
                    self._ends.discard(send)
            send_response_callback(response)

        with self._ends_lock:
            self._ends.add(send)
            ended = self._ended
        result = super().Watch(request, context, send)
        if ended:
            send(None)
        return result

    def List(self, request, context):
        # grpcio-health-checking advertises List (grpc.health.v1 since 2024) without
        # implementing it: every call was UNIMPLEMENTED with a traceback in the log.
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )

    def end_watches(self) -> int:
        """Ends every open Watch stream (and any opened later); returns how many were open."""
        with self._ends_lock:
            self._ended = True
            ends = list(self._ends)
        for send in ends:
            send(None)
        return len(ends)


def default_backend() -> str:
    """JAX's platform ("cpu", "gpu", "tpu"); imports JAX, so only called when loading a model."""
    import jax

    return jax.default_backend()


def load_predictor(config: ServerConfig, batching: bool):
    """Loads and warms up the Predictor the config names (the built-in default without --model).

    Imported lazily: JAX starts here, after the port is open and health says NOT_SERVING.
    Without batching only the single-sample bucket is compiled.
    """
    from har_flax.predictor import Predictor

    return Predictor.load(
        config.model,
        batch_sizes=config.batch_sizes(batching),
        limits=config.image_limits(),
        warmup=config.warmup,
    )


class HarServer:
    """One har.v1 server process's gRPC server and everything around it.

    Args:
      config: the settings.
      metrics: the Metrics to record into (a fresh registry by default).
    """

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.servicer = ActionRecognitionServicer(
            max_batch_size=config.max_batch_size,
            max_wait_us=config.max_wait_us,
            max_queue=config.max_queue,
            model_threads=config.model_threads,
            metrics=self.metrics,
        )
        self.health = EndableHealthServicer()
        self.port: int | None = None
        self.workers: int | None = None  # handler threads, once started (resolved_workers)
        self.metrics_port: int | None = None
        self._metrics_httpd = None
        self._server: grpc.Server | None = None
        self._pools: tuple[futures.ThreadPoolExecutor, ...] = ()
        self._reflection: ReflectionInterceptor | None = None
        self._admission: AdmissionInterceptor | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def _interceptors(
        self,
        pool: CountingThreadPool,
        fast_pool: futures.ThreadPoolExecutor,
        refusal_pool: futures.ThreadPoolExecutor,
    ) -> list[grpc.ServerInterceptor]:
        # Order matters: the first is outermost, so refused calls are still logged and counted.
        c = self.config
        chain: list[grpc.ServerInterceptor] = [
            AccessLogInterceptor(self.metrics),
            MessageSizeInterceptor(c.max_message_bytes),
        ]
        if c.auth_token:
            chain.append(AuthInterceptor(c.auth_token, refusal_pool))
        if c.rate_limit > 0:
            chain.append(RateLimitInterceptor(c.rate_limit, c.rate_burst))
        # Innermost, so an unauthenticated or rate-limited client hears that, not OVERLOADED.
        self._admission = AdmissionInterceptor(
            pool, fast_pool, refusal_pool, limit=self.workers + c.max_queue
        )
        chain.append(self._admission)
        if self._reflection is not None:
            chain.append(self._reflection)
        return chain

    def start(self) -> int:
        """Binds the port and starts answering (health NOT_SERVING until `load`).

        Returns:
          The bound port (useful with port 0).

        Raises:
          ServerError: the address cannot be bound or a TLS file cannot be read.
        """
        c = self.config
        options = [
            # MessageSizeInterceptor enforces max_message_bytes (logged, counted, with a
            # reason); gRPC's own check, which nothing can log, is only the far-off ceiling.
            (
                "grpc.max_receive_message_length",
                min(MESSAGE_CEILING * c.max_message_bytes, _GRPC_MAX_MESSAGE),
            ),
            ("grpc.max_send_message_length", c.max_message_bytes),
            # Fail loudly if another server holds the port instead of silently sharing it.
            ("grpc.so_reuseport", 0),
            # Clients behind NATs and load balancers keep idle connections open with pings;
            # gRPC's server default (one per 5 minutes, none without a call) sends them GOAWAY.
            ("grpc.keepalive_permit_without_calls", 1),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                round(c.keepalive_min_interval_s * 1000),
            ),
        ]
        # Batching "auto" with workers unset: the backend decides (imports JAX, which the
        # model's loading needs next anyway).
        self.workers = c.resolved_workers(
            default_backend() if c.workers is None and c.batching is None else "cpu"
        )
        pool = CountingThreadPool(max_workers=self.workers, thread_name_prefix="grpc")
        fast_pool = futures.ThreadPoolExecutor(FAST_THREADS, thread_name_prefix="grpc-fast")
        refusal_pool = futures.ThreadPoolExecutor(REFUSAL_THREADS, thread_name_prefix="grpc-refuse")
        self._pools = (pool, fast_pool, refusal_pool)
        if c.reflection_streams:
            self._reflection = ReflectionInterceptor(
                refusal_pool, max_streams=c.reflection_streams, idle_s=c.reflection_idle_s
            )
        server = grpc.server(
            pool,
            interceptors=self._interceptors(pool, fast_pool, refusal_pool),
            options=options,
            # AdmissionInterceptor bounds Predict (workers + max_queue) with a proper
            # OVERLOADED reply; gRPC's bare limit, which counts health checks too, is only a
            # safety net far above it.
            maximum_concurrent_rpcs=concurrency_ceiling(self.workers, c.max_queue),
        )
        har_pb2_grpc.add_ActionRecognitionServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._reflection is not None:
            enable_documented_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
        address = f"{c.host}:{c.port}"
        # Read first: an unreadable TLS file is its own error, not a port problem.
        credentials = server_credentials(c) if c.tls else None
        try:
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise ServerError(f"cannot listen on {address}: {e} (is the port in use?)") from None
        if port == 0:  # Older grpcio reports a failed bind this way instead of raising.
            raise ServerError(f"cannot listen on {address} (is the port in use?)")
        if c.metrics_port is not None:
            # Before the gRPC server starts: a busy metrics port stops everything, cleanly.
            try:
                self._metrics_httpd = self.metrics.serve(c.metrics_port, c.metrics_host)
            except OSError as e:
                server.stop(None)
                raise ServerError(
                    f"cannot serve metrics on {c.metrics_host}:{c.metrics_port} "
                    f"(--metrics-port): {e.strerror or e} (is the port in use?)"
                ) from None
            self.metrics_port = self._metrics_httpd.server_address[1]
        server.start()
        self._server, self.port = server, port
        scheme = "tls" if c.tls else "plaintext"
        log.info("listening on %s:%d (%s, %d handler threads)", c.host, port, scheme, self.workers)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", c.metrics_host, self.metrics_port)
        return port

    def load(self, predictor: Any = None) -> None:
        """Attaches a warmed-up Predictor (loading the configured one if None); health SERVING."""
        backend = default_backend()
        batching = self.config.use_batching(backend)
        if predictor is None:
            t0 = time.perf_counter()
            predictor = load_predictor(self.config, batching)
            log.info("model loaded and warmed up in %.1f s", time.perf_counter() - t0)
        if self._stopped.is_set():
            return  # Shut down while loading: stay NOT_SERVING.
        self.servicer.attach(predictor, batching=batching)
        info = predictor.info
        self.metrics.model.info(
            {k: str(getattr(info, k)) for k in ("name", "version", "kind", "num_classes")}
        )
        self.metrics.ready.set(1)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "SERVING model=%s version=%s kind=%s classes=%d backend=%s batching=%s",
            info.name,
            info.version,
            info.kind,
            info.num_classes,
            backend,
            f"max {self.config.max_batch_size} x {self.config.model_threads} threads"
            if batching
            else "off",
        )

    def stop(self, grace_s: float | None = None, drain_s: float | None = None) -> None:
        """Graceful shutdown; safe to call twice.

        Health goes NOT_SERVING first and Predict/Classes calls arriving from then on get
        UNAVAILABLE; after `drain_s` (so load balancers notice) the port closes and open health
        Watch and reflection streams end (they would otherwise hold shutdown for the whole
        grace); calls that arrived before (running, or still waiting for a handler thread) get
        `grace_s` to finish, then are cancelled.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        grace_s = self.config.grace_s if grace_s is None else grace_s
        drain_s = self.config.drain_s if drain_s is None else drain_s
        log.info("shutting down: NOT_SERVING, draining %.1f s, grace %.1f s", drain_s, grace_s)
        self.health.enter_graceful_shutdown()
        if self._admission is not None:
            self._admission.drain()
        self.servicer.drain()
        self.metrics.ready.set(0)
        if drain_s > 0:
            time.sleep(drain_s)
        if self._server is not None:
            stopped = self._server.stop(grace_s)  # No new calls from here on.
            watchers = self.health.end_watches()
            if watchers:
                log.info("ended %d health Watch stream(s)", watchers)
            if self._reflection is not None and (streams := self._reflection.end_streams()):
                log.info("ended %d reflection stream(s)", streams)
            stopped.wait()
        self.servicer.close(timeout=grace_s + 1)
        for pool in self._pools:
            pool.shutdown(wait=False)
        if self._reflection is not None:
            self._reflection.shutdown()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        log.info("stopped")

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()
