"""The har-flax web UI: a Flask app that talks to the model only over gRPC (never JAX).

Production: `gunicorn -c deploy/gunicorn.conf.py 'webui:create_app()'`; development:
`har-webui --grpc-target HOST:PORT`. Settings come from `HAR_*` environment variables
(webui/settings.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.middleware.proxy_fix import ProxyFix

from webui import api, errors, metrics, pages, security, settings
from webui.grpc_client import ModelClient

__all__ = ["create_app"]


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _make_client(config: Mapping[str, Any]) -> ModelClient:
    token = config["HAR_GRPC_TOKEN"]
    if config["HAR_GRPC_TOKEN_FILE"]:
        token = Path(config["HAR_GRPC_TOKEN_FILE"]).read_text().strip()
    return ModelClient(
        config["HAR_GRPC_TARGET"],
        tls=bool(config["HAR_GRPC_TLS"]),
        root_certificates=_read(config["HAR_GRPC_CA_CERT"]),
        certificate_chain=_read(config["HAR_GRPC_CLIENT_CERT"]),
        private_key=_read(config["HAR_GRPC_CLIENT_KEY"]),
        server_name=config["HAR_GRPC_SERVER_NAME"],
        token=token,
        timeout_s=float(config["HAR_GRPC_TIMEOUT_S"]),
        # What the model server accepts (settings.validate checked that an upload fits).
        max_send_bytes=settings.max_message_bytes(config),
    )


def _init_limiter(app: flask.Flask) -> Limiter:
    """Per-client rate limits: a default for every route, a stricter one for /predict."""
    app.config.setdefault("RATELIMIT_ENABLED", bool(app.config["HAR_RATE_LIMIT_ENABLED"]))
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["HAR_RATE_LIMIT_STORAGE"])
    # Off: flask-limiter would put its own Retry-After on every response (200s included) and
    # overwrite the model server's RetryInfo on 429/503. errors.py sets Retry-After instead:
    # the model server's on its errors, the limiter's window on the limiter's own 429.
    app.config["RATELIMIT_HEADERS_ENABLED"] = False
    limiter = Limiter(
        get_remote_address,
        app=app,
        default_limits=[lambda: app.config["HAR_RATE_LIMIT_DEFAULT"]],
    )
    views = app.view_functions
    # Probes and scrapers poll these; limiting them would turn monitoring into outages.
    for endpoint in ("api.health", "api.metrics", "static"):
        limiter.exempt(views[endpoint])
    views["api.predict"] = limiter.limit(
        lambda: app.config["HAR_RATE_LIMIT_PREDICT"], override_defaults=True
    )(views["api.predict"])
    return limiter


def create_app(test_config: Mapping[str, Any] | None = None) -> flask.Flask:
    """Builds the web UI app.

    Args:
      test_config: settings that win over the environment (same keys as
        webui.settings.DEFAULTS, plus any Flask config key).

    Returns:
      The Flask app. No connection is made here: the gRPC channel opens on the first request,
      in the process that serves it (so gunicorn may fork after this).

    Raises:
      ValueError: a setting is invalid (the message names it).
    """
    app = flask.Flask(__name__)
    app.config.from_mapping(settings.from_environ())
    if test_config:
        app.config.from_mapping(test_config)
    settings.validate(app.config)
    # The body may exceed the upload limit by the multipart framing; api.predict checks the
    # files themselves against the limit, to the byte.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes(app.config)
    app.json.sort_keys = False  # keep "action" first, as DESIGN.md shows

    proxies = int(app.config["HAR_TRUSTED_PROXIES"])
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies)

    app.extensions["har_client"] = _make_client(app.config)
    metrics.init_app(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.extensions["har_limiter"] = _init_limiter(app)
    errors.init_app(app)
    security.init_app(app)
    return app
