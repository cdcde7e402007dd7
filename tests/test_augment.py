"""Augmentation: deterministic per key, mild, shape-preserving, the same for every frame."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from har_flax.augment import AugmentConfig, augment, resample_matrix

NONE = AugmentConfig(min_area=1.0, max_aspect=1.0, flip=False, brightness=0, contrast=0,
                     saturation=0)  # fmt: skip


@pytest.fixture(scope="module")
def frames(photo_arrays):
    """Two real photographs at 48x64, as (B=2, T=2, H, W, 3) uint8 (frame 1 = frame 0 + 10)."""
    from PIL import Image

    stills = [
        np.asarray(Image.fromarray(photo_arrays[n]).resize((64, 48))) for n in ("chelsea", "coffee")
    ]
    x = np.stack(stills)[:, None]  # (2, 1, 48, 64, 3)
    return np.concatenate([x, np.clip(x.astype(int) + 10, 0, 255).astype(np.uint8)], axis=1)


def test_identity_when_every_range_is_zero(frames):
    out = augment(frames, jax.random.key(0), NONE)
    assert out.dtype == jnp.float32 and out.shape == frames.shape
    np.testing.assert_allclose(np.asarray(out), frames, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flip_only_mirrors_exactly(frames, dtype):
    # bfloat16 folds the flip into its resampling matrix; uint8 pixels are exact in bfloat16.
    cfg = AugmentConfig(min_area=1.0, max_aspect=1.0, flip=True, brightness=0, contrast=0,
                        saturation=0)  # fmt: skip
    seen = set()
    for seed in range(8):
        out = np.asarray(augment(frames, jax.random.key(seed), cfg, dtype), np.float32)
        for b in range(len(frames)):
            if np.allclose(out[b], frames[b], atol=1e-3):
                seen.add("same")
            else:
                np.testing.assert_allclose(out[b], frames[b, :, :, ::-1], atol=1e-3)
                seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_deterministic_per_key_and_different_across_keys(frames):
    f = jax.jit(lambda x, k: augment(x, k))
    a = np.asarray(f(frames, jax.random.key(1)))
    np.testing.assert_array_equal(a, np.asarray(f(frames, jax.random.key(1))))
    assert not np.allclose(a, np.asarray(f(frames, jax.random.key(2))))
    # Each example in a batch gets its own draw.
    twins = np.stack([frames[0], frames[0]])
    out = np.asarray(f(twins, jax.random.key(3)))
    assert not np.allclose(out[0], out[1])


def test_mild_range_and_same_transform_for_every_frame(frames):
    for seed in range(4):
        out = np.asarray(augment(frames, jax.random.key(seed)))
        assert out.min() >= 0 and out.max() <= 255
        # Mild: the picture stays close to the original (or its mirror image).
        for b in range(len(frames)):
            x = frames[b].astype(np.float32)
            err = min(np.abs(out[b] - x).mean(), np.abs(out[b] - x[:, :, ::-1]).mean())
            assert err < 45, err
        # Frame 1 was frame 0 brightened by 10: one shared crop/flip/jitter keeps them related.
        diff = (out[:, 1] - out[:, 0]).mean(axis=(1, 2, 3))
        assert np.all((diff > 5) & (diff < 15)), diff


def test_crop_zooms_in(frames):
    # min_area 0.5 with no other change: a crop shows less of the image, so fewer distinct
    # columns of the original survive; compare sharpness (zooming in blurs).
    cfg = AugmentConfig(min_area=0.5, max_aspect=1.0, flip=False, brightness=0, contrast=0,
                        saturation=0)  # fmt: skip
    out = np.asarray(augment(frames, jax.random.key(0), cfg))
    grad = lambda x: np.abs(np.diff(x.astype(np.float32), axis=-2)).mean()  # noqa: E731
    assert grad(out) < grad(frames)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\)"):
        augment(jnp.zeros((2, 8, 8, 3)), jax.random.key(0))
    with pytest.raises(ValueError, match="min_area"):
        AugmentConfig(min_area=0.0)
    for aspect in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_aspect must be finite and >= 1"):
            AugmentConfig(max_aspect=aspect)


def _only(**ranges) -> AugmentConfig:
    """No transformation but the ones named."""
    return AugmentConfig(**{**dataclasses.asdict(NONE), **ranges})


def test_full_area_crop_of_another_aspect_stretches_one_axis_only():
    # A crop of the whole area but another aspect keeps one full side: the picture is stretched
    # along one axis and untouched along the other (a crop sized as sqrt(area * aspect) on both
    # sides would zoom both ways or neither). Channel 0 varies along x only, channel 1 along y.
    h, w = 48, 64
    ramps = np.zeros((8, 1, h, w, 3), np.float32)
    ramps[..., 0] = np.linspace(0, 255, w)[None, :]
    ramps[..., 1] = np.linspace(0, 255, h)[:, None]
    out = np.asarray(augment(ramps, jax.random.key(0), _only(max_aspect=2.0)))
    for b in range(len(ramps)):
        kept = [np.allclose(out[b, ..., c], ramps[b, ..., c], atol=0.5) for c in (0, 1)]
        assert kept in ([True, False], [False, True]), (b, kept)


def test_contrast_scales_each_frame_around_its_own_mean():
    # A dark frame then a bright one: each keeps its own mean brightness (no fading of the
    # clip's brightness change), and both get the same factor.
    tex = np.random.default_rng(0).uniform(-20, 20, size=(16, 16, 3))
    clip = np.stack([60 + tex, 180 + tex[::-1]]).astype(np.float32)  # (T=2, H, W, C)
    batch = np.stack([clip] * 4)
    out = np.asarray(augment(batch, jax.random.key(0), _only(contrast=0.5)))
    mean = clip.mean(axis=(1, 2, 3), keepdims=True)
    factors = []
    for y in out:
        d0, x0 = y[0] - mean[0], clip[0] - mean[0]
        factor = (d0 * x0).sum() / (x0 * x0).sum()  # least squares from frame 0
        np.testing.assert_allclose(y, mean + factor * (clip - mean), atol=0.01)
        factors.append(factor)
    assert max(abs(f - 1) for f in factors) > 0.1, factors


def test_saturation_keeps_each_pixels_luma():
    # Saturation blends with the ITU-R 601 grey (0.299 R + 0.587 G + 0.114 B, written out here),
    # so a reddish and a bluish pixel keep their own luma whatever the factor.
    luma = np.array([0.299, 0.587, 0.114])
    image = np.zeros((16, 16, 3), np.float32)
    image[:8], image[8:] = (150, 50, 50), (50, 50, 150)
    batch = np.stack([image[None]] * 4)  # (B=4, T=1, H, W, C)
    out = np.asarray(augment(batch, jax.random.key(0), _only(saturation=0.9)))
    np.testing.assert_allclose(out @ luma, batch @ luma, atol=0.1)
    assert np.abs(out - batch).max() > 10  # the colours did change


@pytest.mark.parametrize(
    "size, start, length",
    [(48, 3.3, 40.1), (224, 17.7, 190.2), (64, 0.0, 64.0), (32, 0.0, 50.0), (32, -3.0, 40.0)],
    ids=["crop", "crop-224", "whole", "shrink", "outside"],
)
def test_resample_matrix_is_jax_image_scale_and_translate(size, start, length):
    # The crop is one matrix per axis; it must resample as jax.image does (linear, antialias),
    # also when the span is longer than the axis or starts outside it.
    img = np.random.default_rng(0).uniform(0, 255, (size, 5)).astype(np.float32)
    scale = size / length
    ref = jax.image.scale_and_translate(
        img, img.shape, (0,), jnp.array([scale]), jnp.array([-start * scale]),
        method="linear", antialias=True, precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    m = resample_matrix(size, jnp.float32(start), jnp.float32(length))
    np.testing.assert_allclose(jnp.matmul(m, img, precision="highest"), ref, atol=1e-3)


def _dot_operand_dtypes(fn, *args) -> list[tuple[str, ...]]:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    eqns = list(jaxpr.eqns)
    found = []
    while eqns:  # the vmapped body and any nested jaxprs
        e = eqns.pop()
        if e.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in e.invars))
        for sub in jax_core.jaxprs_in_params(e.params):
            eqns.extend(sub.eqns)
    return sorted(found)


def test_bfloat16_resamples_in_bfloat16_close_to_float32(frames):
    key = jax.random.key(2)  # a key that crops, jitters and flips both sequences
    full = np.asarray(augment(frames, key))
    half = augment(frames, key, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16 and half.shape == frames.shape
    err = np.abs(np.asarray(half, np.float32) - full)
    assert err.max() <= 3.0 and err.mean() <= 0.6, (err.max(), err.mean())
    # The crop's two products take bfloat16 operands (the tensor units); the luma stays float32.
    assert _dot_operand_dtypes(lambda x, k: augment(x, k, dtype=jnp.bfloat16), frames, key) == [
        ("bfloat16", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32"),
    ]  # fmt: skip
    assert (
        _dot_operand_dtypes(lambda x, k: augment(x, k), frames, key) == [("float32", "float32")] * 3
    )
