"""Server settings: one frozen dataclass, the single place where serving defaults live."""

from __future__ import annotations

import dataclasses
import logging

MiB = 1024 * 1024
# Handler threads without batching (or with a --max-batch-size small enough).
DEFAULT_WORKERS = 16
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `har-serve` can be told; every field is a flag and a HAR_SERVE_* variable."""

    model: str | None = None  # Model directory; None = the built-in ImageNet MobileNetV2.
    host: str = "[::]"  # Address to bind ("[::]" = every interface, IPv4 and IPv6).
    port: int = 50051  # 0 = any free port (the bound one is logged: "listening on HOST:PORT").
    # gRPC handler threads for Predict: each decodes its request, then holds its thread until
    # the model answers, so with batching no batch can be larger than this. None = auto
    # (resolved_workers): DEFAULT_WORKERS without batching, else enough for model_threads
    # batches of max_batch_size to run while as many wait or decode (batching_workers).
    workers: int | None = None
    max_message_bytes: int = 16 * MiB  # Per message; the gRPC default 4 MiB rejects phone photos.
    # Image limits handed to the Predictor (None = the Predictor's own default).
    max_image_bytes: int | None = None  # Encoded bytes of one image.
    max_pixels: int | None = None  # Decoded pixels of one frame (stops decompression bombs).
    max_frames: int | None = None  # Frames of one request (images or animation frames).
    # Decoded pixels of one request, all frames together (at least max_pixels).
    max_total_pixels: int | None = None
    # Dynamic batching.
    # None = auto: on with a GPU or TPU, off on a CPU, where a batched forward costs more per
    # image than single ones (docs/BENCHMARKS.md). False = each request runs alone.
    batching: bool | None = None
    max_batch_size: int = 32  # Largest batch one jitted call sees (buckets: 1, 2, 4, ...).
    # How long the first queued request waits for company. 0 (as in Triton) = no added
    # latency: batches still form from the requests that arrive while the model is busy.
    max_wait_us: int = 0
    max_queue: int = 256  # Requests waiting for the model; one more = RESOURCE_EXHAUSTED.
    model_threads: int = 1  # Batches run concurrently (>1 helps small batches on a CPU).
    warmup: bool = True  # Compile every batch bucket before reporting SERVING.
    # Security.
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serves TLS.
    tls_key: str | None = None  # PEM private key.
    tls_client_ca: str | None = None  # PEM CA bundle; when set, clients must present a cert.
    # Bearer token required on har.v1 calls (health stays open); kept out of repr and logs.
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    rate_limit: float = 0.0  # Requests per second per client address; 0 = unlimited.
    rate_burst: int = 0  # Bucket size for rate_limit; 0 = max(1, 2 * rate_limit).
    # Connections.
    # Shortest interval between client keepalive pings that the server accepts (with or
    # without calls in flight); faster pingers are sent GOAWAY ("too_many_pings").
    keepalive_min_interval_s: float = 10.0
    reflection_streams: int = 4  # Server reflection streams open at once; 0 = no reflection.
    reflection_idle_s: float = 60.0  # A reflection stream with no request this long is ended.
    # Operations.
    metrics_port: int | None = None  # Prometheus /metrics port; None = off, 0 = any free port.
    metrics_host: str = "0.0.0.0"  # Address for the metrics endpoint.
    grace_s: float = 10.0  # Shutdown: how long in-flight calls may take to finish.
    drain_s: float = 0.5  # Shutdown: NOT_SERVING is visible this long before the port closes.
    log_level: str = "INFO"
    log_format: str = "text"  # "text" (key=value) or "json" (one object per line).

    def __post_init__(self):
        checks = [
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (
                self.workers is None or self.workers >= 1,
                f"workers must be at least 1, got {self.workers}",
            ),
            (
                self.max_message_bytes >= 1024,
                f"max_message_bytes must be at least 1024, got {self.max_message_bytes}",
            ),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (self.max_wait_us >= 0, f"max_wait_us must be >= 0, got {self.max_wait_us}"),
            (self.max_queue >= 1, f"max_queue must be at least 1, got {self.max_queue}"),
            (self.model_threads >= 1, f"model_threads must be >= 1, got {self.model_threads}"),
            (
                (self.tls_cert is None) == (self.tls_key is None),
                "tls_cert and tls_key must be given together",
            ),
            (
                self.tls_client_ca is None or self.tls_cert is not None,
                "tls_client_ca (mutual TLS) needs tls_cert and tls_key",
            ),
            (self.auth_token != "", "auth_token must not be empty (leave it unset to disable)"),
            (self.rate_limit >= 0, f"rate_limit must be >= 0, got {self.rate_limit}"),
            (self.rate_burst >= 0, f"rate_burst must be >= 0, got {self.rate_burst}"),
            (
                self.keepalive_min_interval_s >= 0,
                f"keepalive_min_interval_s must be >= 0, got {self.keepalive_min_interval_s}",
            ),
            (
                self.reflection_streams >= 0,
                f"reflection_streams must be >= 0, got {self.reflection_streams}",
            ),
            (
                self.reflection_idle_s > 0,
                f"reflection_idle_s must be > 0, got {self.reflection_idle_s}",
            ),
            (self.grace_s >= 0, f"grace_s must be >= 0, got {self.grace_s}"),
            (self.drain_s >= 0, f"drain_s must be >= 0, got {self.drain_s}"),
            (self.log_format in ("text", "json"), "log_format must be text or json"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("max_image_bytes", "max_pixels", "max_frames", "max_total_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        from har_flax.images import pillow_max_pixels  # noqa: PLC0415 (Pillow only when used)

        ceiling = pillow_max_pixels()
        if self.max_pixels is not None and ceiling is not None and self.max_pixels > ceiling:
            # Pillow refuses such frames itself, whatever max_pixels says.
            raise ValueError(
                f"max_pixels {self.max_pixels:,} is over {ceiling:,}, the most pixels per frame "
                f"the image decoder (Pillow) opens; set max_pixels (--max-pixels) to at most "
                f"{ceiling}"
            )
        self.image_limits()  # ImageLimits refuses a max_total_pixels under max_pixels.

    def resolved_workers(self, backend: str) -> int:
        """Handler threads on `backend` ("cpu", "gpu", "tpu"): `workers` if set, else
        DEFAULT_WORKERS without batching (the model then runs in the handler threads) and
        :meth:`batching_workers` with it. The backend matters only for batching "auto"."""
        if self.workers is not None:
            return self.workers
        return self.batching_workers() if self._batches_on(backend) else DEFAULT_WORKERS

    def _batches_on(self, backend: str) -> bool:
        return self.batching if self.batching is not None else backend != "cpu"

    def batching_workers(self) -> int:
        """Handler threads that keep batches of `max_batch_size` full.

        A Predict call holds its handler thread until the model answers, so a batch can only
        be as large as the number of threads: `model_threads` full batches in the model, and as
        many again waiting or decoding, so the next batches are full when the model is free.
        """
        return max(DEFAULT_WORKERS, (self.model_threads + 1) * self.max_batch_size)

    def image_limits(self):
        """The Predictor's ImageLimits: its own defaults where a field is None.

        An unset max_total_pixels rises to max_pixels when that is raised above it, so raising
        the per-frame limit alone lets a frame of that size through.
        """
        from har_flax.images import ImageLimits  # noqa: PLC0415 (Pillow only when used)

        total = self.max_total_pixels
        if total is None and self.max_pixels is not None:
            total = max(ImageLimits.max_total_pixels, self.max_pixels)
        given = {
            "max_bytes": self.max_image_bytes,
            "max_pixels": self.max_pixels,
            "max_frames": self.max_frames,
            "max_total_pixels": total,
        }
        return ImageLimits(**{k: v for k, v in given.items() if v is not None})

    def use_batching(self, backend: str) -> bool:
        """Whether to batch on `backend` ("cpu", "gpu", "tpu"): the setting, or auto.

        Batching on, it logs a warning when `workers` caps batches below `max_batch_size`.
        """
        batching = self._batches_on(backend)
        workers = self.resolved_workers(backend)
        if batching and workers < self.max_batch_size:
            log.warning(
                "--workers %d is below --max-batch-size %d: each request waiting for the model "
                "holds a handler thread, so no batch will be larger than %d and the larger "
                "compiled batch sizes go unused; raise --workers to %d (or leave it unset), or "
                "lower --max-batch-size to %d",
                workers,
                self.max_batch_size,
                workers,
                self.batching_workers(),
                workers,
            )
        return batching

    def batch_sizes(self, batching: bool) -> tuple[int, ...]:
        """The compiled buckets: powers of two below max_batch_size, then max_batch_size."""
        if not batching:
            return (1,)  # Every call is a single sample: one bucket, one compile.
        sizes = [1]
        while sizes[-1] * 2 < self.max_batch_size:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != self.max_batch_size:
            sizes.append(self.max_batch_size)
        return tuple(sizes)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
