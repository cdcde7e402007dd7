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
    if isinstance(e, FormTooLarge):
        request = flask.request
        return (
            f"Upload refused: more than {request.max_form_parts:,} parts in the form, or a "
            f"form field that is not a file over {request.max_form_memory_size:,} bytes. Send "
            f"at most {_MODEL_SERVER_MAX_FRAMES} frames (the model server's default "
            "--max-frames), each as a file in the field 'file' "
            "(with curl: -F file=@photo.jpg, not file=<photo.jpg)"
        )
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


class FormTooLarge(RequestEntityTooLarge):
    """The form is over werkzeug's limits (MAX_FORM_PARTS parts, MAX_FORM_MEMORY_SIZE bytes in a
    field that is not a file) while its body is within MAX_CONTENT_LENGTH: 413."""


#: The model server's default --max-frames (har_flax.images.Limits): named in FormTooLarge.
_MODEL_SERVER_MAX_FRAMES = 64

# Oversized bodies up to this multiple of the limit are read and discarded before the 413 goes
# out. Without that the server closes the socket while the client is still sending, and the
# client (or nginx, as a 502) sees a reset instead of the JSON. Bigger bodies are not worth it.
_DRAIN_FACTOR = 4
_CHUNK = 1 << 16


def _refine_413(e: RequestEntityTooLarge) -> RequestEntityTooLarge:
    """Says which limit a werkzeug 413 is about, and reads the unread rest of the body.

    werkzeug raises the same 413 for a Content-Length over MAX_CONTENT_LENGTH (refused from
    the header, nothing read yet) and for a form over its part or field limits (found while
    parsing, the body read part of the way). Only the bytes the client is still sending may be
    read: reading Content-Length bytes again would wait forever on the development server.
    """
    request = flask.request
    length, limit = request.content_length, request.max_content_length
    if length is None or limit is None or length > limit:
        # Over the limit (or chunked, and past it): the message about the size is right.
        if length is not None and limit is not None and length <= _DRAIN_FACTOR * limit:
            _drain(request.environ["wsgi.input"], length)
        return e
    # Within the limit: the form parser stopped. request.stream is the stream it read from,
    # bounded by Content-Length, so reading it to its end reads exactly what is left.
    _drain(request.stream, length)
    return FormTooLarge()


def _drain(stream, most: int) -> None:
    """Reads and discards up to `most` bytes, until the stream ends or the client goes."""
    try:
        while most > 0:
            chunk = stream.read(min(_CHUNK, most))
            if not chunk:
                break
            most -= len(chunk)
    except (OSError, HTTPException):
        pass  # the client gave up (werkzeug's ClientDisconnected): nothing left to protect


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
            e = _refine_413(e)
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
