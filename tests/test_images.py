"""Image decoding: every Pillow mode to correct RGB, EXIF orientation, animation, limits, errors.

Expected pixel values are written out by hand (or come from the undecoded source array), never
from the decoder under test. Fast and JAX-free.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from har_flax import images
from har_flax.images import (
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    InvalidImageError,
    decode_frames,
    iter_frames,
    resize_frame,
)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode_one(data: bytes, **kw) -> np.ndarray:
    frames = decode_frames(data, **kw)
    assert len(frames) == 1
    (frame,) = frames
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3
    return frame


@pytest.fixture(scope="module")
def crop(photo_arrays) -> np.ndarray:
    """A non-square, non-symmetric piece of a real photo (48 x 80), so any wrong flip shows."""
    return np.ascontiguousarray(photo_arrays["chelsea"][100:148, 150:230])


# ---------------------------------------------------------------------------------------------
# Modes


def test_rgb_png_is_exact_and_jpeg_close(crop, cat_jpeg, photo_arrays):
    np.testing.assert_array_equal(decode_one(encode(Image.fromarray(crop))), crop)
    cat = decode_one(cat_jpeg)
    assert cat.shape == photo_arrays["chelsea"].shape
    assert np.abs(cat.astype(int) - photo_arrays["chelsea"]).mean() < 3


def test_rgba_is_composited_over_white():
    px = np.array(
        [[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128], [200, 100, 50, 64]]], np.uint8
    )
    rgba = np.repeat(np.repeat(px, 8, axis=0), 2, axis=1)  # (8, 8, 4)
    out = decode_one(encode(Image.fromarray(rgba, "RGBA")))
    # opaque red stays red; fully transparent blue is white; half-transparent black is mid
    # grey; 25 % opaque (200, 100, 50) over white = c * 64/255 + 255 * 191/255.
    expected = [[255, 0, 0], [255, 255, 255], [127, 127, 127], [241, 216, 204]]
    np.testing.assert_array_equal(out[0, ::2], expected)


def test_la_is_composited_over_white():
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, :4] = (100, 255)  # opaque grey 100
    la[:, 4:] = (0, 0)  # transparent black -> white
    out = decode_one(encode(Image.fromarray(la, "LA")))
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(out[0, 7], [255, 255, 255])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    im = Image.new("P", (8, 8), 0)
    palette = [0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254
    im.putpalette(palette)
    im.paste(1, (0, 0, 8, 4))  # top half index 1, bottom half index 0 (transparent)
    out = decode_one(encode(im, fmt, transparency=0))
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])
    # Index 0 is black in the palette; a decoder that ignores transparency shows black here.
    np.testing.assert_array_equal(out[7, 0], [255, 255, 255])


def test_palette_without_transparency_keeps_its_colours():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    im.paste(1, (0, 0, 8, 4))
    out = decode_one(encode(im, "BMP"))
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])
    np.testing.assert_array_equal(out[7, 0], [0, 0, 0])


def test_cmyk_jpeg_round_trip(crop):
    data = encode(Image.fromarray(crop).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_one(data)
    assert np.abs(out.astype(int) - crop).mean() < 6


def test_cmyk_primaries():
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, 16:32] = (0, 0, 0, 255)  # black ink
    cmyk[:, 32:] = (255, 0, 0, 0)  # pure cyan
    out = decode_one(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
    np.testing.assert_allclose(out[8, 4], [255, 255, 255], atol=4)
    np.testing.assert_allclose(out[8, 20], [0, 0, 0], atol=4)
    np.testing.assert_allclose(out[8, 44], [0, 255, 255], atol=4)


def test_grayscale_becomes_equal_channels(crop):
    gray = np.asarray(Image.fromarray(crop).convert("L"))
    out = decode_one(encode(Image.fromarray(gray)))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_16_bit_grayscale_is_scaled_not_clipped():
    a = np.zeros((8, 8), np.uint16)
    a[:, 2:4] = 257 * 100  # mid-dark grey; clipping at 255 would make it white
    a[:, 4:6] = 32896  # 128.0 on the 8-bit scale
    a[:, 6:] = 65535
    data = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_one(data)
    np.testing.assert_array_equal(out[0, ::2, 0], [0, 100, 128, 255])
    assert (out == out[..., :1]).all()


def test_one_bit():
    bits = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    data = encode(Image.fromarray(bits))
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = decode_one(data)
    np.testing.assert_array_equal(out[..., 0], np.where(bits, 255, 0))
    assert (out == out[..., :1]).all()


@pytest.mark.parametrize("block_pixels", [64, 5])  # several rows per block; one row per block
def test_conversion_in_row_blocks_is_exact(monkeypatch, block_pixels):
    # Frames are converted in blocks of rows; tiny blocks (and a height that is no multiple of
    # the block) must give exactly the whole-frame values, computed here in floating point.
    monkeypatch.setattr(images, "_BLOCK_PIXELS", block_pixels)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 13, 4), np.uint8)
    colour, alpha = rgba[..., :3].astype(float), rgba[..., 3:].astype(float)
    over_white = np.rint((colour * alpha + 255 * (255 - alpha)) / 255)
    np.testing.assert_array_equal(decode_one(encode(Image.fromarray(rgba, "RGBA"))), over_white)
    la = np.ascontiguousarray(rgba[..., 2:])  # (grey, alpha)
    grey, alpha = la[..., :1].astype(float), la[..., 1:].astype(float)
    expected = np.repeat(np.rint((grey * alpha + 255 * (255 - alpha)) / 255), 3, axis=-1)
    np.testing.assert_array_equal(decode_one(encode(Image.fromarray(la, "LA"))), expected)
    wide = rng.integers(0, 65536, (37, 13), np.uint16)
    expected = np.repeat(np.rint(wide / 257.0)[..., None], 3, axis=-1)  # 65535 / 255 = 257
    np.testing.assert_array_equal(decode_one(encode(Image.fromarray(wide))), expected)
    rgb = rgba[..., :3]
    np.testing.assert_array_equal(decode_one(encode(Image.fromarray(rgb))), rgb)


# ---------------------------------------------------------------------------------------------
# EXIF orientation

# The transpose that, applied to the stored pixels, gives the upright image is the inverse of
# the one used to store the upright image. The table is written independently of the decoder's.
STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # shown after a 90-degree clockwise turn
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    stored = Image.fromarray(upright).transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", sorted(STORE))
def test_exif_orientation_png_exact(crop, orientation):
    np.testing.assert_array_equal(decode_one(with_orientation(crop, orientation, "PNG")), crop)


def test_exif_rotated_jpeg_equals_upright(photo_arrays):
    upright = photo_arrays["astronaut"]
    out = decode_one(with_orientation(upright, 6, "JPEG"))
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - upright).mean() < 3


def test_corrupt_exif_is_ignored(crop):
    data = encode(Image.fromarray(crop), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert decode_one(data).shape == crop.shape


# ---------------------------------------------------------------------------------------------
# Animation

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def solid_frames(size=(16, 12)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in COLOURS]


def test_animated_gif_gives_every_frame():
    frames = solid_frames()
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode_frames(data)
    assert len(out) == 3
    for frame, colour in zip(out, COLOURS, strict=True):
        assert frame.shape == (12, 16, 3)
        np.testing.assert_array_equal(frame[6, 8], colour)


def test_animated_gif_with_transparency_is_composited():
    # Frame 0: left half transparent (white on screen), right half red. Frame 1 draws only a
    # blue square into the top-left, keeping (disposal 1) the rest of frame 0.
    f0 = Image.new("P", (16, 16), 0)
    f0.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0, 0, 0] * 253)
    f0.paste(1, (8, 0, 16, 16))
    f1 = f0.copy()
    f1.paste(0, (0, 0, 16, 16))
    f1.paste(2, (0, 0, 4, 4))
    data = encode(
        f0, "GIF", save_all=True, append_images=[f1], transparency=0, disposal=1, duration=50
    )
    out = decode_frames(data)
    assert len(out) == 2
    np.testing.assert_array_equal(out[0][8, 2], [255, 255, 255])
    np.testing.assert_array_equal(out[0][8, 12], [255, 0, 0])
    np.testing.assert_array_equal(out[1][1, 1], [0, 0, 255])
    np.testing.assert_array_equal(out[1][8, 12], [255, 0, 0])  # kept from frame 0
    np.testing.assert_array_equal(out[1][8, 2], [255, 255, 255])


def test_animated_webp_gives_every_frame():
    frames = [Image.new("RGBA", (16, 16), (*c, 255)) for c in COLOURS]
    frames[2] = Image.new("RGBA", (16, 16), (0, 0, 255, 0))  # a fully transparent frame
    data = encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50
    )
    out = decode_frames(data)
    assert len(out) == 3
    np.testing.assert_array_equal(out[0][8, 8], (255, 0, 0))
    np.testing.assert_array_equal(out[1][8, 8], (0, 255, 0))
    np.testing.assert_array_equal(out[2][8, 8], (255, 255, 255))


def test_apng_default_image_is_not_a_frame():
    # IDAT before the first fcTL: a fallback for viewers without APNG, not part of the animation.
    red, green, blue = solid_frames()
    data = encode(red, "PNG", save_all=True, append_images=[green, blue], default_image=True)
    assert Image.open(io.BytesIO(data)).info.get("default_image")
    out = decode_frames(data, limits=ImageLimits(max_frames=2))  # the fallback is not counted
    assert [tuple(frame[6, 8]) for frame in out] == [COLOURS[1], COLOURS[2]]
    # With one animation frame besides the fallback, that frame is a still.
    data = encode(red, "PNG", save_all=True, append_images=[green], default_image=True)
    np.testing.assert_array_equal(decode_one(data)[6, 8], COLOURS[1])
    # Without a default image the first frame is an animation frame, as before.
    data = encode(red, "PNG", save_all=True, append_images=[green, blue])
    assert [tuple(frame[6, 8]) for frame in decode_frames(data)] == COLOURS


def test_multi_picture_jpeg_is_its_first_picture(crop):
    # Phones write MPO files: the photo, then previews or depth maps. Only the photo counts.
    data = encode(Image.fromarray(crop), "MPO", save_all=True, quality=95,
                  append_images=[Image.new("RGB", (16, 16), (255, 0, 0))])  # fmt: skip
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_one(data)
    assert out.shape == crop.shape and np.abs(out.astype(int) - crop).mean() < 3


def test_iter_frames_shares_a_frame_budget():
    frames = solid_frames()
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    limits = ImageLimits(max_frames=4)
    budget = [limits.max_frames, limits.max_total_pixels]
    assert len(list(iter_frames(gif, limits=limits, field="images[0]", budget=budget))) == 3
    with pytest.raises(ImageTooLargeError) as e:
        list(iter_frames(gif, limits=limits, field="images[1]", budget=budget))
    assert e.value.field == "images[1]"
    assert "4 frames" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Limits


def png_header_bomb(width: int, height: int, *, valid_data: bool = True) -> bytes:
    """A grayscale PNG claiming width x height pixels, its IDAT all zeros (tiny once deflated).

    With ``valid_data=False`` the IDAT is garbage, so any decoder that touches the pixels fails
    with a corrupt-data error: getting 'too large' instead proves the refusal came from the
    header alone.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    if valid_data:
        comp = zlib.compressobj(9)
        row = b"\x00" * (width + 1)  # filter byte + pixels
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        idat = b"not deflate data at all"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding():
    bomb = png_header_bomb(8000, 8000)  # 64 M pixels, about 64 KB on disk
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as e:
        decode_frames(bomb, field="images[1]")
    assert time.perf_counter() - start < 0.5  # decoding 64 M pixels would take far longer
    assert e.value.field == "images[1]" and "64,000,000 pixels" in str(e.value)
    assert e.value.limit == "max_pixels"  # the ImageLimits field, for a caller to name its knob
    with pytest.raises(ImageTooLargeError):
        decode_frames(png_header_bomb(8000, 8000, valid_data=False))
    # Sanity: the same garbage-data file under the limit really is undecodable.
    with pytest.raises(InvalidImageError):
        decode_frames(png_header_bomb(64, 64, valid_data=False))


