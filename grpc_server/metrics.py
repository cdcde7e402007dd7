"""Prometheus metrics of one server, in its own registry, served on a separate port."""

from __future__ import annotations

import prometheus_client as prom

# Latency buckets (seconds): a 224x224 forward on a CPU is tens of ms; queueing adds more.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics. Also the batcher's observer (`batch`, `queue_depth`, `dropped`)."""

    def __init__(self, registry: prom.CollectorRegistry | None = None):
        # A registry per server, so several servers in one process (tests) do not collide.
        self.registry = registry or prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "har_grpc_requests",
            "gRPC calls by method and final status code.",
            ("method", "code"),
            registry=r,
        )
        # Which refusal a status code stands for: RESOURCE_EXHAUSTED is an overload
        # (OVERLOADED) or a client's big image (IMAGE_TOO_LARGE), and alerts need to tell.
        self.refusals = prom.Counter(
            "har_grpc_refusals",
            "gRPC calls refused or failed, by method and reason (the ErrorInfo reason, as the "
            "access log's reason=).",
            ("method", "reason"),
            registry=r,
        )
        self.latency = prom.Histogram(
            "har_grpc_request_latency_seconds",
            "Server-side gRPC call latency by method.",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = prom.Gauge(
            "har_grpc_in_flight_requests", "gRPC calls being handled now.", registry=r
        )
        self.batch_size = prom.Histogram(
            "har_batch_size", "Samples per model call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.samples = prom.Counter(
            "har_model_samples", "Samples the model has run (after dropping).", registry=r
        )
        self.queue = prom.Gauge(
            "har_batch_queue_depth", "Requests waiting for the model.", registry=r
        )
        self.drops = prom.Counter(
            "har_batch_dropped",
            "Requests that left the queue before the model ran them.",
            ("reason",),
            registry=r,
        )
        self.abandoned = prom.Counter(
            "har_requests_abandoned",
            "Predict calls whose client had gone (deadline or cancel) while the server was "
            "still preparing them, by stage; the work stopped there.",
            ("stage",),
            registry=r,
        )
        self.model = prom.Info("har_model", "The model being served.", registry=r)
        self.ready = prom.Gauge("har_model_ready", "1 once the model is warmed up.", registry=r)

    # Batcher observer interface.
    def batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.samples.inc(size)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def dropped(self, reason: str) -> None:
        self.drops.labels(reason).inc()

    def abandoned_at(self, stage: str) -> None:
        self.abandoned.labels(stage).inc()

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Starts the /metrics HTTP endpoint in a daemon thread.

        Returns:
          The HTTP server (`server.server_address[1]` is the bound port; `shutdown()` stops it).
        """
        httpd, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        return httpd
