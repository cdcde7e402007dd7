"""The web UI's only way to the model: a har.v1 gRPC client that returns plain dicts.

One long-lived channel per process, created on first use. gunicorn forks workers after
`create_app()` runs (with `preload_app`), and a gRPC channel must not cross a fork, so the
channel is keyed by process id and rebuilt in a child that finds its parent's.

gRPC status → HTTP status (the body is always JSON `{"error": message, "code": NAME, ...}`):

| gRPC                | HTTP | why                                                           |
| ------------------- | ---- | ------------------------------------------------------------- |
| INVALID_ARGUMENT    | 400  | the upload is not a usable image / frame sequence             |
| RESOURCE_EXHAUSTED  | 413  | the *request* is too big (see below)                          |
| RESOURCE_EXHAUSTED  | 429  | the model server rate-limits the web UI (RATE_LIMITED)        |
| RESOURCE_EXHAUSTED  | 503  | the model server is overloaded (see below)                    |
| UNAVAILABLE         | 503  | model not loaded yet, server down or shutting down            |
| DEADLINE_EXCEEDED   | 504  | no answer within HAR_GRPC_TIMEOUT_S                           |
| UNAUTHENTICATED,    | 502  | the web UI's own credentials (HAR_GRPC_TOKEN, client          |
| PERMISSION_DENIED   |      | certificate) are wrong: the operator's problem, not the user's|
| anything else       | 502  | the model server failed                                       |

RESOURCE_EXHAUSTED means different things, told apart by the status details grpc_server sends
(google.rpc.Status in the `grpc-status-details-bin` trailer):
- 413 for ErrorInfo reason IMAGE_TOO_LARGE or MESSAGE_TOO_LARGE, or a google.rpc.BadRequest (the
  field at fault): too many bytes, pixels or frames. Resending the same upload cannot succeed.
- 429 for reason RATE_LIMITED or QUOTA_EXCEEDED, 503 for OVERLOADED: the same upload will work
  later. RetryInfo becomes the Retry-After header.
- With no ErrorInfo, gRPC core's own "Received/Sent message larger than max (N vs. LIMIT)" is a
  413 that names the limit; anything else ("Concurrent RPC limit exceeded!" from a server's
  maximum_concurrent_rpcs) is overload: 503 with a Retry-After.

Messages meant for people pass through only when the model server wrote them (a status with
details, as grpc_server always sends, or INVALID_ARGUMENT). gRPC core's own texts ("failed to
connect to all addresses; last error: ... ipv4:10.0.0.5:50051 ...") and the server address are
logged on the `webui.grpc_client` logger and replaced by a plain sentence.
The JSON body carries the gRPC code, the ErrorInfo reason and any BadRequest violations.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

log = logging.getLogger(__name__)

# Health and Classes never run the model; a short deadline keeps /health honest for probes.
_CHEAP_RPC_TIMEOUT_S = 5.0

# gRPC core's own size check: "Received message larger than max (17825800 vs. 16777216)" on
# the server, "Sent message larger than max (...)" on our side of the channel.
_CORE_TOO_BIG = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)", re.IGNORECASE)
# "... accepts at most 1.0 MiB (1048576 bytes, --max-message-bytes) ..." from grpc_server.
_LIMIT_BYTES = re.compile(r"at most [^(]*\((\d+) bytes", re.IGNORECASE)
_SIZE_REASONS = {"IMAGE_TOO_LARGE", "TOO_LARGE", "TOO_MANY_FRAMES", "MESSAGE_TOO_LARGE"}
_MESSAGE_SIZE_REASONS = {"MESSAGE_TOO_LARGE"}
_RATE_REASONS = {"RATE_LIMITED", "QUOTA_EXCEEDED"}
# Without a RetryInfo, how long an overloaded server is given before a retry (Retry-After).
DEFAULT_RETRY_AFTER_S = 1.0
# How soon the channel retries a server that is down. gRPC's default backoff grows to 120 s,
# so the UI would keep answering 503 for up to two minutes after the server is back.
_RECONNECT_BACKOFF_MS = {"initial": 500, "min": 500, "max": 2_000}


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine ("127.0.0.1:50051", "localhost:50051",
    "[::1]:50051", "dns:///localhost:50051", "ipv4:127.0.0.1:50051"), or a Unix socket."""
    if target.startswith("unix"):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :].split(",")[0]
            break
    if target.startswith("["):
        host = target[1:].partition("]")[0]
    else:
        host = target.rpartition(":")[0] if target.count(":") == 1 else target
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_CREDENTIAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_MIB = 1024 * 1024