def test_giant_bomb_beyond_pillows_own_guard():
    # 10 G pixels: Pillow itself refuses at open() (DecompressionBombError); still our error type.
    with pytest.raises(ImageTooLargeError) as e:
        decode_frames(png_header_bomb(100_000, 100_000, valid_data=False))
    assert e.value.limit is None  # no limit of ours raises it
    assert "the image claims 10,000,000,000 pixels" in str(e.value)  # what to downscale
    assert "downscale it first" in str(e.value)


def test_a_limit_above_pillows_ceiling_never_contradicts_the_refusal():
    ceiling = images.pillow_max_pixels()  # 2 x PIL.Image.MAX_IMAGE_PIXELS: 178,956,970
    bomb = png_header_bomb(14_000, 13_000, valid_data=False)  # 182 M: over Pillow's, under ours
    with pytest.raises(ImageTooLargeError) as e:
        decode_frames(bomb, limits=ImageLimits(max_pixels=200_000_000, max_total_pixels=1 << 30))
    assert f"claims 182,000,000 pixels, so many that decoding it would exhaust memory (limit " \
        f"{ceiling:,} pixels)" in str(e.value)  # fmt: skip
    # Where warnings are errors Pillow refuses from half its ceiling, and says so.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError, match=f"limit {ceiling // 2:,} pixels"):
            decode_frames(png_header_bomb(10_000, 10_000), limits=images.LOCAL_LIMITS)
    # The server refuses such a --max-pixels at start (a ValueError: exit 2, as any bad flag).
    from grpc_server.config import ServerConfig
    from grpc_server.main import build_parser, config_from_args

    args = build_parser(env={}).parse_args(["--max-pixels", "200000000"])
    with pytest.raises(ValueError) as refused:
        config_from_args(args)
    assert str(refused.value) == (
        f"max_pixels 200,000,000 is over {ceiling:,}, the most pixels per frame the image "
        f"decoder (Pillow) opens; set max_pixels (--max-pixels) to at most {ceiling}"
    )
    with pytest.raises(ValueError, match="the most pixels per frame"):
        ServerConfig(max_pixels=ceiling + 1)
    assert ServerConfig(max_pixels=ceiling).image_limits().max_pixels == ceiling


