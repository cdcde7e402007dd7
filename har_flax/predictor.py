"""The Predictor: encoded images in, every class with its probability out, compiled once.

Loads a model directory (a trained CNN-LSTM or a ported ImageNet classifier) or the built-in
ImageNet default, compiles one XLA executable per batch bucket at start (warm-up) and never
compiles again: a batch is padded to the smallest bucket that holds it, a larger one is split.

Two schemes:

* sequence models (a CNN-LSTM with ``num_frames`` T > 1): a sample is ``(T, S, S, 3)``, the
  request's frames resampled to T; a batch row is a sample, so the executables take
  ``(bucket, T, S, S, 3)``.
* one-frame models (the ImageNet ``FrameClassifier``, and a CNN-LSTM trained on stills, T = 1):
  a sample keeps all its frames. The frames of all samples are flattened into the batch
  dimension (executables take ``(bucket, 1, S, S, 3)``), and each sample's per-frame logits are
  averaged on the host before the softmax, which is exactly ``FrameClassifier``'s mean over
  frames. So every photo of a request counts (resampling several to one would keep only the
  middle one), and a variable frame count never changes a compiled shape.

Thread safety: after :meth:`Predictor.load` the object holds no mutable state except the
executable cache, guarded by a lock; :meth:`prepare` (decode + resize, pure NumPy/Pillow) may run
in many request threads at once while one batcher thread calls :meth:`predict_samples`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from har_flax.checkpoint import LABELS_FILE, CheckpointError
from har_flax.images import (
    LOCAL_LIMITS,
    ImageLimits,
    ImageTooLargeError,
    InvalidImageError,
    PrepareCancelled,
    iter_frames,
    resize_frame,
)

log = logging.getLogger(__name__)

KINDS = ("action", "imagenet")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# A Predictor classifies its caller's own photos unless told otherwise: a server passes the
# limits for strangers' uploads (ImageLimits(), set by its flags).
DEFAULT_LIMITS = LOCAL_LIMITS
DEFAULT_MODEL_NAME = "imagenet-mobilenet-v2"
ACTION_MODEL_NAME = "har-cnn-lstm"

Prediction = list[tuple[str, float]]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What is being served (mirrors ``har.v1.ModelInfo``)."""

    name: str  # e.g. "har-cnn-lstm", "imagenet-mobilenet-v2".
    version: str  # labels.json "version", else a content hash of the model directory.
    kind: str  # "action" (human actions) or "imagenet" (the built-in object classifier).
    num_classes: int  # K.
    num_frames: int  # T per sample for action models; 1 for the per-frame ImageNet model.
    image_size: int  # S: frames are resized to S x S.


def frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """Uniform resampling of a sequence to a fixed length: which source frame fills each slot.

    Each of the ``num_frames`` output slots takes the source frame at the centre of its equal
    share of the sequence, so a longer sequence is subsampled evenly (8 -> 4 takes 1, 3, 5, 7)
    and a shorter one repeats frames in order (2 -> 4 takes 0, 0, 1, 1; a still fills all).

    Returns:
      int64 (num_frames,) indices into the source, non-decreasing.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_available} -> {num_frames}")
    centres = (np.arange(num_frames) + 0.5) * (num_available / num_frames)
    return np.minimum(centres.astype(np.int64), num_available - 1)


def ranked(probabilities: np.ndarray, classes: Sequence[str]) -> Prediction:
    """``(class, probability)`` for (K,) probabilities, most probable first; ties keep class
    order, so equal scores always come out the same way."""
    order = np.argsort(-probabilities, kind="stable")
    return [(classes[j], float(probabilities[j])) for j in order]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def content_version(config_json: str, classes: Sequence[str], variables: Any) -> str:
    """A short hash of what a model computes: its config, class names and every array.

    Hashes the arrays rather than the variables/ files, whose names and metadata orbax makes
    unique per save: the same weights saved twice get the same version.
    """
    h = hashlib.sha256(config_json.encode())
    h.update("\0".join(classes).encode() + b"\0")
    for path, leaf in sorted(
        ((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(variables)),
        key=lambda item: item[0],
    ):
        a = np.ascontiguousarray(leaf)
        h.update(f"{path}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


# The ported default is cached per process: porting the TFLite file takes a second or two, and a
# test session or a server restarting its Predictor should not pay it twice.
_DEFAULT_CACHE: dict[str, Any] = {}
_DEFAULT_LOCK = threading.Lock()


def _default_model() -> tuple[Any, dict, tuple[str, ...], ModelInfo]:
    from har_flax.models import FrameClassifier
    from har_flax.weights import BUNDLED_TFLITE, imagenet_labels, imagenet_model_config
    from har_flax.weights.tflite import port_tflite

    with _DEFAULT_LOCK:
        if "entry" not in _DEFAULT_CACHE:
            start = time.perf_counter()
            ported = port_tflite(BUNDLED_TFLITE)  # MobileNetV2(include_top, 1001), flat tree
            variables = {k: {"backbone": v} for k, v in ported.items()}  # FrameClassifier's
            classes = tuple(imagenet_labels())
            version = hashlib.sha256(Path(BUNDLED_TFLITE).read_bytes()).hexdigest()[:12]
            _DEFAULT_CACHE["entry"] = (variables, classes, version)
            log.info("ported the bundled ImageNet weights in %.1fs", time.perf_counter() - start)
        variables, classes, version = _DEFAULT_CACHE["entry"]
    mc = imagenet_model_config(len(classes)).model
    model = FrameClassifier(
        num_classes=len(classes), width=mc.width, depthwise_impl=mc.depthwise_impl
    )
    info = ModelInfo(
        name=DEFAULT_MODEL_NAME,
        version=version,
        kind="imagenet",
        num_classes=len(classes),
        num_frames=1,
        image_size=mc.image_size,
    )
    return model, variables, classes, info


def _directory_model(path: Path) -> tuple[Any, dict, tuple[str, ...], ModelInfo]:
    from har_flax.checkpoint import load_model
    from har_flax.models import FrameClassifier, create_model

    config, labels, variables = load_model(path)
    kind = labels.get("kind", "action")
    if kind not in KINDS:
        raise CheckpointError(f"{path / LABELS_FILE}: kind must be one of {KINDS}, got {kind!r}")
    mc = config.model
    if kind == "action":
        model = create_model(mc)
        num_frames = mc.num_frames
    else:
        model = FrameClassifier(
            num_classes=mc.num_classes,
            width=mc.width,
            depthwise_impl=mc.depthwise_impl,
            dtype=jnp.dtype(mc.dtype),
            param_dtype=jnp.dtype(mc.param_dtype),
        )
        num_frames = 1
        if "backbone" not in variables.get("params", {}):  # a bare MobileNetV2 tree
            variables = {k: {"backbone": v} for k, v in variables.items()}
    version = labels.get("version")
    if version is None:
        version = content_version(config.to_json(), labels["classes"], variables)
    default_name = ACTION_MODEL_NAME if kind == "action" else DEFAULT_MODEL_NAME
    info = ModelInfo(
        name=str(labels.get("name") or default_name),
        version=str(version),
        kind=kind,
        num_classes=mc.num_classes,
        num_frames=num_frames,
        image_size=mc.image_size,
    )
    return model, variables, tuple(labels["classes"]), info


def _check_variables(model, variables: dict, example: jax.ShapeDtypeStruct, where: str) -> None:
    """Raises CheckpointError unless ``variables`` has exactly the tree ``model`` declares."""
    declared = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(example.shape, example.dtype))
    )
    want = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(declared)}  # fmt: skip
    have = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(variables)}  # fmt: skip
    problems = [f"{k}: missing" for k in sorted(set(want) - set(have))]
    problems += [f"{k}: unexpected" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: shape {have[k]}, model needs {want[k]}"
                 for k in sorted(set(want) & set(have)) if have[k] != want[k]]  # fmt: skip
    if problems:
        more = f" ... ({len(problems)} in all)" if len(problems) > 8 else ""
        raise CheckpointError(
            f"{where}: the variables do not fit the model its config describes: "
            + "; ".join(problems[:8])
            + more
        )


def embeds_variables() -> bool:
    """Whether the Predictor compiles its variables into the executable (the default: on a CPU).

    The variables never change after loading, so XLA may treat them as constants and fold the
    BatchNorm arithmetic at compile time: 6.2 instead of 6.5 ms per image on the 2-core CPU of
    docs/BENCHMARKS.md. Not measured on accelerators, where they stay arguments.
    """
    return jax.default_backend() == "cpu"


def compile_forward(
    model: Any, variables: Any, rows: jax.ShapeDtypeStruct | jax.Array, *, embed: bool
) -> Any:
    """The inference forward, compiled ahead of time for exactly ``rows``' shape and dtype.

    Args:
      model: a Flax module taking ``(variables, rows, train=False)``.
      variables: its variables, already on the device.
      rows: the input's shape and dtype (an array or a ShapeDtypeStruct).
      embed: compile the variables in as constants (see :func:`embeds_variables`) instead of
        passing them on every call.

    Returns:
      ``f(rows) -> logits``; a stray shape is an error, never a silent recompile.
    """

    def forward(v, r):
        return model.apply(v, r, train=False)

    if embed:
        return jax.jit(lambda r: forward(variables, r)).lower(rows).compile()
    exe = jax.jit(forward).lower(variables, rows).compile()
    return lambda r: exe(variables, r)


class Predictor:
    """A loaded, compiled model. Build it with :meth:`Predictor.load`.

    Attributes:
      info: the :class:`ModelInfo`.
      classes: class names, index i = output i.
      limits: the :class:`~har_flax.images.ImageLimits` applied by :meth:`prepare`.
      max_batch_size: the largest bucket; bigger batches are split.
      batch_sizes: the buckets, ascending.
    """

    def __init__(
        self,
        *,
        model: Any,
        variables: dict,
        classes: Sequence[str],
        info: ModelInfo,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        limits: ImageLimits = DEFAULT_LIMITS,
        embed_variables: bool | None = None,
    ):
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
        if len(classes) != info.num_classes:
            raise ValueError(f"{len(classes)} class names for {info.num_classes} outputs")
        self.info = info
        self.classes = tuple(classes)
        self.limits = limits
        self.batch_sizes = tuple(sizes)
        self.max_batch_size = sizes[-1]
        self._model = model
        # One-frame models classify every frame and average (see the module docstring).
        self._per_frame = info.kind == "imagenet" or info.num_frames == 1
        # Rows of one executable call: (T, S, S, 3) samples, or (1, S, S, 3) single frames.
        t = 1 if self._per_frame else info.num_frames
        self._row_shape = (t, info.image_size, info.image_size, 3)
        # Transferred once; every call reuses these device buffers.
        self._variables = jax.device_put(
            {k: variables[k] for k in ("params", "batch_stats") if k in variables}
        )
        self._embed = embeds_variables() if embed_variables is None else bool(embed_variables)
        self._compiled: dict[int, Any] = {}
        self._compile_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike | None = None,
        *,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        limits: ImageLimits = DEFAULT_LIMITS,
        warmup: bool = True,
        embed_variables: bool | None = None,
    ) -> Predictor:
        """Loads a model and (with ``warmup``) compiles and runs every batch bucket once.

        Args:
          model_dir: a model directory (``har_flax.checkpoint``), or None for the built-in
            ImageNet classifier ported from the bundled TFLite file.
          batch_sizes: the buckets a batch is padded to.
          limits: decoding limits for :meth:`prepare`. The default, ``LOCAL_LIMITS`` (64 MiB,
            150 M pixels, 512 frames), suits your own photos; for bytes from strangers (a web
            service) pass ``ImageLimits()``, the server's defaults (16 MiB, 40 M pixels, 64).
          warmup: compile every bucket now. Without it a bucket compiles on first use (fine for
            a one-shot CLI; a server wants the cost at start, before it reports SERVING).
          embed_variables: compile the variables into the executables as constants; None =
            :func:`embeds_variables` (yes on a CPU).

        Raises:
          CheckpointError: the directory is missing, incomplete or does not fit its config.
        """
        start = time.perf_counter()
        if model_dir is None:
            model, variables, classes, info = _default_model()
            where = "the built-in ImageNet model"
        else:
            model, variables, classes, info = _directory_model(Path(model_dir))
            where = str(model_dir)
        t = 1 if info.kind == "imagenet" else info.num_frames
        example = jax.ShapeDtypeStruct((1, t, info.image_size, info.image_size, 3), jnp.uint8)
        _check_variables(model, variables, example, where)
        predictor = cls(
            model=model,
            variables=variables,
            classes=classes,
            info=info,
            batch_sizes=batch_sizes,
            limits=limits,
            embed_variables=embed_variables,
        )
        if warmup:
            predictor.warmup()
        log.info(
            "loaded %s %s (%s, %d classes) in %.1fs",
            info.name,
            info.version,
            info.kind,
            info.num_classes,
            time.perf_counter() - start,
        )
        return predictor

    # -- compilation ----------------------------------------------------------------------------

    def _executable(self, bucket: int):
        """The compiled forward pass for ``bucket`` rows, compiled on first request."""
        compiled = self._compiled.get(bucket)
        if compiled is not None:
            return compiled
        with self._compile_lock:
            if bucket not in self._compiled:
                start = time.perf_counter()
                rows = jax.ShapeDtypeStruct((bucket, *self._row_shape), jnp.uint8)
                self._compiled[bucket] = compile_forward(
                    self._model, self._variables, rows, embed=self._embed
                )  # (B, K) float32 logits
                log.info("compiled bucket %d in %.1fs", bucket, time.perf_counter() - start)
            return self._compiled[bucket]

    def warmup(self) -> None:
        """Compiles and runs every bucket once, so no request pays for it."""
        for bucket in self.batch_sizes:
            rows = np.zeros((bucket, *self._row_shape), np.uint8)
            jax.block_until_ready(self._executable(bucket)(rows))

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        """Runs (N, *row_shape) uint8 rows through the buckets; returns (N, K) float32 logits."""
        outputs = []
        # Dispatch every chunk before reading any result back, so the device never waits on the
        # host between chunks.
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            n = len(chunk)
            bucket = self._bucket(n)
            if bucket > n:  # pad with black rows; eval-mode BatchNorm keeps rows independent
                chunk = np.concatenate([chunk, np.zeros((bucket - n, *self._row_shape), np.uint8)])
            outputs.append((self._executable(bucket)(chunk), n))
        return np.concatenate([np.asarray(out)[:n] for out, n in outputs])  # (N, K)

    def _type_error(self, value: Any, where: str) -> TypeError:
        """What to pass instead, for a request that is not encoded image bytes."""
        kind = type(value).__name__
        s = self.info.image_size
        t = "T" if self._per_frame else str(self.info.num_frames)
        arrays = (
            f"For decoded RGB frames, resize each with har_flax.images.resize_frame(frame, {s}) "
            f"and pass [np.stack(frames)], uint8 ({t}, {s}, {s}, 3), to predict_samples()"
            + ("" if self._per_frame else f"; frame_indices(n, {t}) picks {t} of n frames")
        )
        if isinstance(value, np.ndarray):
            return TypeError(
                f"{where} is a decoded numpy array {value.dtype} {value.shape}, but prepare() "
                "takes encoded image files (the bytes of a JPEG, PNG, WebP, GIF or BMP). " + arrays
            )
        if type(value).__module__.startswith("PIL."):
            return TypeError(
                f"{where} is a PIL image, but prepare() takes encoded image files (the bytes of "
                "a JPEG, PNG, WebP, GIF or BMP): pass Path(p).read_bytes() of its file. "
                + arrays.replace("frame, ", "np.asarray(image.convert('RGB')), ", 1)
            )
        if isinstance(value, (str, os.PathLike)):
            what = "a path" if isinstance(value, os.PathLike) else "a str (a file path?)"
            return TypeError(
                f"{where} is {what}, but prepare() takes the contents of an image file: "
                "pass Path(p).read_bytes()"
            )
        if hasattr(value, "read"):
            return TypeError(
                f"{where} is an open file ({kind}), but prepare() takes the file's contents: "
                "pass f.read() (opened in binary mode)"
            )
        return TypeError(
            f"{where} is of type {kind}; prepare() takes encoded image bytes (one image) or a "
            "sequence of them (the frames of one request), e.g. [Path(p).read_bytes()]"
        )

    # -- the public API -------------------------------------------------------------------------

    def prepare(
        self, images: Sequence[bytes], *, cancelled: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """Decodes and resizes one request into the sample the model takes.

        One image is a still, several are the frames of one sequence in order, and an animated
        image counts as its frames. For a sequence model (``info.num_frames`` > 1) the frames
        are resampled uniformly to ``info.num_frames`` (:func:`frame_indices`); a one-frame model
        keeps them all, to classify each and average.

        Args:
          images: the encoded images of one request (a lone ``bytes`` counts as one image).
          cancelled: asked before each frame is decoded; True (say the caller's deadline has
            passed) stops the work with :class:`~har_flax.images.PrepareCancelled`.

        Returns:
          uint8 (T, S, S, 3): T = ``info.num_frames`` for a sequence model, the number of frames
          for a one-frame model; S = ``info.image_size``.

        Raises:
          InvalidImageError, ImageTooLargeError: with ``.field`` = ``"images[i]"`` (or
            ``"images"`` for the request as a whole) and ``.frame``.
          TypeError: ``images`` is not bytes or a sequence of bytes (a path, an open file, a
            decoded array); the message says what to pass instead.
          PrepareCancelled: ``cancelled()`` said so.
        """
        images = self._checked_images(images)
        return self._prepare(images, [f"images[{i}]" for i in range(len(images))], cancelled)

    def _checked_images(self, images: Any) -> Sequence[bytes]:
        """``images`` as a sequence of encoded images, or a TypeError saying what to pass."""
        encoded = (bytes, bytearray, memoryview)
        if isinstance(images, encoded):
            images = [images]
        # Checked first, so a wrong type is named as such: a str is a Sequence too, and a
        # decoded (300, 400, 3) array has a length, so it would be "300 images, over the limit".
        if isinstance(images, str) or not isinstance(images, Sequence):
            raise self._type_error(images, "images")
        for i, data in enumerate(images):
            if not isinstance(data, encoded):
                raise self._type_error(data, f"images[{i}]")
        return images

    def _prepare(
        self,
        images: Sequence[bytes],
        fields: Sequence[str],
        cancelled: Callable[[], bool] | None,
    ) -> np.ndarray:
        """:meth:`prepare` of checked ``images``, named ``fields`` in errors."""
        if len(images) == 0:
            raise InvalidImageError("no images in the request; send at least one", field="images")
        if len(images) > self.limits.max_frames:
            raise ImageTooLargeError(
                f"{len(images)} images is over the limit of {self.limits.max_frames} frames "
                "per request",
                field="images",
                limit="max_frames",
            )
        size = self.info.image_size
        budget = [self.limits.max_frames, self.limits.max_total_pixels]
        frames = []
        for data, field in zip(images, fields, strict=True):
            if cancelled is not None and cancelled():
                raise PrepareCancelled(f"cancelled after {len(frames)} frames")
            # Resize each frame as soon as it is decoded: only one full-size frame is in memory.
            for frame in iter_frames(data, limits=self.limits, field=field, budget=budget):
                frames.append(resize_frame(frame, size))
                if cancelled is not None and cancelled():
                    raise PrepareCancelled(f"cancelled after {len(frames)} frames")
        sample = np.stack(frames)  # (N, S, S, 3)
        if not self._per_frame and len(sample) != self.info.num_frames:
            sample = sample[frame_indices(len(sample), self.info.num_frames)]  # (T, S, S, 3)
        return sample

    def predict_samples(self, samples: Sequence[np.ndarray]) -> list[Prediction]:
        """Classifies prepared samples in as few compiled calls as the buckets allow.

        Args:
          samples: outputs of :meth:`prepare`, each uint8 (T, S, S, 3).

        Returns:
          One list per sample of ``(class, probability)`` for every class, most probable first
          (ties in class order); probabilities sum to 1.
        """
        if len(samples) == 0:  # a stacked numpy batch has no truth value
            return []
        t, s = self.info.num_frames, self.info.image_size
        arrays = [np.asarray(sample) for sample in samples]
        counts = []
        for i, sample in enumerate(arrays):
            ok = (
                sample.dtype == np.uint8
                and sample.ndim == 4
                and sample.shape[1:] == (s, s, 3)
                and len(sample) >= 1
                and (self._per_frame or len(sample) == t)
            )
            if not ok:
                want = f"(T, {s}, {s}, 3)" if self._per_frame else f"({t}, {s}, {s}, 3)"
                raise ValueError(
                    f"sample {i} is {sample.dtype} {sample.shape}; expected uint8 {want} as "
                    "prepare() returns"
                )
            counts.append(len(sample))
        if self._per_frame:
            rows = np.concatenate(arrays)[:, None]  # (sum T_i, 1, S, S, 3)
            logits = self._logits(rows)  # (sum T_i, K)
            starts = np.cumsum([0, *counts[:-1]])
            logits = np.stack(  # FrameClassifier's mean over frames, per sample: (B, K)
                [logits[a : a + c].mean(axis=0, dtype=np.float64)
                 for a, c in zip(starts, counts, strict=True)]
            )  # fmt: skip
        else:
            logits = self._logits(np.stack(arrays))  # (B, K)
        return [ranked(p, self.classes) for p in _softmax(logits)]

    def predict(self, images: Sequence[bytes]) -> Prediction:
        """Classifies one request: :meth:`prepare` then :meth:`predict_samples`.

        Several images are one request: the frames of one sequence (a one-frame model classifies
        each and averages), so one answer. For one answer per photo, :meth:`predict_each`.

        Returns:
          ``(class, probability)`` for every class, most probable first.
        """
        return self.predict_samples([self.prepare(images)])[0]

    def predict_each(self, images: Sequence[bytes]) -> list[Prediction]:
        """Classifies each image on its own (a batch of photos), in as few compiled calls as
        the buckets allow.

        Args:
          images: encoded images, one request each (an animated one is its own sequence).

        Returns:
          One answer per image, in order, each as :meth:`predict` gives it.

        Raises:
          InvalidImageError, ImageTooLargeError: naming the image (``images[i]``) at fault.
          TypeError: as :meth:`prepare`.
        """
        images = self._checked_images(images)
        samples = [self._prepare([data], [f"images[{i}]"], None) for i, data in enumerate(images)]
        return self.predict_samples(samples)
