"""The har.v1.ActionRecognition servicer: translate messages, nothing more.

Predict is validate -> `predictor.prepare` (decode, in the handler thread) -> the batcher (or a
direct model call) -> reply. The model logic lives in har_flax.predictor; errors are built in
grpc_server.errors.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc

from grpc_server.batcher import (
    BatcherClosedError,
    CancelledError,
    DynamicBatcher,
    QueueFullError,
)
from grpc_server.errors import (
    RpcFailure,
    deadline_passed,
    handle_failures,
    invalid_argument,
    shutting_down,
    unavailable,
)
from grpc_server.interceptors import annotate, call_arrival
from har_flax.images import ImageError, ImageTooLargeError, PrepareCancelled
from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc


def model_info_proto(info: Any) -> har_pb2.ModelInfo:
    """har_flax.predictor.ModelInfo -> har.v1.ModelInfo."""
    return har_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        kind=info.kind,
        num_classes=info.num_classes,
        num_frames=info.num_frames,
        image_size=info.image_size,
    )


def image_failure(error: ImageError) -> RpcFailure:
    """An ImageError -> INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the field (and frame)."""
    field = error.field
    # google.rpc.BadRequest field paths address sub-fields with dots; a frame of an animated
    # image is not a proto field, so it is named in the description (and the message) instead.
    description = error.reason
    if error.frame is not None:
        description = f"frame {error.frame}: {description}"
    too_large = isinstance(error, ImageTooLargeError)
    return RpcFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED if too_large else grpc.StatusCode.INVALID_ARGUMENT,
        str(error),
        reason="IMAGE_TOO_LARGE" if too_large else "INVALID_IMAGE",
        violations=[(field, description)],
    )


class ActionRecognitionServicer(har_pb2_grpc.ActionRecognitionServicer):
    """Answers Health, Classes and Predict from a Predictor attached once it has warmed up.

    Until `attach` Health says NOT_SERVING and the others are UNAVAILABLE; after `drain` Health
    says NOT_SERVING (new Predict and Classes calls are refused as they arrive, by
    grpc_server.interceptors.AdmissionInterceptor: a call that arrived earlier and still waits
    for a handler thread must run when it gets one).

    Args:
      max_batch_size, max_wait_us, max_queue, model_threads: the batcher's settings.
      metrics: optional grpc_server.metrics.Metrics, also the batcher's observer.
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 32,
        max_wait_us: int = 2000,
        max_queue: int = 256,
        model_threads: int = 1,
        metrics: Any = None,
    ):
        self._batch_args = dict(
            max_batch_size=max_batch_size,
            max_wait_us=max_wait_us,
            max_queue=max_queue,
            workers=model_threads,
        )
        self._metrics = metrics
        self._lock = threading.Lock()
        self._predictor = None
        self._batcher: DynamicBatcher | None = None
        self._info: har_pb2.ModelInfo | None = None
        self._draining = False

    # Lifecycle (called by grpc_server.server).
    def attach(self, predictor: Any, batching: bool = True) -> None:
        """Starts answering with `predictor` (loaded and warmed up).

        Args:
          predictor: a har_flax.predictor.Predictor (or anything with its interface).
          batching: run Predict through a DynamicBatcher (True) or call the model directly in
            the handler thread (False).
        """
        batcher = None
        if batching:
            max_batch = min(self._batch_args["max_batch_size"], predictor.max_batch_size)
            batcher = DynamicBatcher(
                predictor.predict_samples,
                **{**self._batch_args, "max_batch_size": max_batch},
                observer=self._metrics,
            )
        with self._lock:
            self._predictor, self._batcher = predictor, batcher
            self._info = model_info_proto(predictor.info)

    def drain(self) -> None:
        """Health says NOT_SERVING from now on; Predict and Classes still answer."""
        with self._lock:
            self._draining = True

    def close(self, timeout: float | None = None) -> None:
        """Stops the batcher after running what it holds (call once the server has stopped)."""
        if self._batcher is not None:
            self._batcher.close(timeout)

    def _serving(self):
        with self._lock:
            if self._predictor is None:
                raise unavailable(
                    "the model is still loading; retry in a few seconds (watch grpc.health.v1 "
                    "for SERVING)",
                    reason="MODEL_LOADING",
                    retry_after_s=5.0,
                )
            return self._predictor, self._batcher, self._info

    # RPCs.
    @handle_failures
    def Health(self, request, context):
        with self._lock:
            serving = self._predictor is not None and not self._draining
            info = self._info
        status = har_pb2.HealthResponse.SERVING if serving else har_pb2.HealthResponse.NOT_SERVING
        return har_pb2.HealthResponse(status=status, model=info)

    @handle_failures
    def Classes(self, request, context):
        predictor, _, info = self._serving()
        return har_pb2.ClassesResponse(classes=list(predictor.classes), model=info)

    @handle_failures
    def Predict(self, request, context):
        arrived = call_arrival()  # latency_ms counts the wait for a handler thread too
        predictor, batcher, info = self._serving()
        num_classes = len(predictor.classes)
        images = list(request.images)
        annotate(images=len(images), bytes=sum(len(b) for b in images))
        if not images:
            raise invalid_argument(
                "images",
                "no images: send one encoded image (a still) or several (the frames of one "
                "sequence, in order)",
                reason="NO_IMAGES",
            )
        if not 0 <= request.top_k <= num_classes:
            raise invalid_argument(
                "top_k",
                f"{request.top_k} is out of range: use 1..{num_classes} for the best classes, "
                "or 0 for all of them",
                reason="BAD_TOP_K",
            )
        try:
            # A client that has gone (deadline, cancel) stops the decoding at the next frame.
            sample = predictor.prepare(images, cancelled=lambda: not context.is_active())
        except ImageError as e:
            raise image_failure(e) from None
        except PrepareCancelled:
            if self._metrics is not None:
                self._metrics.abandoned_at("decoding")
            raise _gone(context, "the server decoded the images") from None
        frames = int(sample.shape[0]) if getattr(sample, "ndim", 0) == 4 else 1
        annotate(frames=frames)

        if batcher is not None:
            scores, batch_size = self._predict_batched(batcher, sample, context)
        else:
            if not context.is_active():
                raise _gone(context)
            scores, batch_size = predictor.predict_samples([sample])[0], 1
            if self._metrics is not None:  # (the batcher reports its own model calls)
                self._metrics.batch(1)
        annotate(batch=batch_size)

        top = scores[: request.top_k] if request.top_k else scores
        best_class, best_prob = scores[0]
        return har_pb2.PredictResponse(
            action=best_class,
            confidence=float(best_prob),
            all_predictions=[
                har_pb2.Prediction(action=name, confidence=float(p)) for name, p in top
            ],
            model=info,
            latency_ms=(time.perf_counter() - arrived) * 1e3,
            num_frames=frames,
        )

    def _predict_batched(self, batcher, sample, context):
        remaining = context.time_remaining()
        # grpc reports "no deadline" as None or as a huge number, depending on the version.
        deadline = None
        if remaining is not None and remaining < 1e8:
            deadline = time.monotonic() + remaining
        try:
            ticket = batcher.submit(sample, deadline)
        except QueueFullError as e:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), reason="OVERLOADED", retry_after_s=0.5
            ) from None
        except BatcherClosedError:
            raise shutting_down() from None

        def on_done():
            # Runs when the call ends for any reason; a no-op once the ticket has its answer.
            batcher.cancel(ticket, "deadline" if deadline_passed(context) else "cancelled")

        if not context.add_callback(on_done):
            on_done()  # The call had already ended.
        try:
            scores = ticket.result()
        except CancelledError:
            raise _gone(context) from None
        except BatcherClosedError:
            raise unavailable("the server stopped before the model ran", "SHUTTING_DOWN") from None
        return scores, ticket.batch_size


def _gone(context, during: str = "the request waited for the model") -> RpcFailure:
    """The failure for a call that ended (deadline or cancel) before the model ran it."""
    if deadline_passed(context):
        return RpcFailure(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the deadline passed while {during}; allow more time or retry when the server is "
            "less busy",
            reason="DEADLINE_EXCEEDED",
        )
    return RpcFailure(grpc.StatusCode.CANCELLED, "the call was cancelled", reason="CANCELLED")
