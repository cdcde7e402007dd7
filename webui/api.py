"""JSON API: POST /predict, GET /classes, GET /health, GET /metrics.

Thin: check the upload, call the model server through the gRPC client adapter, turn the reply
(or its error) into JSON. Error bodies are always `{"error": message, ...}` (see errors.py).
"""

from __future__ import annotations

import re

import flask
from werkzeug.exceptions import RequestEntityTooLarge

from webui import settings
from webui.grpc_client import MISCONFIGURED, ModelClient, ModelServerError

bp = flask.Blueprint("api", __name__)

#: Paths served by this blueprint: their errors are always JSON, whatever the client accepts.
API_PATHS = ("/predict", "/classes", "/health", "/metrics")


def client() -> ModelClient:
    return flask.current_app.extensions["har_client"]


def _metrics():
    return flask.current_app.extensions["har_metrics"]


def _call(rpc: str, fn, *args, **kwargs):
    """Runs one client call and counts it by gRPC status code."""
    try:
        result = fn(*args, **kwargs)
    except ModelServerError as e:
        _metrics().grpc_calls.labels(rpc, e.code).inc()
        raise
    _metrics().grpc_calls.labels(rpc, "OK").inc()
    return result


class UploadTooLarge(RequestEntityTooLarge):
    """The files together are over the upload limit (413); the body has been read already."""


class BadUpload(Exception):
    """The HTTP request itself is unusable (no file, empty file, bad top_k): 400."""


@bp.errorhandler(BadUpload)
def _bad_upload(e: BadUpload):
    return flask.jsonify(error=str(e), code="BAD_REQUEST"), 400


#: PredictRequest.top_k is an int32: a larger number cannot even be sent (the model server
#: refuses more than its number of classes, saying how many it has).
_TOP_K_MAX = 2**31 - 1

# The model server names an image by its place in the request ("images[1]: truncated ...").
_IMAGE_FIELD = re.compile(r"\bimages\[(\d+)\]")


def _name_files(e: ModelServerError, names: list[str]) -> None:
    """Rewrites `images[i]` in the error as the uploaded file's name (and 1-based frame)."""

    def label(i: int) -> str | None:
        if i >= len(names):
            return None
        if len(names) == 1:
            return names[0] or "the photo"
        return f"{names[i]} (frame {i + 1})" if names[i] else f"frame {i + 1}"

    def replace(match: re.Match) -> str:
        return label(int(match.group(1))) or match.group(0)

    e.message = _IMAGE_FIELD.sub(replace, e.message)
    for violation in e.violations:
        field = _IMAGE_FIELD.fullmatch(violation.get("field", ""))
        if field and int(field.group(1)) < len(names) and names[int(field.group(1))]:
            violation["file"] = names[int(field.group(1))]


@bp.post("/predict")
def predict():
    """Classifies the uploaded photo, or the uploaded frames as one sequence.

    Request: multipart/form-data, field `file` once (a still image, or an animated GIF/WebP
    whose frames form the sequence) or repeated (the frames in order); optional `top_k`
    (form field or query parameter, 0 = every class, the default).

    Returns:
      200 `{"action", "confidence", "all_predictions": [{"action", "confidence"}...],
      "model": {...}, "latency_ms", "num_frames"}`; errors as in the module docstring of
      webui.grpc_client.
    """
    files = flask.request.files.getlist("file")  # raises 413 past MAX_CONTENT_LENGTH
    if not files:
        if "file" in flask.request.form:  # curl -F file=<photo.jpg: the bytes as text
            raise BadUpload(
                "The field 'file' came as text, without a file name: send the photo as a file "
                "(with curl: -F file=@photo.jpg, not file=<photo.jpg)"
            )
        sent = sorted(flask.request.files) or "no files"
        raise BadUpload(
            "No photo received: send it as multipart/form-data in the field 'file' "
            f"(repeat the field for the frames of a sequence); got {sent}"
        )
    images = []
    limit, total = settings.max_upload_bytes(flask.current_app.config), 0
    for i, f in enumerate(files):
        data = f.read()
        if not data:
            name = f.filename or f"file #{i + 1}"
            raise BadUpload(f"{name!s} is empty (0 bytes); choose a JPEG, PNG, WebP, GIF or BMP")
        total += len(data)
        if total > limit:
            # MAX_CONTENT_LENGTH leaves room for the form's framing; the files get the limit.
            raise UploadTooLarge()
        images.append(data)
    raw_top_k = flask.request.values.get("top_k", "0")
    try:
        top_k = int(raw_top_k)
        if not 0 <= top_k <= _TOP_K_MAX:
            raise ValueError
    except ValueError:
        raise BadUpload(
            "top_k must be a whole number from 0 to the number of classes (0 = all classes), "
            f"got {raw_top_k!r}"
        ) from None

    metrics = _metrics()
    metrics.upload_bytes.observe(sum(len(b) for b in images))
    metrics.frames.observe(len(images))
    try:
        return flask.jsonify(_call("Predict", client().predict, images, top_k=top_k))
    except ModelServerError as e:
        _name_files(e, [f.filename or "" for f in files])
        raise


@bp.get("/classes")
def classes():
    """The served model and its class names in output order: `{"classes": [...], "model"}`."""
    return flask.jsonify(_call("Classes", client().classes))


@bp.get("/health")
def health():
    """200 when the model server is SERVING, else 503; the body says which model or why not.

    Load balancers and systemd/k8s probes use this; it calls the model server's cheap Health
    RPC (never the model) with a short deadline, and Classes (also cheap, but it needs the
    token) until the server has accepted the web UI's credentials once since the last refusal:
    a web UI the server refuses is not healthy, whatever Health says.
    """
    model_client = client()
    try:
        answer = _call("Health", model_client.health)
        if answer["status"] == "SERVING" and model_client.credentials_ok is not True:
            _call("Classes", model_client.classes)
    except ModelServerError as e:
        if e.credentials_rejected:
            return flask.jsonify(status="misconfigured", error=MISCONFIGURED, code=e.code), 503
        return flask.jsonify(status="unavailable", error=e.message, code=e.code), 503
    ok = answer["status"] == "SERVING"
    body = {"status": "ok" if ok else "unavailable", "model_server": answer["status"]}
    body["model"] = answer["model"]
    if not ok:
        body["error"] = f"The model server is {answer['status']} (loading or shutting down)"
    return flask.jsonify(body), 200 if ok else 503


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition of the web UI's metrics."""
    data, content_type = _metrics().exposition()
    return flask.Response(data, content_type=content_type)
