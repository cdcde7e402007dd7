"""Image decoding for uploads and training data: bytes -> RGB uint8 frames, and the one resize.

Survives what real clients send (EXIF-rotated phone photos, transparency, CMYK, 16-bit
grayscale, 1-bit, animated GIF/WebP) and refuses what would hurt a server (empty, truncated or
non-image bytes, decompression bombs, too many frames) with an :class:`ImageError` that names the
request field and frame at fault. Pure Pillow + NumPy: no JAX, so it imports in milliseconds.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image

# What the API accepts (protos/har/v1/har.proto). The JPEG opener also returns "MPO" for the
# multi-picture JPEGs many phones write (the photo plus previews or depth maps); only its first
# picture, the photo, is used.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF or BMP"
# Formats whose extra frames are an animation. Others (MPO previews) only contribute frame 0.
ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")

_MIB = 1024 * 1024
# Pixels per block when converting a frame to RGB: the integer temporaries stay a few MB however
# large the frame is (at full size they cost more than the frame itself).
_BLOCK_PIXELS = 1 << 20

# Pillow warns (DecompressionBombWarning) about any image over about 89 M pixels, just before our
# own header check refuses it with a clear error, so every such request printed a warning to
# stderr or the server log. The warning adds nothing here: every frame's size is checked against
# ImageLimits.max_pixels right after open() and after each seek(), and Pillow's own error above
# about 179 M pixels is still raised (and translated). warnings.catch_warnings() would scope the
# silence to our calls, but it swaps the process-wide filter list and is not thread-safe, while
# the server decodes in many threads at once. So one filter, installed at import, for this one
# category and only as warned by Pillow. Callers that turn warnings into errors still get an
# ImageTooLargeError (_decode_error).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")

# EXIF Orientation -> the transpose that makes the image upright (the table in
# PIL.ImageOps.exif_transpose; applied per frame here because converted frames lose their EXIF).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def human_bytes(n: int) -> str:
    """A byte count for people: '12.3 MiB', '512 KiB'."""
    return f"{n / _MIB:.1f} MiB" if n >= _MIB else f"{n / 1024:.0f} KiB"


def pillow_max_pixels() -> int | None:
    """The most pixels per frame Pillow opens (2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 M).

    Above it Pillow raises DecompressionBombError whatever :class:`ImageLimits` says, so a
    ``max_pixels`` above it cannot take effect. None where a program turned the guard off.
    """
    ceiling = Image.MAX_IMAGE_PIXELS
    return None if ceiling is None else 2 * int(ceiling)


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What one request may cost to decode. Each limit fails with a clear :class:`ImageError`."""

    max_bytes: int = 16 * _MIB  # Encoded size of one image.
    # Width x height of one frame, checked from the header. (Pillow's own guard refuses above
    # pillow_max_pixels(), about 179 M, whatever this says; its refusal names that limit.)
    max_pixels: int = 40_000_000
    max_frames: int = 64  # Frames in one request (all images, animated ones counted per frame).
    min_side: int = 8  # Smallest width or height worth classifying.
    # Decoded pixels of one request summed over all frames: an animated GIF of 64 frames at the
    # per-frame limit is a few MB on disk but billions of pixels to decode.
    max_total_pixels: int = 128_000_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(
                    f"ImageLimits.{f.name} must be positive, got {getattr(self, f.name)}"
                )
        if self.max_total_pixels < self.max_pixels:
            raise ValueError(
                f"ImageLimits.max_total_pixels ({self.max_total_pixels:,}) must be at least "
                f"max_pixels ({self.max_pixels:,}): a request must fit one frame at the limit"
            )


class PrepareCancelled(Exception):
    """Decoding stopped because its caller no longer wants the answer (its client has gone)."""


class ImageError(ValueError):
    """An image in a request cannot be used. ``str(e)`` is a message a person can act on.

    Attributes:
      field: the request field at fault, e.g. ``"images[2]"``.
      frame: the frame index inside that image (animated images), or None.
      reason: the message without the field prefix.
    """

    def __init__(self, reason: str, *, field: str, frame: int | None = None):
        where = field if frame is None else f"{field} frame {frame}"
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.field = field
        self.frame = frame


class InvalidImageError(ImageError):
    """Not a usable image: empty, truncated, not an image at all, too small, unsupported."""


class ImageTooLargeError(ImageError):
    """Over a limit: too many bytes, pixels or frames.

    Attributes:
      limit: the :class:`ImageLimits` field exceeded (``"max_pixels"``, ...), or None for
        Pillow's own decompression-bomb refusal, which no limit raises.
    """

    def __init__(
        self, reason: str, *, field: str, frame: int | None = None, limit: str | None = None
    ):
        super().__init__(reason, field=field, frame=frame)
        self.limit = limit


