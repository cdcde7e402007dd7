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
    # Largest request body accepted, MiB (all files of one upload together). Keep nginx's
    # client_max_body_size a little above it so the app, not nginx, answers most 413s.
    "HAR_MAX_UPLOAD_MB": 10.0,
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


def validate(config: Mapping[str, Any]) -> None:
    """Checks values that would otherwise fail late (at the first request) with a vague error.

    Raises:
      ValueError: naming the setting and what is wrong with it.
    """
    if not str(config["HAR_GRPC_TARGET"]).strip():
        raise ValueError("HAR_GRPC_TARGET is empty; set it to the gRPC server's host:port")
    if not float(config["HAR_MAX_UPLOAD_MB"]) > 0:
        raise ValueError(f"HAR_MAX_UPLOAD_MB must be > 0, got {config['HAR_MAX_UPLOAD_MB']}")
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