def test_pillow_bomb_warning_is_not_printed():
    # 100 M pixels is over Pillow's warning threshold (about 89 M) and under its error; our own
    # limit refuses it cleanly, and Pillow's DecompressionBombWarning must not reach stderr (a
    # fresh process: pytest's warning capture would show what a filter hides).
    code = (
        "import sys; from har_flax.images import decode_frames, ImageTooLargeError\n"
        "try: decode_frames(sys.stdin.buffer.read())\n"
        "except ImageTooLargeError as e: print(e)\n"
    )
    bomb = png_header_bomb(10_000, 10_000, valid_data=False)
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], input=bomb,
                         capture_output=True, check=True)  # fmt: skip
    assert b"100,000,000 pixels, over the limit" in run.stdout
    assert run.stderr == b""


def test_pillow_bomb_warning_as_error_is_still_too_large():
    # Where warnings are errors, Pillow raises its warning from open(): still our error type.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError) as e:
            decode_frames(png_header_bomb(10_000, 10_000, valid_data=False), field="images[1]")
    assert e.value.field == "images[1]" and e.value.frame is None


def test_too_many_bytes(cat_jpeg):
    with pytest.raises(ImageTooLargeError) as e:
        decode_frames(cat_jpeg, limits=ImageLimits(max_bytes=10_000), field="images[0]")
    assert e.value.frame is None and e.value.limit == "max_bytes"
    assert f"{len(cat_jpeg):,} bytes (" in str(e.value)
    assert "over the limit of 10,000 bytes (10 KiB) per image" in str(e.value)
    # The limit is exact: an image of max_bytes is accepted, one byte more is not.
    assert len(decode_frames(cat_jpeg, limits=ImageLimits(max_bytes=len(cat_jpeg)))) == 1
    with pytest.raises(ImageTooLargeError, match=f"{len(cat_jpeg):,} bytes .* over the limit"):
        decode_frames(cat_jpeg, limits=ImageLimits(max_bytes=len(cat_jpeg) - 1))


