"""Prometheus metrics of the web UI, served at GET /metrics.

Each app gets its own registry (tests build many apps in one process). Under gunicorn with
several workers set PROMETHEUS_MULTIPROC_DIR (deploy/gunicorn.conf.py does): every worker then
writes its samples to files there and /metrics sums all workers, whichever one answers.
"""

from __future__ import annotations

import os
import time

import flask
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

# Request latencies span 1 ms (/health) to tens of seconds (a cold model on CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FRAME_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The web UI's metric objects, registered in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "har_webui_http_requests_total",
            "HTTP requests answered, by route, method and status code.",
            ("endpoint", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "har_webui_http_request_duration_seconds",
            "Time from request to response, by route.",
            ("endpoint",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_calls = Counter(
            "har_webui_grpc_calls_total",
            "Calls to the model server, by RPC and gRPC status code.",
            ("rpc", "code"),
            registry=self.registry,
        )
        self.frames = Histogram(
            "har_webui_predict_frames",
            "Frames (uploaded files) per POST /predict that reached the model server.",
            buckets=_FRAME_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Histogram(
            "har_webui_predict_upload_bytes",
            "Bytes of images per POST /predict.",
            buckets=tuple(2**k for k in range(12, 26)),
            registry=self.registry,
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text to serve at /metrics and its content type."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def init_app(app: flask.Flask) -> Metrics:
    """Creates the app's metrics and the hooks that count every request."""
    metrics = Metrics()
    app.extensions["har_metrics"] = metrics

    @app.before_request
    def _start_timer() -> None:
        flask.g.har_request_start = time.perf_counter()

    @app.after_request
    def _count(response: flask.Response) -> flask.Response:
        # The rule, not the path, so unknown URLs cannot grow the label set without bound.
        rule = flask.request.url_rule
        endpoint = rule.rule if rule is not None else "<unmatched>"
        metrics.requests.labels(endpoint, flask.request.method, str(response.status_code)).inc()
        start = flask.g.get("har_request_start")
        if start is not None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    return metrics
