"""The web UI's only way to the model: a har.v1 gRPC client that returns plain dicts.

One long-lived channel per process, created on first use. gunicorn forks workers after
`create_app()` runs (with `preload_app`), and a gRPC channel must not cross a fork, so the
channel is keyed by process id and rebuilt in a child that finds its parent's.

gRPC status → HTTP status (the body is always JSON `{"error": message, "code": NAME, ...}`):

| gRPC                | HTTP | why                                                           |
| ------------------- | ---- | ------------------------------------------------------------- |
| INVALID_ARGUMENT    | 400  | the upload is not a usable image / frame sequence             |
| UNAUTHENTICATED     | 401  | the web UI's token (HAR_GRPC_TOKEN) is missing or wrong        |
| PERMISSION_DENIED   | 403  |                                                               |
| RESOURCE_EXHAUSTED  | 413  | the *request* is too big (see below)                         |
| RESOURCE_EXHAUSTED  | 429  | the *server* is overloaded or rate-limits the web UI         |
| UNAVAILABLE         | 503  | model not loaded yet, server down or shutting down           |
| DEADLINE_EXCEEDED   | 504  | no answer within HAR_GRPC_TIMEOUT_S                           |
| anything else       | 502  | the model server failed; its message is passed on             |

RESOURCE_EXHAUSTED means two different things, told apart by the status details grpc_server
sends (google.rpc.Status in the `grpc-status-details-bin` trailer):
- 413 when the details carry a google.rpc.BadRequest (the field at fault) or ErrorInfo reason
  IMAGE_TOO_LARGE: too many bytes, pixels or frames. Resending the same upload cannot succeed.
- 429 when they carry RetryInfo or QuotaFailure, or ErrorInfo reason OVERLOADED (queue full) or
  RATE_LIMITED: the same upload will work later; RetryInfo becomes a Retry-After header.
- With no details at all (gRPC's own "Received message larger than max" check, or a server
  in another language), a message naming a size (bytes, pixels, frames, "larger than",
  "too large/many") means 413, anything else 429.
The JSON body carries the gRPC code, the ErrorInfo reason and any BadRequest violations.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

# Health and Classes never run the model; a short deadline keeps /health honest for probes.
_CHEAP_RPC_TIMEOUT_S = 5.0

# How a RESOURCE_EXHAUSTED message that carries no structured details says "too big".
_TOO_BIG = re.compile(
    r"too (large|big|many)|larger than|exceed|\b(bytes|pixels|frames)\b", re.IGNORECASE
)
_SIZE_REASONS = {"IMAGE_TOO_LARGE", "TOO_LARGE", "TOO_MANY_FRAMES", "MESSAGE_TOO_LARGE"}
_LOAD_REASONS = {"OVERLOADED", "RATE_LIMITED", "QUOTA_EXCEEDED"}

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class ModelServerError(Exception):
    """A failed gRPC call, already translated to what the HTTP API answers.

    Attributes:
      http_status: the HTTP status code to answer with.
      code: the gRPC status code name, e.g. "INVALID_ARGUMENT".
      message: the server's message (meant for people).
      reason: the google.rpc.ErrorInfo reason, e.g. "IMAGE_TOO_LARGE" ("" when none).
      violations: google.rpc.BadRequest field violations as [{"field", "description"}].
      retry_after_s: the google.rpc.RetryInfo delay, or None.
    """

    def __init__(
        self,
        http_status: int,
        code: str,
        message: str,
        *,
        reason: str = "",
        violations: list[dict] | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.reason = reason
        self.violations = violations or []
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, Any]:
        """The HTTP body: {"error": message, "code": NAME[, "reason"][, "violations"]}."""
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.reason:
            body["reason"] = self.reason
        if self.violations:
            body["violations"] = self.violations
        return body


@dataclasses.dataclass
class _Details:
    """What the google.rpc.Status details of a failed call say."""

    types: set[str] = dataclasses.field(default_factory=set)
    reason: str = ""
    violations: list[dict] = dataclasses.field(default_factory=list)
    retry_after_s: float | None = None


def translate_error(err: grpc.RpcError, target: str) -> ModelServerError:
    """Maps a failed call to the HTTP status and JSON body the API answers with.

    Args:
      err: the exception raised by a stub call (also a grpc.Call).
      target: the server address, named in messages about an unreachable server.

    Returns:
      The ModelServerError to raise (see the module docstring for the mapping).
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    details = _rich_details(err)

    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "BadRequest" in details.types or details.reason in _SIZE_REASONS:
            http_status = 413
        elif details.types & {"RetryInfo", "QuotaFailure"} or details.reason in _LOAD_REASONS:
            http_status = 429
        else:
            http_status = 413 if _TOO_BIG.search(message) else 429
    else:
        http_status = _HTTP_STATUS.get(code, 502)

    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"The model server at {target} is unavailable: {message or 'no reason given'}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"The model server at {target} did not answer in time; try again later"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        message = (
            f"The model server rejected the web UI's credentials ({message}); "
            "check HAR_GRPC_TOKEN against the server's --auth-token"
        )
    elif not message:
        message = f"The model server failed with {code.name}"
    return ModelServerError(
        http_status,
        code.name,
        message,
        reason=details.reason,
        violations=details.violations,
        retry_after_s=details.retry_after_s,
    )


