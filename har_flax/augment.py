"""Mild, jittable augmentation: random resized crop, horizontal flip, small colour jitter.

It runs on the accelerator inside the jitted train step. "Mild" on purpose: actions such as
texting or drinking hinge on small objects that an aggressive crop would cut away. Every frame of
a sequence gets the same crop, flip and jitter, so motion between frames is left intact.
Shape legend: B batch, T frames, H W C image.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Ranges of the random transformations (the defaults are the training defaults)."""

    min_area: float = 0.7  # Smallest crop, as a fraction of the image area.
    max_aspect: float = 4 / 3  # Crop aspect ratio in [1/max_aspect, max_aspect] (log-uniform).
    flip: bool = True  # Horizontal flip with probability 1/2.
    brightness: float = 0.1  # Additive, as a fraction of 255: delta in [-b, b].
    contrast: float = 0.1  # Multiplicative around the image mean: factor in [1-c, 1+c].
    saturation: float = 0.1  # Blend with the greyscale image: factor in [1-s, 1+s].

    def __post_init__(self):
        if not 0.0 < self.min_area <= 1.0:
            raise ValueError(f"min_area must be in (0, 1], got {self.min_area}")
        if not (math.isfinite(self.max_aspect) and self.max_aspect >= 1.0):
            raise ValueError(f"max_aspect must be finite and >= 1, got {self.max_aspect}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# ITU-R 601 luma weights, as in tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def augment(
    frames: jax.Array,
    rng: jax.Array,
    config: AugmentConfig = AugmentConfig(),
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Augments a batch of frame sequences.

    Args:
      frames: uint8 or float (B, T, H, W, C) with values in [0, 255].
      rng: a PRNG key; the same key gives the same result.
      config: the ranges.
      dtype: the dtype of the result and of the crop's resampling, the model's compute dtype.
        float32 resamples with `jax.image.scale_and_translate` at full float32 precision, as
        before this option existed. bfloat16 runs the same resampling as two matrix products
        (`resample_matrix`) on bfloat16 tensor units: on a GPU, the float32 products at full
        precision took most of the augmentation's 2 ms per step of 256 images. It rounds the
        weights and the pixels to bfloat16 on the way: about 0.3 of 255 from the float32
        result on average, at most about 2 (the model's bfloat16 input is itself rounded by up
        to 0.5).

    Returns:
      (B, T, H, W, C) of `dtype` in [0, 255]; kept as float so the crop's interpolation is not
      rounded away (the model's input normalisation accepts either dtype).
    """
    if frames.ndim != 5:
        raise ValueError(f"expected frames of shape (B, T, H, W, C), got {frames.shape}")
    keys = jax.random.split(rng, frames.shape[0])
    return jax.vmap(lambda x, k: _augment_one(x, k, config, jnp.dtype(dtype)))(frames, keys)


def _augment_one(
    x: jax.Array, rng: jax.Array, config: AugmentConfig, dtype: jnp.dtype
) -> jax.Array:
    """One sequence (T, H, W, C) -> (T, H, W, C) of `dtype`."""
    k_area, k_aspect, k_y, k_x, k_flip, k_b, k_c, k_s = jax.random.split(rng, 8)
    _, h, w, _ = x.shape

    # Random resized crop: a crop of area fraction `area` and aspect `aspect` (w/h), scaled back
    # to (H, W). Clipping keeps the crop inside the image when a ratio asks for more than fits.
    area = jax.random.uniform(k_area, (), minval=config.min_area, maxval=1.0)
    log_r = jnp.log(config.max_aspect)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=-log_r, maxval=log_r))
    crop_h = jnp.clip(jnp.sqrt(area / aspect), 0.0, 1.0) * h
    crop_w = jnp.clip(jnp.sqrt(area * aspect), 0.0, 1.0) * w
    top = jax.random.uniform(k_y, ()) * (h - crop_h)
    left = jax.random.uniform(k_x, ()) * (w - crop_w)
    if dtype == jnp.float32:
        # Float32 (a CPU's training): jax.image's own resampling, then the flip.
        scale = jnp.stack([h / crop_h, w / crop_w])
        x = jax.image.scale_and_translate(
            x.astype(jnp.float32),
            x.shape,
            spatial_dims=(1, 2),
            scale=scale,
            translation=-jnp.stack([top, left]) * scale,
            method="linear",
            antialias=True,
        )  # (T, H, W, C)
        if config.flip:
            x = jnp.where(jax.random.bernoulli(k_flip), x[:, :, ::-1, :], x)
    else:
        # Reduced precision (a GPU's or TPU's training): the same resampling as two matrix
        # products on the tensor units, with the flip folded into the column matrix (a
        # mirrored output is that matrix's rows reversed), so no pass over the images.
        rows = resample_matrix(h, top, crop_h).astype(dtype)  # (H out, H in)
        cols = resample_matrix(w, left, crop_w).astype(dtype)  # (W out, W in)
        if config.flip:
            cols = jnp.where(jax.random.bernoulli(k_flip), cols[::-1], cols)
        x = jnp.einsum("oh,thwc->towc", rows, x.astype(dtype))
        x = jnp.einsum("pw,towc->topc", cols, x)

    # Colour jitter in float32 whatever `dtype` is (XLA fuses it into the passes over x).
    x = x.astype(jnp.float32)
    if config.brightness:
        x = x + 255.0 * jax.random.uniform(
            k_b, (), minval=-config.brightness, maxval=config.brightness
        )
    if config.contrast:
        factor = jax.random.uniform(k_c, (), minval=1 - config.contrast, maxval=1 + config.contrast)
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)  # (T, 1, 1, 1)
        x = mean + factor * (x - mean)
    if config.saturation and x.shape[-1] == 3:
        factor = jax.random.uniform(
            k_s, (), minval=1 - config.saturation, maxval=1 + config.saturation
        )
        grey = jnp.tensordot(x, jnp.asarray(_LUMA), axes=([-1], [0]))[..., None]  # (T, H, W, 1)
        x = grey + factor * (x - grey)
    return jnp.clip(x, 0.0, 255.0).astype(dtype)


def resample_matrix(size: int, start: jax.Array, length: jax.Array) -> jax.Array:
    """(size, size) float32 matrix that scales the span [start, start + length) of an axis of
    `size` pixels to the whole axis, by linear interpolation between pixel centres.

    Row i holds the weights of output pixel i: what `jax.image.scale_and_translate` computes
    with scale size / length, translation -start * scale, method "linear" and antialias on (a
    triangle kernel widened by 1 / scale when the span is longer than the axis; normalised to
    sum 1; zero for an output pixel whose centre falls outside the input).
    """
    scale = size / length
    kernel_scale = jnp.maximum(1.0 / scale, 1.0)
    centres = jnp.arange(size, dtype=jnp.float32)
    source = (centres + 0.5) / scale + start - 0.5  # (out,) positions in input pixels
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(source[:, None] - centres[None, :]) / kernel_scale)
    total = jnp.sum(weights, axis=1, keepdims=True)
    weights = jnp.where(total > 1e-4, weights / jnp.where(total != 0, total, 1.0), 0.0)
    inside = (source >= -0.5) & (source <= size - 0.5)
    return jnp.where(inside[:, None], weights, 0.0)
