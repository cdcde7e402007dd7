"""JSON API: POST /predict, GET /classes, GET /health, GET /metrics.

Thin: check the upload, call the model server through the gRPC client adapter, turn the reply
(or its error) into JSON. Error bodies are always `{"error": message, ...}` (see errors.py).
"""

from __future__ import annotations

import flask

from webui.grpc_client import ModelClient, ModelServerError

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


class BadUpload(Exception):
    """The HTTP request itself is unusable (no file, empty file, bad top_k): 400."""


@bp.errorhandler(BadUpload)
def _bad_upload(e: BadUpload):
    return flask.jsonify(error=str(e), code="BAD_REQUEST"), 400


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
        sent = sorted(flask.request.files) or "no files"
        raise BadUpload(
            "No photo received: send it as multipart/form-data in the field 'file' "
            f"(repeat the field for the frames of a sequence); got {sent}"
        )
    images = []
    for i, f in enumerate(files):
        data = f.read()
        if not data:
            name = f.filename or f"file #{i + 1}"
            raise BadUpload(f"{name!s} is empty (0 bytes); choose a JPEG, PNG, WebP, GIF or BMP")
        images.append(data)
    raw_top_k = flask.request.values.get("top_k", "0")
    try:
        top_k = int(raw_top_k)
        if top_k < 0:
            raise ValueError
    except ValueError:
        raise BadUpload(
            f"top_k must be a whole number >= 0 (0 = all classes), got {raw_top_k!r}"
        ) from None

    metrics = _metrics()
    metrics.upload_bytes.observe(sum(len(b) for b in images))
    metrics.frames.observe(len(images))
    return flask.jsonify(_call("Predict", client().predict, images, top_k=top_k))


@bp.get("/classes")
def classes():
    """The served model and its class names in output order: `{"classes": [...], "model"}`."""
    return flask.jsonify(_call("Classes", client().classes))


@bp.get("/health")
def health():
    """200 when the model server is SERVING, else 503; the body says which model or why not.

    Load balancers and systemd/k8s probes use this; it calls the model server's cheap Health
    RPC (never the model) with a short deadline.
    """
    try:
        answer = _call("Health", client().health)
    except ModelServerError as e:
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
