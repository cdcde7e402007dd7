"""Web UI settings: one table of defaults, overridden by `HAR_*` environment variables.

Every key is both the environment variable name and the Flask config key, so
`HAR_GRPC_TARGET=model:50051 gunicorn 'webui:create_app()'` and
`create_app({"HAR_GRPC_TARGET": ...})` set the same thing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: Defaults, with what each one means. Types are taken from the default value.
DEFAULTS: dict[str, Any] = {
    # host:port of the har.v1 gRPC server (grpc_server / har-serve).
    "HAR_GRPC_TARGET": "127.0.0.1:50051",
    # Use TLS for the gRPC channel. With no CA file the system roots are used.
    "HAR_GRPC_TLS": False,
    # PEM file with the CA that signed the gRPC server's certificate.
    "HAR_GRPC_CA_CERT": "",
    # PEM client certificate and key, for servers that require mutual TLS.
    "HAR_GRPC_CLIENT_CERT": "",
    "HAR_GRPC_CLIENT_KEY": "",
    # Expected name in the server certificate when it differs from the target host.
    "HAR_GRPC_SERVER_NAME": "",
    # Bearer token sent as `authorization` metadata (the server's --auth-token).
    "HAR_GRPC_TOKEN": "",
    # File holding the token (systemd credentials, Docker secrets); wins over HAR_GRPC_TOKEN.
    "HAR_GRPC_TOKEN_FILE": "",
    # Deadline of one Predict call, seconds. Health and Classes use a shorter one.
    "HAR_GRPC_TIMEOUT_S": 30.0,
    # Largest upload accepted, MiB (1 MiB = 1,048,576 bytes): the files of one upload together.
    # The request body may be MULTIPART_MARGIN_BYTES larger (the form's own bytes); set nginx's
    # client_max_body_size to the sum.
    "HAR_MAX_UPLOAD_MB": 10.0,
    # Largest request the model server accepts, MiB: har-serve's --max-message-bytes (16 MiB by
    # default). The web UI refuses to start with an upload limit that would not fit in it.
    "HAR_GRPC_MAX_MESSAGE_MB": 16.0,
    # Per-client limit on POST /predict, in flask-limiter notation ("N per minute; M per hour").
    "HAR_RATE_LIMIT_PREDICT": "60 per minute",
    # Per-client limit on every other route except /health, /metrics and static files.
    "HAR_RATE_LIMIT_DEFAULT": "600 per minute",
    # Where the limiter keeps its counters: "memory://" is per process, so with several
    # gunicorn workers use a shared store, e.g. "redis://localhost:6379".
    "HAR_RATE_LIMIT_STORAGE": "memory://",
    # Turn rate limiting off entirely (tests, trusted internal deployments).
    "HAR_RATE_LIMIT_ENABLED": True,
    # Number of reverse proxies in front of the app whose X-Forwarded-* headers are trusted
    # (1 behind nginx). 0 trusts none: clients could otherwise spoof their address and
    # escape the per-client rate limit.
    "HAR_TRUSTED_PROXIES": 0,
}

_MIB = 1024 * 1024
#: Room for the multipart/form-data framing around the files (boundaries, part headers, the
#: top_k field): a request body may exceed the upload limit by this much.
MULTIPART_MARGIN_BYTES = _MIB
#: Room for the protobuf framing of a PredictRequest around the image bytes (a few bytes per
#: image, and top_k).
_GRPC_FRAMING_BYTES = 64 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, raw: str, default: Any) -> Any:
    """Converts one environment string to the type of its default, or explains the problem."""
    try:
        if isinstance(default, bool):
            value = raw.strip().lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: {e}") from None
    return raw


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Returns DEFAULTS overridden by the `HAR_*` variables present in `environ`.

    Args:
      environ: variables to read; `os.environ` when None.

    Returns:
      A dict with every key of DEFAULTS, typed like the default.

    Raises:
      ValueError: a variable cannot be parsed (names the variable and the accepted values).
    """
    environ = os.environ if environ is None else environ
    settings = dict(DEFAULTS)
    for name, default in DEFAULTS.items():
        if name in environ:
            settings[name] = _parse(name, environ[name], default)
    return settings