def test_too_many_frames():
    frames = solid_frames() * 2
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert len(decode_frames(gif, limits=ImageLimits(max_frames=6))) == 6
    with pytest.raises(ImageTooLargeError, match="6 frames") as e:
        decode_frames(gif, limits=ImageLimits(max_frames=5))
    assert e.value.limit == "max_frames"


def test_too_many_decoded_pixels_in_an_animation():
    frames = solid_frames(size=(100, 100))
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    small = ImageLimits(max_pixels=10_000, max_total_pixels=25_000)
    with pytest.raises(
        ImageTooLargeError, match="3 frames of 100x100 pixels .* 25,000 decoded "
    ) as e:
        decode_frames(gif, limits=small)
    assert e.value.limit == "max_total_pixels"
    # The budget is per request: after two earlier frames, one more is over it.
    budget = [small.max_frames, small.max_total_pixels]
    assert len(list(iter_frames(encode(frames[0], "PNG"), limits=small, budget=budget))) == 1
    assert len(list(iter_frames(encode(frames[1], "PNG"), limits=small, budget=budget))) == 1
    with pytest.raises(ImageTooLargeError, match=r"^images\[2\]: 1 frame after 2 earlier ones "):
        list(iter_frames(encode(frames[2], "PNG"), limits=small, field="images[2]", budget=budget))