def _describe_non_image(data: bytes) -> str:
    """A guess at what non-image bytes are, so the error says more than 'cannot identify'."""
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return "a HEIC/HEIF photo, which is not supported (export it as JPEG)"
    if head[4:12] == b"ftypavif":
        return "an AVIF image, which is not supported (export it as JPEG or PNG)"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image, which is not supported (convert it to PNG)"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<svg", b"<?xml")):
        return "an XML/SVG document (vector images are not supported; export a PNG)"
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary data in no known image format"


def _row_blocks(height: int, width: int) -> Iterator[tuple[int, int]]:
    """(top, bottom) row ranges of about _BLOCK_PIXELS pixels each, covering ``height`` rows."""
    rows = max(1, _BLOCK_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, min(top + rows, height)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 (H, W, 3); transparency composited over white.

    Works on blocks of rows cropped from the image, so decoding costs the Pillow image plus the
    (H, W, 3) result, not full-size converted copies and uint16/int64 temporaries (those made an
    RGBA or 16-bit frame cost about 30 bytes per pixel). Every step is per pixel, so the blocks
    give exactly what the whole frame would.
    """
    mode = im.mode
    width, height = im.size
    if mode == "F":
        # Floating point: [0, 1] if it looks normalised, else already on the 8-bit scale.
        # (No accepted format decodes to F, so this keeps the simple whole-frame form.)
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    wide = mode.startswith("I;16") or mode == "I"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.info.get("transparency") is not None
    )
    out = np.empty((height, width, 3), np.uint8)
    for top, bottom in _row_blocks(height, width):
        block = im.crop((0, top, width, bottom))
        if wide:
            # 16-bit samples: map [0, 65535] to [0, 255]. (Pillow's own convert("L") clips at
            # 255, which turns any ordinary 16-bit photo white.)
            a = np.asarray(block).astype(np.int64)  # (h, W)
            a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
            out[top:bottom] = a[..., None]  # grey into all three channels
            continue
        # RGBA and LA are composited as they are: LA's grey composited once equals each of the
        # equal channels that converting it to RGBA would make.
        if has_alpha and mode not in ("RGBA", "LA"):
            try:
                block = block.convert("RGBA")  # also applies palette / colour-key transparency
            except ValueError:
                has_alpha = False  # a mode whose transparency Pillow cannot express; ignore it
        if not has_alpha:
            if block.mode != "RGB":
                # L, 1, P, CMYK, YCbCr, ...: Pillow's conversions are exact for these.
                block = block.convert("RGB")
            out[top:bottom] = np.asarray(block, dtype=np.uint8)
            continue
        a = np.asarray(block, dtype=np.uint16)  # (h, W, 4) or (h, W, 2)
        alpha = a[..., -1:]
        # Over white, rounded; at most 255 * 255 + 127, so uint16 cannot overflow.
        out[top:bottom] = (a[..., :-1] * alpha + 255 * (255 - alpha) + 127) // 255
    return out


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag (1 = upright); a corrupt EXIF block counts as upright."""
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # Pillow raises many types on malformed EXIF; never fail a photo for it.
        return 1


def _decode_error(
    e: Exception, what: str, *, field: str, frame: int | None, limits: ImageLimits
) -> ImageError:
    """The :class:`ImageError` for an exception Pillow raised while reading an image.

    Hostile or damaged files make Pillow raise nearly anything (OSError, SyntaxError, EOFError,
    ValueError, IndexError, struct.error, TypeError, ...), from open(), n_frames, seek() or
    load(); every one of them means "this file cannot be decoded". Pillow's decompression-bomb
    guard, raised at open() or when seeking to a frame that claims a huge canvas, is "too large".
    """
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        whom = "the image" if frame is None else "the frame"
        # Pillow's words hold the count: "Image size (400000000 pixels) exceeds limit of ...".
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        how_many = f"{int(claimed[1]):,} pixels" if claimed else "so many pixels"
        # The limit that refused it is Pillow's when that is lower than ours (a max_pixels above
        # Pillow's ceiling); naming ours then would say "N pixels (limit M)" with N < M. The
        # warning arrives as an exception only where a caller turned warnings into errors, and
        # Pillow warns from half its error ceiling.
        limit = limits.max_pixels
        ceiling = pillow_max_pixels()
        if ceiling is not None:
            if isinstance(e, Image.DecompressionBombWarning):
                ceiling //= 2
            limit = min(limit, ceiling)
        return ImageTooLargeError(
            f"{whom} claims {how_many}, so many that decoding it would exhaust memory (limit "
            f"{limit:,} pixels); downscale it first",
            field=field,
            frame=frame,
        )
    detail = str(e) or type(e).__name__
    return InvalidImageError(f"{what} ({detail})", field=field, frame=frame)


def iter_frames(
    data: bytes, *, limits: ImageLimits = ImageLimits(), field: str = "images[0]", budget=None
) -> Iterator[np.ndarray]:
    """Decodes ``data`` lazily, one frame at a time (see :func:`decode_frames`).

    Every limit that the header can answer (bytes, pixels, frames) is checked before any pixel
    is decoded. ``budget`` is an optional ``[frames_left, pixels_left]`` list shared by the
    images of one request and decremented in place.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{field}: expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidImageError("empty: no image bytes were sent", field=field)
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"{len(data):,} bytes ({human_bytes(len(data))}) is over the limit of "
            f"{limits.max_bytes:,} bytes ({human_bytes(limits.max_bytes)}) per image; send a "
            "smaller or more compressed image",
            limit="max_bytes",
            field=field,
        )
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidImageError(
            f"{_describe_non_image(data)}, not an image har-flax can read; "
            f"send {ACCEPTED_FORMATS_TEXT}",
            field=field,
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # see _decode_error; MemoryError is the server's problem, not the file's
        raise _decode_error(
            e, "corrupt or truncated image header", field=field, frame=None, limits=limits
        ) from None

    with im:
        fmt = im.format or "?"
        try:
            n_frames = int(getattr(im, "n_frames", 1)) if fmt in ANIMATED_FORMATS else 1
        except MemoryError:
            raise
        except Exception as e:
            # Counting parses every frame header (GIF): the one after the last good one is bad.
            raise _decode_error(
                e, f"corrupt {fmt} animation", field=field, frame=im.tell() + 1, limits=limits
            ) from None
        # An APNG whose IDAT precedes its first fcTL has a "default image" for viewers without
        # APNG support, which the APNG spec excludes from the animation; Pillow counts it as
        # frame 0. An animation with no frame besides it (invalid) keeps it as a still.
        first = 1 if fmt == "PNG" and n_frames > 1 and im.info.get("default_image") else 0
        n_frames -= first
        width, height = im.size
        if width * height > limits.max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} is {width * height:,} pixels, over the limit of "
                f"{limits.max_pixels:,} per frame; downscale it first",
                limit="max_pixels",
                field=field,
            )
        if min(width, height) < limits.min_side:
            raise InvalidImageError(
                f"{width}x{height} pixels is too small to classify; both sides must be at "
                f"least {limits.min_side} pixels",
                field=field,
            )
        if budget is None:
            budget = [limits.max_frames, limits.max_total_pixels]
        # Earlier images of the same request have used part of the budget already.
        earlier = limits.max_frames - budget[0]
        these = f"{n_frames} frame{'s' * (n_frames != 1)}" + (
            f" after {earlier} earlier one{'s' * (earlier != 1)}" if earlier else ""
        )
        if n_frames > budget[0]:
            raise ImageTooLargeError(
                f"{these} is over the limit of {limits.max_frames} frames per request",
                limit="max_frames",
                field=field,
            )
        if n_frames * width * height > budget[1]:
            raise ImageTooLargeError(
                f"{these} of {width}x{height} pixels is over the limit of "
                f"{limits.max_total_pixels:,} decoded pixels per request",
                limit="max_total_pixels",
                field=field,
            )
        budget[0] -= n_frames
        budget[1] -= n_frames * width * height

        transpose = None
        for index in range(n_frames):
            frame = index if n_frames > 1 else None
            try:
                if index + first:
                    im.seek(index + first)
                # Frames of one file share the canvas, except that a GIF frame reaching past it
                # makes Pillow enlarge it (for this frame and the rest). Browsers clip such a
                # frame to the canvas, and so do we, once the enlarged canvas Pillow is about
                # to allocate is known to be within the per-frame limit.
                w, h = im.size
                if (w, h) != (width, height):
                    if w * h > limits.max_pixels:
                        raise ImageTooLargeError(
                            f"the frame reaches past the {width}x{height} canvas to {w}x{h}, "
                            f"{w * h:,} pixels to decode, over the limit of "
                            f"{limits.max_pixels:,} per frame; re-export the animation so its "
                            "frames fit its canvas",
                            limit="max_pixels",
                            field=field,
                            frame=frame,
                        )
                    if w < width or h < height:
                        raise InvalidImageError(
                            f"the frame is {w}x{h}, smaller than the image's {width}x{height} "
                            "canvas; re-export the animation",
                            field=field,
                            frame=frame,
                        )
                im.load()
                if index == 0:
                    # Read after load: PNG may carry its eXIf chunk after the pixel data.
                    transpose = _ORIENTATION_TRANSPOSE.get(_orientation(im))
                rgb = _to_rgb(im if (w, h) == (width, height) else im.crop((0, 0, width, height)))
            except (ImageError, MemoryError):
                raise
            except Exception as e:  # see _decode_error
                raise _decode_error(
                    e,
                    f"truncated or corrupt {fmt} data, cannot decode it",
                    field=field,
                    frame=frame,
                    limits=limits,
                ) from None
            if transpose is not None:
                rgb = np.asarray(Image.fromarray(rgb).transpose(transpose))
            yield np.ascontiguousarray(rgb)


# A data set's own files (training, exploring) are the user's, not strangers' uploads: limits
# far above the server's, just under Pillow's own refusal at about 179 M pixels per frame.
FILE_LIMITS = ImageLimits(
    max_bytes=1 << 30, max_pixels=178_000_000, max_frames=1 << 20, max_total_pixels=1 << 50
)
# Photos a person classifies themselves (har-predict, a Predictor from Python): a 50-megapixel
# phone photo and a few hundred frames pass. A server's uploads come from strangers and keep
# ImageLimits()' lower defaults, set by its flags.
LOCAL_LIMITS = ImageLimits(
    max_bytes=64 * _MIB, max_pixels=150_000_000, max_frames=512, max_total_pixels=150_000_000 * 512
)


def first_frame_of_file(data: bytes, field: str) -> np.ndarray:
    """The first frame of an image file of a data set, decoded under :data:`FILE_LIMITS`.

    An animated file in a still-image data set stands for its first frame.

    Raises:
      ImageError: not a decodable image (``field`` names the file).
    """
    if not data:
        raise InvalidImageError("the file is empty (0 bytes)", field=field)
    return next(iter_frames(data, limits=FILE_LIMITS, field=field))


def decode_frames(
    data: bytes, *, limits: ImageLimits = ImageLimits(), field: str = "images[0]"
) -> list[np.ndarray]:
    """Decodes one encoded image (JPEG, PNG, WebP, GIF, BMP) into upright RGB frames.

    EXIF orientation is applied; transparency (RGBA, LA, palette or colour-key) is composited
    over white; CMYK, grayscale, 16-bit grayscale (scaled, not clipped) and 1-bit become RGB.
    An animated GIF/WebP/PNG gives all its frames, each the full composited canvas (an APNG's
    fallback default image is not one of them; a GIF frame reaching past the canvas is clipped
    to it, as browsers do).

    Args:
      data: the encoded file.
      limits: size limits; pixels and frames are checked from the header before decoding.
      field: the request field named in errors, e.g. ``"images[2]"``.

    Returns:
      A list of RGB uint8 arrays, each (H, W, 3); one element for a still image.

    Raises:
      InvalidImageError: empty, truncated, not an image, too small, unsupported.
      ImageTooLargeError: over ``limits.max_bytes``, ``max_pixels``, ``max_frames`` or
        ``max_total_pixels``.
    """
    return list(iter_frames(data, limits=limits, field=field))


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Resizes one RGB frame to (size, size, 3): the one resize used everywhere.

    A direct resize to the square (no crop, aspect ratio not kept), like the Keras
    ``image_dataset_from_directory`` / TFLite reference pipelines the weights were trained and
    evaluated with, so the whole subject is always seen. Pillow's bilinear filter, which widens
    its kernel when shrinking (antialiasing), so large photos do not alias. Training data and the
    Predictor both call this function, so served inputs match trained ones exactly.

    Args:
      frame: uint8 (H, W, 3), RGB (an OpenCV frame is BGR: ``frame[..., ::-1]`` first).
      size: output side S.

    Returns:
      uint8 (S, S, 3).

    Raises:
      ValueError: not a uint8 (H, W, 3) array, or an empty one.
    """
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
    if 0 in frame.shape:  # Pillow would make a black frame of it, and the model would answer
        h, w = frame.shape[:2]
        raise ValueError(f"the frame is empty ({w}x{h} pixels): there is nothing to classify")
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame)
    im = Image.fromarray(frame).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)
