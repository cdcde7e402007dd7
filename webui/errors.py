"""Error responses: JSON `{"error": ...}` for the API, never an HTML page or a traceback there.

Browsers that ask for a page at an unknown URL get a small HTML page instead; everything under
API_PATHS, and every client that does not prefer HTML, gets JSON.
"""

from __future__ import annotations

import math
import time

import flask
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, TooManyRequests

from webui.api import API_PATHS, UploadTooLarge
from webui.grpc_client import ModelServerError


def _wants_json() -> bool:
    request = flask.request
    if request.path in API_PATHS or request.blueprint == "api":
        return True
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best != "text/html"


def _message(e: HTTPException) -> str:
    """A message a person can act on, per status code."""
    app = flask.current_app
    if isinstance(e, RequestEntityTooLarge):
        limit_mb = app.config["HAR_MAX_UPLOAD_MB"]
        return (
            f"Upload too large: the limit is {limit_mb:g} MiB for all files together; "
            "send a smaller photo or fewer frames"
        )
    if isinstance(e, TooManyRequests):
        return (
            f"Too many requests from your address (limit: {e.description}); "
            "wait a moment and try again"
        )
    if e.code == 404:
        return (
            f"Not found: {flask.request.path} (the API has /predict, /classes, /health, /metrics)"
        )
    if e.code == 405:
        allowed = ", ".join(sorted(e.valid_methods or [])) if hasattr(e, "valid_methods") else ""
        return f"Method {flask.request.method} not allowed on {flask.request.path}" + (
            f"; use {allowed}" if allowed else ""
        )
    return e.description or e.name


# Oversized bodies up to this multiple of the limit are read and discarded before the 413 goes
# out. Without that the server closes the socket while the client is still sending, and the
# client (or nginx, as a 502) sees a reset instead of the JSON. Bigger bodies are not worth it.
_DRAIN_FACTOR = 4
_CHUNK = 1 << 16


def _drain_body() -> None:
    environ = flask.request.environ
    length = flask.request.content_length or 0
    if not length or length > _DRAIN_FACTOR * (flask.current_app.config["MAX_CONTENT_LENGTH"] or 0):
        return
    stream = environ["wsgi.input"]
    remaining = length
    try:
        while remaining > 0:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
    except OSError:
        pass  # the client gave up; nothing left to protect


def _limiter_retry_after(app: flask.Flask) -> str | None:
    """Seconds until the breached flask-limiter window resets (the limiter's own 429)."""
    limiter = app.extensions.get("har_limiter")
    limit = limiter.current_limit if limiter is not None else None
    if limit is None:
        return None
    return str(max(1, math.ceil(limit.reset_at - time.time())))


def init_app(app: flask.Flask) -> None:
    """Registers the app-wide error handlers."""

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if isinstance(e, RequestEntityTooLarge) and not isinstance(e, UploadTooLarge):
            _drain_body()
        message = _message(e)
        if _wants_json():
            response = flask.jsonify(error=message, code=e.name.upper().replace(" ", "_"))
        else:
            response = flask.make_response(
                flask.render_template("error.html", status=e.code, title=e.name, message=message)
            )
        response.status_code = e.code or 500
        # Keep the headers werkzeug computed (Allow on a 405).
        for name, value in e.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        if isinstance(e, TooManyRequests) and "Retry-After" not in response.headers:
            retry = _limiter_retry_after(app)
            if retry is not None:
                response.headers["Retry-After"] = retry
        return response

    @app.errorhandler(ModelServerError)
    def _model_server_error(e: ModelServerError):
        response = flask.jsonify(e.to_json())
        response.status_code = e.http_status
        # The model server's RetryInfo, as it is: nothing else sets Retry-After (the limiter's
        # header injection is off, see webui/__init__.py).
        retry = e.retry_after_header()
        if retry is not None:
            response.headers["Retry-After"] = retry
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        # Log the traceback for the operator; the client only learns that it failed.
        app.logger.exception("Unhandled error on %s %s", flask.request.method, flask.request.path)
        return flask.jsonify(
            error="Internal error in the web UI; the server log has the details", code="INTERNAL"
        ), 500