def test_a_request_must_fit_one_frame_at_the_per_frame_limit():
    with pytest.raises(ValueError, match=r"max_total_pixels \(25,000\) must be at least max_pi"):
        ImageLimits(max_total_pixels=25_000)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_frames"):
        ImageLimits(max_frames=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_empty():
    with pytest.raises(InvalidImageError, match="empty") as e:
        decode_frames(b"", field="images[3]")
    assert e.value.field == "images[3]" and str(e.value).startswith("images[3]: ")


def test_truncated_jpeg(cat_jpeg):
    with pytest.raises(InvalidImageError, match="truncated") as e:
        decode_frames(cat_jpeg[: len(cat_jpeg) // 2], field="images[0]")
    assert e.value.field == "images[0]"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"hello, this is a text file\n", "text"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "SVG"),
        (bytes(range(256)) * 4, "binary data in no known image format"),
    ],
)
def test_not_an_image(data, words):
    with pytest.raises(InvalidImageError) as e:
        decode_frames(data, field="images[2]")
    assert words in str(e.value) and "JPEG, PNG" in str(e.value)
    assert str(e.value).count("not an image") == 1, str(e.value)  # said once, not twice
    assert e.value.field == "images[2]" and e.value.frame is None


def test_unsupported_format_is_refused():
    tiff = encode(Image.new("RGB", (16, 16)), "TIFF")
    with pytest.raises(InvalidImageError, match="TIFF"):
        decode_frames(tiff)


@pytest.mark.parametrize("size", [(1, 1), (7, 100)])
def test_too_small(size):
    with pytest.raises(InvalidImageError, match="too small"):
        decode_frames(encode(Image.new("RGB", size)))


def test_truncated_animation_names_the_frame():
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8))
              for i in range(3)]  # fmt: skip
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    # Cut into the last frame's image data (its header survives, so it is counted).
    cut = gif[: len(gif) - 1500]
    with pytest.raises(InvalidImageError) as e:
        decode_frames(cut, field="images[0]")
    assert e.value.frame == 2 and "frame 2" in str(e.value)


def three_frame_gif() -> bytes:
    """A 3-frame 64 x 64 GIF; each frame has a graphic control extension and a descriptor."""
    frames = [Image.new("RGB", (64, 64), c) for c in COLOURS]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def frame_header(gif: bytes, kind: bytes, frame: int) -> int:
    """Offset of a frame's graphic control extension (b"!") or image descriptor (b",")."""
    marker = b"!\xf9" if kind == b"!" else b",\x00\x00\x00\x00\x40\x00\x40\x00"
    offset = -1
    for _ in range(frame + 1):
        offset = gif.index(marker, offset + 1)
    return offset


def test_gif_frame_claiming_a_huge_canvas_is_too_large():
    # A later frame's descriptor claims 65535 x 65535: Pillow's bomb guard fires in seek().
    gif = bytearray(three_frame_gif())
    descriptor = frame_header(bytes(gif), b",", 1)
    gif[descriptor + 5 : descriptor + 9] = b"\xff\xff\xff\xff"
    with pytest.raises(ImageTooLargeError) as e:
        decode_frames(bytes(gif), field="images[1]")
    assert e.value.field == "images[1]" and e.value.frame == 1
    assert str(e.value).startswith("images[1] frame 1: ")
    # 8000 x 8000: under Pillow's guard, over ours.
    gif[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 8000, 8000)
    with pytest.raises(ImageTooLargeError, match="64,000,000 pixels") as e:
        decode_frames(bytes(gif), field="images[1]")
    assert e.value.field == "images[1]" and e.value.frame == 1


# The palette of hand-built GIFs: index 0 black, 1 white, 2 red, 3 blue.
GIF_PALETTE = np.array([(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)], np.uint8)