def max_upload_bytes(config: Mapping[str, Any]) -> int:
    """The upload limit in bytes: the files of one upload together (HAR_MAX_UPLOAD_MB MiB)."""
    return int(float(config["HAR_MAX_UPLOAD_MB"]) * _MIB)


def max_request_bytes(config: Mapping[str, Any]) -> int:
    """The largest HTTP request body read (Flask's MAX_CONTENT_LENGTH): uploads plus framing."""
    return max_upload_bytes(config) + MULTIPART_MARGIN_BYTES


def max_message_bytes(config: Mapping[str, Any]) -> int:
    """The largest gRPC request the model server accepts (HAR_GRPC_MAX_MESSAGE_MB MiB)."""
    return int(float(config["HAR_GRPC_MAX_MESSAGE_MB"]) * _MIB)


def validate(config: Mapping[str, Any]) -> None:
    """Checks values that would otherwise fail late (at the first request) with a vague error.

    Raises:
      ValueError: naming the setting and what is wrong with it.
    """
    if not str(config["HAR_GRPC_TARGET"]).strip():
        raise ValueError("HAR_GRPC_TARGET is empty; set it to the gRPC server's host:port")
    if not float(config["HAR_MAX_UPLOAD_MB"]) > 0:
        raise ValueError(f"HAR_MAX_UPLOAD_MB must be > 0, got {config['HAR_MAX_UPLOAD_MB']}")
    if not float(config["HAR_GRPC_MAX_MESSAGE_MB"]) > 0:
        raise ValueError(
            f"HAR_GRPC_MAX_MESSAGE_MB must be > 0, got {config['HAR_GRPC_MAX_MESSAGE_MB']}"
        )
    if max_upload_bytes(config) + _GRPC_FRAMING_BYTES > max_message_bytes(config):
        # Every upload near the limit would otherwise pass here and fail at the model server.
        upload_mb, message_mb = (
            float(config[k]) for k in ("HAR_MAX_UPLOAD_MB", "HAR_GRPC_MAX_MESSAGE_MB")
        )
        raise ValueError(
            f"HAR_MAX_UPLOAD_MB={upload_mb:g} does not fit in one request to the model server, "
            f"which accepts at most {message_mb:g} MiB "
            "(HAR_GRPC_MAX_MESSAGE_MB, har-serve's --max-message-bytes); lower "
            "HAR_MAX_UPLOAD_MB, or raise both limits"
        )
    if not float(config["HAR_GRPC_TIMEOUT_S"]) > 0:
        raise ValueError(f"HAR_GRPC_TIMEOUT_S must be > 0, got {config['HAR_GRPC_TIMEOUT_S']}")
    if int(config["HAR_TRUSTED_PROXIES"]) < 0:
        raise ValueError(f"HAR_TRUSTED_PROXIES must be >= 0, got {config['HAR_TRUSTED_PROXIES']}")
    for key in ("HAR_GRPC_CA_CERT", "HAR_GRPC_CLIENT_CERT", "HAR_GRPC_CLIENT_KEY"):
        path = config[key]
        if path and not os.path.isfile(path):
            raise ValueError(f"{key}={path!r}: no such file")
    tls_files = [k for k in ("HAR_GRPC_CA_CERT", "HAR_GRPC_CLIENT_CERT", "HAR_GRPC_SERVER_NAME")
                 if config[k]]  # fmt: skip
    if tls_files and not config["HAR_GRPC_TLS"]:
        # Otherwise the channel would quietly be plaintext and fail only at the first request.
        raise ValueError(f"{', '.join(tls_files)} set but HAR_GRPC_TLS is off; set HAR_GRPC_TLS=1")
    if bool(config["HAR_GRPC_CLIENT_CERT"]) != bool(config["HAR_GRPC_CLIENT_KEY"]):
        raise ValueError("HAR_GRPC_CLIENT_CERT and HAR_GRPC_CLIENT_KEY must be set together")
    token_file = config["HAR_GRPC_TOKEN_FILE"]
    if token_file and not os.path.isfile(token_file):
        raise ValueError(f"HAR_GRPC_TOKEN_FILE={token_file!r}: no such file")