MISCONFIGURED = "The web UI is misconfigured: the model server rejected its credentials"


class ModelServerError(Exception):
    """A failed gRPC call, already translated to what the HTTP API answers.

    Attributes:
      http_status: the HTTP status code to answer with.
      code: the gRPC status code name, e.g. "INVALID_ARGUMENT".
      message: what to tell the person (never the server address or gRPC core's text).
      reason: the google.rpc.ErrorInfo reason, e.g. "IMAGE_TOO_LARGE" ("" when none).
      violations: google.rpc.BadRequest field violations as [{"field", "description"}].
      retry_after_s: how long to wait before retrying (RetryInfo), or None.
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

    @property
    def credentials_rejected(self) -> bool:
        """The model server refused the web UI itself (token or client certificate)."""
        return self.code in {c.name for c in _CREDENTIAL_CODES}

    def retry_after_header(self) -> str | None:
        """The Retry-After value (whole seconds, at least 1) for a 429/503, else None."""
        if self.http_status not in (429, 503) or self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

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


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f}".removesuffix(".0") + " MiB"


def _too_big_message(limit_bytes: int | None) -> str:
    limit = f" ({_mib(limit_bytes)})" if limit_bytes else ""
    return (
        f"The upload is larger than the model server accepts{limit}; "
        "send a smaller photo or fewer frames"
    )


def _resource_exhausted(message: str, details: _Details) -> tuple[int, str, float | None]:
    """(HTTP status, message for people, retry-after) of a RESOURCE_EXHAUSTED."""
    reason = details.reason
    if reason in _MESSAGE_SIZE_REASONS:
        limit = _LIMIT_BYTES.search(message)
        return 413, _too_big_message(int(limit.group(1)) if limit else None), None
    if reason in _SIZE_REASONS or (not reason and "BadRequest" in details.types):
        return 413, message or _too_big_message(None), None
    if reason in _RATE_REASONS or (not reason and "QuotaFailure" in details.types):
        text = message or "The model server is rate-limiting this web UI"
        return 429, text, details.retry_after_s
    if not details.types:
        core = _CORE_TOO_BIG.search(message)
        if core:
            return 413, _too_big_message(int(core.group(2))), None
    # OVERLOADED, any other reason, or a bare RESOURCE_EXHAUSTED such as gRPC core's
    # "Concurrent RPC limit exceeded!": the server is busy, the same upload will work later.
    # Its message speaks of its own settings (queue sizes, threads): logged, not shown.
    retry = details.retry_after_s if details.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
    return 503, "The model server is busy right now; try again in a moment", retry


class TroubleLog:
    """Logs each kind of trouble with the model server at most once per ``every_s`` seconds.

    An outage under load fails every request; a line for each (600 in 30 s, seen in a soak
    test) buries when it began and when it ended. The next line of a kind says how many like
    it were left out, and the first answer after an outage says that it ended. One per
    :class:`ModelClient`, so per worker process.
    """

    def __init__(self, every_s: float = 30.0, clock: Any = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[str, list] = {}  # kind -> [time of its last line, left out since]
        self._outage: list | None = None  # [start time, failed calls] while unreachable

    def log(self, level: int, kind: str, message: str, *args: Any, outage: bool = False) -> None:
        now = self.clock()
        with self._lock:
            if outage:
                self._outage = self._outage or [now, 0]
                self._outage[1] += 1
            last = self._kinds.get(kind)
            if last is not None and now - last[0] < self.every_s:
                last[1] += 1
                return
            left_out = last[1] if last is not None else 0
            self._kinds[kind] = [now, 0]
        if left_out:
            message += " (and %d more like this since the last such line)"
            args = (*args, left_out)
        log.log(level, message, *args)

    def answered(self, target: str) -> None:
        """A call got an answer: an outage, if there was one, is over."""
        if self._outage is None:  # the usual case, without taking the lock
            return
        with self._lock:
            outage, self._outage = self._outage, None
            self._kinds.pop("unavailable", None)
        if outage is not None:
            log.warning(
                "the model server at %s answers again, after %.0f s and %d failed calls",
                target,
                self.clock() - outage[0],
                outage[1],
            )


def translate_error(
    err: grpc.RpcError, target: str, trouble: TroubleLog | None = None
) -> ModelServerError:
    """Maps a failed call to the HTTP status and JSON body the API answers with.

    What only the operator can use (the server address, gRPC core's text, a rejected
    credential) is logged here, not returned.

    Args:
      err: the exception raised by a stub call (also a grpc.Call).
      target: the server address, for the log.
      trouble: where the lines go, each kind at most once per interval (default: every line).

    Returns:
      The ModelServerError to raise (see the module docstring for the mapping).
    """
    say = (trouble or TroubleLog(every_s=0)).log
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    raw = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    details = _rich_details(err)
    # A status with details was written by the model server for people; without them the text
    # is gRPC core's (or a foreign server's internals), so it goes to the log only.
    from_server = bool(details.types) or code == grpc.StatusCode.INVALID_ARGUMENT
    http_status = _HTTP_STATUS.get(code, 502)
    retry_after_s = details.retry_after_s
    message = raw if from_server else ""

    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        http_status, message, retry_after_s = _resource_exhausted(raw, details)
        if http_status == 413 and (details.reason in _MESSAGE_SIZE_REASONS or not details.types):
            say(
                logging.WARNING,
                "too large",
                "the model server at %s refused a request as too large: %s; keep "
                "HAR_MAX_UPLOAD_MB below its --max-message-bytes",
                target,
                raw,
            )
        elif http_status == 503:
            say(logging.WARNING, "overloaded", "the model server at %s is overloaded: %s", target,
                raw)  # fmt: skip
    elif code in _CREDENTIAL_CODES:
        say(
            logging.ERROR,
            "credentials",
            "the model server at %s rejected the web UI's credentials (%s: %s); check "
            "HAR_GRPC_TOKEN / HAR_GRPC_TOKEN_FILE against its --auth-token, and the client "
            "certificate",
            target,
            code.name,
            raw,
        )
        message = MISCONFIGURED + "; the operator must fix the web UI's settings (see its log)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        if not from_server:
            say(logging.WARNING, "unavailable", "the model server at %s is unavailable: %s",
                target, raw, outage=True)  # fmt: skip
            message = "The model server is not reachable right now; try again in a moment"
        message = message or "The model server is unavailable; try again in a moment"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        say(logging.WARNING, "deadline", "the model server at %s did not answer in time: %s",
            target, raw)  # fmt: skip
        message = "The model server did not answer in time; try again later"
    elif not message:
        say(logging.WARNING, code.name, "the model server at %s failed with %s: %s", target,
            code.name, raw)  # fmt: skip
        message = f"The model server failed ({code.name}); try again later"
    return ModelServerError(
        http_status,
        code.name,
        message,
        reason=details.reason,
        violations=details.violations,
        retry_after_s=retry_after_s,
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
        # Whether the server accepted our credentials on the last authenticated call (None:
        # not known yet). /health checks them (with Classes) while this is not True.
        self.credentials_ok: bool | None = None
        self.trouble = TroubleLog()

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
            *((f"grpc.{k}_reconnect_backoff_ms", v) for k, v in _RECONNECT_BACKOFF_MS.items()),
        ]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        if is_loopback(self.target):
            # http_proxy/https_proxy/grpc_proxy without no_proxy for loopback would send our
            # calls to the proxy, which cannot reach this machine's 127.0.0.1 (`make serve`
            # behind a corporate proxy). Other targets keep the proxy, as deployments need.
            options.append(("grpc.enable_http_proxy", 0))
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
            reply = getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            error = translate_error(err, self.target, self.trouble)
            if error.credentials_rejected:
                self.credentials_ok = False
            raise error from None
        self.trouble.answered(self.target)
        if method != "Health":  # the only call that needs no token
            self.credentials_ok = True
        return reply

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