def hand_built_gif(screen: tuple[int, int], frames: list[tuple[int, int, np.ndarray]]) -> bytes:
    """A GIF89a of logical screen (W, H) and frames (left, top, indices (h, w)), byte by byte.

    Pillow's writer cannot make a frame that reaches past the screen, so this writes the
    blocks itself: a 4-colour global palette, each frame with disposal 1 (keep) and its pixels
    LZW-coded as literals (a clear code before every two, so codes stay 3 bits wide).
    """
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", *screen, 0xF1, 0, 0))
    out += GIF_PALETTE.tobytes() + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for left, top, indices in frames:
        h, w = indices.shape
        out += b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # graphic control: disposal 1, 100 ms
        out += b"\x2c" + struct.pack("<HHHHB", left, top, w, h, 0)
        codes = []
        pixels = [int(i) for i in indices.ravel()]
        for start in range(0, len(pixels), 2):
            codes += [4, *pixels[start : start + 2]]  # 4 = clear
        codes.append(5)  # end of information
        bits = sum(code << (3 * n) for n, code in enumerate(codes))
        data = bits.to_bytes((3 * len(codes) + 7) // 8, "little")
        out += b"\x02"  # LZW minimum code size
        for start in range(0, len(data), 255):
            block = data[start : start + 255]
            out += bytes([len(block)]) + block
        out += b"\x00"
    return bytes(out + b"\x3b")


def test_gif_frame_reaching_past_the_canvas_is_clipped_as_browsers_do():
    black = np.zeros((64, 64), np.uint8)
    white, red = np.full((64, 64), 1, np.uint8), np.full((16, 16), 2, np.uint8)
    # Frame 1 reaches to 96 x 96 (Pillow grows its canvas); frame 2 is drawn after that.
    gif = hand_built_gif((64, 64), [(0, 0, black), (32, 32, white), (0, 0, red)])
    # What a browser shows: each frame clipped to the 64 x 64 screen, drawn over the last.
    shown = [GIF_PALETTE[black].copy()]
    shown.append(shown[-1].copy())
    shown[-1][32:, 32:] = GIF_PALETTE[1]
    shown.append(shown[-1].copy())
    shown[-1][:16, :16] = GIF_PALETTE[2]
    out = decode_frames(gif)
    assert len(out) == 3
    for frame, expected in zip(out, shown, strict=True):
        np.testing.assert_array_equal(frame, expected)
    # The same animation with frame 1 cut to the screen by its author decodes the same.
    fitted = hand_built_gif((64, 64), [(0, 0, black), (32, 32, white[:32, :32]), (0, 0, red)])
    for frame, expected in zip(decode_frames(fitted), shown, strict=True):
        np.testing.assert_array_equal(frame, expected)
    # The pixel budget is the canvas's: 3 frames of 64 x 64, not of 96 x 96.
    exact = ImageLimits(max_pixels=96 * 96, max_total_pixels=3 * 64 * 64)
    assert len(decode_frames(gif, limits=exact)) == 3
    # The enlarged canvas Pillow decodes into is still held to the per-frame limit.
    with pytest.raises(ImageTooLargeError, match="past the 64x64 canvas to 96x96") as e:
        decode_frames(gif, limits=ImageLimits(max_pixels=96 * 96 - 1), field="images[3]")
    assert e.value.frame == 1 and e.value.limit == "max_pixels"


def test_gif_first_frame_reaching_past_the_screen_sets_the_canvas():
    # Browsers and Pillow alike grow the screen to a first frame larger than it; later frames
    # are then frames of that canvas.
    white, red = np.full((64, 64), 1, np.uint8), np.full((8, 8), 2, np.uint8)
    out = decode_frames(hand_built_gif((64, 64), [(32, 32, white), (0, 0, red)]))
    assert [f.shape for f in out] == [(96, 96, 3)] * 2
    np.testing.assert_array_equal(out[1][:8, :8], np.broadcast_to(GIF_PALETTE[2], (8, 8, 3)))
    np.testing.assert_array_equal(out[1][32:, 32:], out[0][32:, 32:])


@pytest.mark.parametrize(
    "cut",
    [
        lambda gif: frame_header(gif, b"!", 1) + 1,  # Pillow: IndexError
        lambda gif: frame_header(gif, b",", 1) + 1,  # Pillow: struct.error
        lambda gif: frame_header(gif, b",", 1) + 4,
    ],
)
def test_gif_truncated_in_a_frame_header_names_the_frame(cut):
    gif = three_frame_gif()
    with pytest.raises(InvalidImageError) as e:
        decode_frames(gif[: cut(gif)], field="images[2]")
    assert e.value.field == "images[2]" and e.value.frame == 1
    assert str(e.value).startswith("images[2] frame 1: ")


def fuzz_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)) for _ in range(3)]
    rgba = [Image.fromarray(rng.integers(0, 256, (12, 16, 4), np.uint8), "RGBA") for _ in range(3)]
    animated = {"save_all": True, "duration": 50}
    return {
        "gif": encode(rgb[0], "GIF", append_images=rgb[1:], **animated),
        "apng": encode(rgba[0], "PNG", append_images=rgba[1:], default_image=True, **animated),
        "webp": encode(rgba[0], "WEBP", append_images=rgba[1:], lossless=True, **animated),
        "png16": encode(Image.fromarray(rng.integers(0, 65536, (12, 16), np.uint16))),
        "jpeg": encode(rgb[0], "JPEG", progressive=True),
        "bmp": encode(rgb[0].convert("P"), "BMP"),
    }


