"""`har-serve`: the gRPC model server's command line (every flag also a HAR_SERVE_* variable).

    har-serve --model runs/har/model --port 50051 --metrics-port 9090
    HAR_SERVE_PORT=0 HAR_SERVE_AUTH_TOKEN_FILE=/run/secrets/token har-serve

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 if the model cannot be loaded,
2 for bad flags or settings, 3 if the port or a TLS file cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from grpc_server.config import MiB, ServerConfig

ENV_PREFIX = "HAR_SERVE_"
log = logging.getLogger("grpc_server")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; each flag's default comes from its HAR_SERVE_* variable in `env`.

    Args:
      env: the environment to read defaults from (os.environ by default).
    """
    env = os.environ if env is None else env
    d = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="har-serve",
        description="Serve a har-flax model over gRPC (har.v1.ActionRecognition).",
        epilog="Every flag can also be set with an environment variable: --max-batch-size is "
        "HAR_SERVE_MAX_BATCH_SIZE, --no-batching is HAR_SERVE_NO_BATCHING=1. Flags win.",
    )
    env_errors: list[str] = []

    def add(flag: str, *, type=str, default=None, help: str, metavar=None):
        name = _env_name(flag)
        if name in env:
            try:
                default = type(env[name])
            except ValueError as e:
                env_errors.append(f"{name}={env[name]!r}: {e}")
        parser.add_argument(
            flag, type=type, default=default, metavar=metavar, help=f"{help} [env {name}]"
        )

    def add_switch(flag: str, help: str):
        name = _env_name(flag)
        default = False
        if name in env:
            try:
                default = _parse_bool(env[name])
            except ValueError as e:
                env_errors.append(f"{name}: {e}")
        parser.add_argument(flag, action="store_true", default=default, help=f"{help} [env {name}]")

    add(
        "--model",
        default=d.model,
        metavar="DIR",
        help="model directory (default: built-in ImageNet MobileNetV2)",
    )
    add("--max-image-bytes", type=int, default=d.max_image_bytes, help="encoded bytes per image")
    add("--max-pixels", type=int, default=d.max_pixels, help="decoded pixels per frame")
    add("--max-frames", type=int, default=d.max_frames, help="frames per request")
    add(
        "--max-total-pixels",
        type=int,
        default=d.max_total_pixels,
        help="decoded pixels per request, all frames together (at least --max-pixels)",
    )
    add_switch("--no-warmup", "skip compiling every batch size before SERVING")
    add("--host", default=d.host, help="address to bind (default: %(default)s)")
    add("--port", type=int, default=d.port, help="port; 0 picks a free one (default: %(default)s)")
    add(
        "--workers",
        type=int,
        default=None,
        help="handler threads for Predict (default: 16, or (--model-threads + 1) x "
        "--max-batch-size when batching is on, so that batches fill up)",
    )
    add(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help=f"largest request or reply (default: {d.max_message_bytes // MiB} MiB)",
    )
    add("--tls-cert", default=None, metavar="PEM", help="certificate chain; serves TLS")
    add("--tls-key", default=None, metavar="PEM", help="private key for --tls-cert")
    add("--tls-client-ca", default=None, metavar="PEM", help="require client certs (mTLS)")
    add("--auth-token", default=None, help="bearer token required on har.v1 calls")
    add("--auth-token-file", default=None, metavar="FILE", help="read the token from FILE")
    add(
        "--rate-limit",
        type=float,
        default=d.rate_limit,
        help="requests/s per client address, 0 = off (default: %(default)s)",
    )
    add("--rate-burst", type=int, default=d.rate_burst, help="burst size (default: 2x rate)")
    add(
        "--batching",
        default="auto",
        metavar="{auto,on,off}",
        help="dynamic batching; auto = on with a GPU/TPU, off on a CPU (default: auto)",
    )
    add_switch("--no-batching", "same as --batching off")
    add(
        "--max-batch-size",
        type=int,
        default=d.max_batch_size,
        help="samples per model call (default: %(default)s)",
    )
    add(
        "--max-wait-us",
        type=int,
        default=d.max_wait_us,
        help="how long a request waits for a batch, µs (default: %(default)s)",
    )
    add(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="waiting requests before RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    add(
        "--model-threads",
        type=int,
        default=d.model_threads,
        help="model calls at once; >1 helps small batches on CPUs (default: 1)",
    )
    add(
        "--keepalive-min-interval",
        type=float,
        default=d.keepalive_min_interval_s,
        help="seconds clients must leave between keepalive pings (default: %(default)s)",
    )
    add(
        "--reflection-streams",
        type=int,
        default=d.reflection_streams,
        help="reflection streams open at once; 0 turns reflection off (default: %(default)s)",
    )
    add(
        "--reflection-idle",
        type=float,
        default=d.reflection_idle_s,
        help="seconds an idle reflection stream stays open (default: %(default)s)",
    )
    add(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="Prometheus /metrics port; 0 picks a free one (default: off)",
    )
    add("--metrics-host", default=d.metrics_host, help="metrics address (default: %(default)s)")
    add(
        "--grace",
        type=float,
        default=d.grace_s,
        help="seconds in-flight calls get at shutdown (default: %(default)s)",
    )
    add(
        "--drain",
        type=float,
        default=d.drain_s,
        help="seconds NOT_SERVING shows before the port closes (default: %(default)s)",
    )
    add("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING (default: %(default)s)")
    add("--log-format", default=d.log_format, help="text or json (default: %(default)s)")
    parser.set_defaults(_env_errors=env_errors)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the parsed flags describe.

    Raises:
      ValueError: an inconsistent setting or an unreadable token file, with what to fix.
    """
    batching = {"auto": None, "on": True, "off": False}.get(args.batching.lower(), "bad")
    if batching == "bad":
        raise ValueError(f"--batching must be auto, on or off, got {args.batching!r}")
    if args.no_batching:
        if batching is True:
            raise ValueError("--no-batching contradicts --batching on")
        batching = False
    token = args.auth_token
    if args.auth_token_file:
        if token:
            raise ValueError("give --auth-token or --auth-token-file, not both")
        try:
            token = Path(args.auth_token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"cannot read --auth-token-file {args.auth_token_file}: {e}") from e
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
    return ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_message_bytes=args.max_message_bytes,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_pixels,
        max_frames=args.max_frames,
        max_total_pixels=args.max_total_pixels,
        batching=batching,
        max_batch_size=args.max_batch_size,
        max_wait_us=args.max_wait_us,
        max_queue=args.max_queue,
        model_threads=args.model_threads,
        warmup=not args.no_warmup,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token or None,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        keepalive_min_interval_s=args.keepalive_min_interval,
        reflection_streams=args.reflection_streams,
        reflection_idle_s=args.reflection_idle,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        grace_s=args.grace,
        drain_s=args.drain,
        log_level=args.log_level.upper(),
        log_format=args.log_format,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access-log records carry their fields as `record.fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:  # Server-side only; clients never see tracebacks.
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if logging.getLevelName(level) != logging.DEBUG:
        # orbax (through absl) and JAX narrate every restore and backend probe at INFO.
        for noisy in ("absl", "jax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._env_errors:
        parser.error("bad environment variable: " + "; ".join(args._env_errors))
    try:
        config = config_from_args(args)
        setup_logging(config.log_level, config.log_format)
    except ValueError as e:
        parser.error(str(e))

    from grpc_server.server import HarServer, ServerError

    server = HarServer(config)
    stop = threading.Event()
    # Signals only set a flag: the shutdown sequence runs in the main thread, not in a handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.start()
    except ServerError as e:
        log.error("%s", e)
        return 3

    failed: list[BaseException] = []

    def load():
        try:
            server.load()
        except Exception as e:  # Reported in the main thread; the process exits 1.
            failed.append(e)
            log.error("cannot load the model: %s", e)
            stop.set()

    # Load in the background so SIGTERM during a slow compile still exits promptly and cleanly.
    loader = threading.Thread(target=load, name="model-loader", daemon=True)
    loader.start()
    while not stop.wait(1.0):
        pass
    server.stop(drain_s=0 if failed else None)
    code = 1 if failed else 0
    if loader.is_alive():
        # Stopped mid-compile: interpreter teardown under a running XLA compile can abort the
        # process, so leave without it (logs flushed first) to keep the documented exit code.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
