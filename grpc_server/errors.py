"""Failures as gRPC statuses with rich details (google.rpc.Status via grpcio-status).

Every error a client sees is built here: a standard code, a message a person can act on, an
`ErrorInfo` with a stable machine-readable reason, and where it helps a `BadRequest` naming the
field (and frame) at fault or a `RetryInfo`. Never a stack trace.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

DOMAIN = "har.v1"

# gRPC ends a call at its deadline by its own timer, which fires a little early for
# `time_remaining()`: read in the call's callback or right after, it was still 2-3 ms above 0
# on a busy 2-core machine, and such calls were logged, counted and answered as cancelled by
# the client. A call that ends this close to its deadline ended by it.
DEADLINE_SLACK_S = 0.05


def deadline_passed(context: grpc.ServicerContext) -> bool:
    """Whether the call's deadline has passed (within DEADLINE_SLACK_S): why an ended call ended,
    as opposed to a client's cancel. False for a call without a deadline."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


class RpcFailure(Exception):
    """An expected failure, turned into a status by `handle_failures`.

    Args:
      code: the gRPC status code.
      message: what happened and what to do about it, for a person.
      reason: a stable UPPER_SNAKE_CASE reason for programs (ErrorInfo.reason).
      violations: (field, description) pairs for a google.rpc.BadRequest detail.
      retry_after_s: when set, a google.rpc.RetryInfo detail with this delay.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        """The grpc.Status carrying the google.rpc.Status with its details."""
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        details.append(info)
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for d in details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        status = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=packed
        )
        return rpc_status.to_status(status)


# grpc.StatusCode.X.value is (number, name); google.rpc.Code uses the same numbers.
_CODE_NUMBERS = {c: c.value[0] for c in grpc.StatusCode}
assert _CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] == code_pb2.INVALID_ARGUMENT


def invalid_argument(field: str, description: str, reason: str = "INVALID_ARGUMENT"):
    """An INVALID_ARGUMENT failure naming one field."""
    return RpcFailure(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field}: {description}",
        reason=reason,
        violations=[(field, description)],
    )


def unavailable(message: str, reason: str, retry_after_s: float = 1.0) -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE, message, reason=reason, retry_after_s=retry_after_s
    )


def shutting_down() -> RpcFailure:
    """A call the server will not run because it is shutting down: the client retries, and
    another replica answers."""
    return unavailable(
        "the server is shutting down; retry and another replica will answer",
        reason="SHUTTING_DOWN",
    )


def abort(context: grpc.ServicerContext, failure: RpcFailure):
    """Ends the call with `failure` (raises, as `context.abort_with_status` does)."""
    context.abort_with_status(failure.to_status())


def handle_failures(method: Callable) -> Callable:
    """Decorates a servicer method: RpcFailure -> its status; anything else -> INTERNAL.

    The unexpected case is logged with its traceback under a short id, and the client gets only
    the id, so a bug never leaks internals but can still be found in the log.
    """
    # Imported when a method is decorated, not on every call; not at the top: interceptors
    # imports this module.
    from grpc_server.interceptors import annotate  # noqa: PLC0415

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except RpcFailure as failure:
            annotate(reason=failure.reason)  # for the access log and har_grpc_refusals_total
            abort(context, failure)
        except Exception as e:
            # context.abort raises a plain Exception after setting the status; let it through.
            if context.code() not in (None, grpc.StatusCode.OK):
                raise
            error_id = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s: %s", error_id, method.__name__, e)
            annotate(reason="INTERNAL", error_id=error_id)
            abort(
                context,
                RpcFailure(
                    grpc.StatusCode.INTERNAL,
                    f"internal server error (id {error_id}); the operator can find it in the "
                    "server log",
                    reason="INTERNAL",
                ),
            )

    return wrapper