# Mutated headers may claim huge frames: keep the fuzz's decoding cheap.
FUZZ_LIMITS = ImageLimits(max_pixels=4_000_000, max_total_pixels=4_000_000)


def test_damaged_files_raise_only_image_errors():
    # A small seeded fuzz: truncations, bit flips and overwritten bytes of small files. Pillow
    # raises a dozen exception types on such input; callers must only ever see ImageError.
    seeds = fuzz_seeds()
    rng = random.Random(0)
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(400):
        name = sorted(seeds)[case % len(seeds)]
        data = bytearray(seeds[name])
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[i] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                data[i] = rng.choice((0x00, 0xFF, rng.randrange(256)))
            else:
                data = data[: max(1, i)]
        try:
            decode_frames(bytes(data), limits=FUZZ_LIMITS)
            outcomes["decoded"] += 1
        except ImageError:
            outcomes["refused"] += 1
        except Exception as e:  # anything else is the defect this test is for
            pytest.fail(f"case {case} ({name}): {type(e).__name__}: {e}")
    assert min(outcomes.values()) > 20, outcomes  # both paths were exercised


def test_errors_are_value_errors():
    # The server maps ImageError subclasses to status codes; plain callers can catch ValueError.
    assert issubclass(InvalidImageError, ImageError) and issubclass(ImageError, ValueError)
    assert issubclass(ImageTooLargeError, ImageError)
    with pytest.raises(TypeError):
        decode_frames("not bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Resize


def test_resize_shape_dtype_and_uniform_colour():
    frame = np.full((30, 50, 3), (12, 34, 56), np.uint8)
    out = resize_frame(frame, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == (12, 34, 56)).all()
    np.testing.assert_array_equal(resize_frame(out, 16), out)


def test_resize_refuses_what_is_not_a_frame():
    # Pillow would make a black frame of an empty array, and a model would classify it.
    for h, w in ((0, 0), (0, 10), (10, 0)):
        with pytest.raises(ValueError, match=rf"the frame is empty \({w}x{h} pixels\)"):
            resize_frame(np.zeros((h, w, 3), np.uint8), 16)
    with pytest.raises(ValueError, match=r"expected an RGB uint8 \(H, W, 3\) frame, got float32"):
        resize_frame(np.zeros((8, 8, 3), np.float32), 16)


def test_resize_antialiases_when_shrinking():
    # A one-pixel checkerboard shrunk 8x: an antialiased filter averages it to mid grey; point
    # sampling (no antialias) would give pure black or white.
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_frame(np.repeat(board[..., None], 3, axis=-1), 32)
    assert np.abs(out.astype(int) - 127.5).max() < 10


def test_resize_squashes_without_cropping():
    # Left third red, rest blue in a wide frame: the squash keeps the left third red.
    frame = np.zeros((20, 90, 3), np.uint8)
    frame[:, :30] = (255, 0, 0)
    frame[:, 30:] = (0, 0, 255)
    out = resize_frame(frame, 30)
    np.testing.assert_array_equal(out[15, 3], (255, 0, 0))
    np.testing.assert_array_equal(out[15, 26], (0, 0, 255))


def test_resize_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB uint8"):
        resize_frame(np.zeros((8, 8), np.uint8), 4)


def test_images_module_does_not_import_jax():
    code = "import sys, har_flax.images; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