def _rich_details(err: grpc.RpcError) -> _Details:
    """Unpacks the google.rpc.Status details a server attached to a failed call."""
    out = _Details()
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        # A status whose trailer disagrees with the call's code or message: ignore the details.
        return out
    if status is None:
        return out
    for detail in status.details:
        name = detail.TypeName().rsplit(".", 1)[-1]
        out.types.add(name)
        if name == "BadRequest":
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.violations += [
                {"field": v.field, "description": v.description} for v in bad.field_violations
            ]
        elif name == "ErrorInfo":
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason = info.reason
        elif name == "RetryInfo":
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return out


def model_info(model: har_pb2.ModelInfo) -> dict[str, Any]:
    """ModelInfo as the JSON the API returns."""
    return {
        "name": model.name,
        "version": model.version,
        "kind": model.kind,
        "num_classes": model.num_classes,
        "num_frames": model.num_frames,
        "image_size": model.image_size,
    }


class ModelClient:
    """A har.v1 ActionRecognition client over one lazily created, per-process channel.

    Args:
      target: "host:port" of the gRPC server.
      tls: use a TLS channel.
      root_certificates, private_key, certificate_chain: PEM bytes for TLS (None = defaults;
        key and chain for mutual TLS).
      server_name: overrides the name checked in the server's certificate.
      token: bearer token sent as `authorization` metadata on every call.
      timeout_s: deadline of Predict calls.
      max_send_bytes: largest request message the channel will send.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str = "",
        token: str = "",
        timeout_s: float = 30.0,
        max_send_bytes: int = 64 * 1024 * 1024,
    ):
        self.target = target
        self._tls = tls
        self._creds = (root_certificates, private_key, certificate_chain)
        self._server_name = server_name
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self._max_send_bytes = max_send_bytes
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: har_pb2_grpc.ActionRecognitionStub | None = None

    def _get_stub(self) -> har_pb2_grpc.ActionRecognitionStub:
        with self._lock:
            if self._stub is None or self._pid != os.getpid():
                # A channel inherited from the parent process is unusable after fork; drop it
                # without closing (closing would touch the parent's sockets).
                self._channel = self._open_channel()
                self._stub = har_pb2_grpc.ActionRecognitionStub(self._channel)
                self._pid = os.getpid()
            return self._stub

    def _open_channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_send_message_length", self._max_send_bytes),
            # Detect a dead server behind a load balancer instead of hanging on a half-open TCP.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        if self._tls:
            root, key, chain = self._creds
            creds = grpc.ssl_channel_credentials(root, key, chain)
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def close(self) -> None:
        """Closes this process's channel (a later call opens a new one)."""
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel = self._stub = None

    def _call(self, method: str, request, timeout: float):
        stub = self._get_stub()
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise translate_error(err, self.target) from None

    def health(self) -> dict[str, Any]:
        """The har.v1 Health answer: {"status": "SERVING"|..., "model": {...}}.

        Raises:
          ModelServerError: the server cannot be reached or refused the call.
        """
        reply = self._call("Health", har_pb2.HealthRequest(), _CHEAP_RPC_TIMEOUT_S)
        return {
            "status": har_pb2.HealthResponse.ServingStatus.Name(reply.status),
            "model": model_info(reply.model),
        }

    def classes(self) -> dict[str, Any]:
        """The served classes in model output order: {"classes": [...], "model": {...}}.

        Raises:
          ModelServerError: as for health().
        """
        reply = self._call("Classes", har_pb2.ClassesRequest(), _CHEAP_RPC_TIMEOUT_S)
        return {"classes": list(reply.classes), "model": model_info(reply.model)}

    def predict(self, images: Sequence[bytes], top_k: int = 0) -> dict[str, Any]:
        """Classifies one still image or one frame sequence.

        Args:
          images: encoded images (JPEG/PNG/WebP/GIF/BMP); one = a still, several = frames of
            one sequence in order; an animated GIF/WebP counts as its frames.
          top_k: number of classes in all_predictions, best first; 0 = all.

        Returns:
          {"action", "confidence", "all_predictions": [{"action", "confidence"}, ...],
           "model": {...}, "latency_ms", "num_frames"}.

        Raises:
          ModelServerError: INVALID_ARGUMENT (bad image) → 400, too large → 413, ... (see the
            module docstring).
        """
        request = har_pb2.PredictRequest(images=list(images), top_k=top_k)
        reply = self._call("Predict", request, self.timeout_s)
        return {
            "action": reply.action,
            "confidence": _round(reply.confidence),
            "all_predictions": [
                {"action": p.action, "confidence": _round(p.confidence)}
                for p in reply.all_predictions
            ],
            "model": model_info(reply.model),
            "latency_ms": _round(reply.latency_ms, 3),
            "num_frames": reply.num_frames,
        }


def _round(x: float, digits: int = 6) -> float:
    # float32 on the wire: 0.92 arrives as 0.9200000166893005; round for readable JSON.
    return round(float(x), digits)
