"""MobileNetV2 (Sandler et al. 2018) in Flax Linen, layer for layer the Keras application.

Submodules carry the Keras layer names (``Conv1``, ``bn_Conv1``, ``block_1_expand``, ...), so the
variable tree is flat and a weight port is a name-by-name copy. Shape legend: B batch, H W C
image, D features, K classes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (expansion t, output channels c, stride s) for blocks 0..16; the paper's table 2 unrolled.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)  # fmt: skip

BN_EPSILON = 1e-3  # Keras' value; the ported statistics assume it.


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds channel counts the way the reference implementation does."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # Never round down by more than 10%.
        new_v += divisor
    return new_v


def stem_channels(width: float) -> int:
    return make_divisible(32 * width, 8)


def block_channels(width: float) -> list[tuple[int, int, int, int]]:
    """Per block: (in_channels, expanded_channels, out_channels, stride)."""
    out = []
    c_in = stem_channels(width)
    for t, c, s in BLOCKS:
        c_out = make_divisible(int(c * width), 8)
        out.append((c_in, t * c_in, c_out, s))
        c_in = c_out
    return out


def head_channels(width: float) -> int:
    """D: the pooled feature size (1280 for width <= 1, as in Keras)."""
    return make_divisible(1280 * width, 8) if width > 1.0 else 1280


def block_prefix(block_id: int) -> str:
    return "expanded_conv_" if block_id == 0 else f"block_{block_id}_"


def keras_stride2_padding(size: int, kernel: int = 3) -> tuple[int, int]:
    """``imagenet_utils.correct_pad``: (before, after) zero padding for a stride-2 layer."""
    adjust = 1 - size % 2
    correct = kernel // 2
    return (correct - adjust, correct)


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' picks nine shifted multiply-adds on the CPU, the grouped convolution elsewhere.

    XLA's CPU grouped convolution is ~40x slower than the shifted form for MobileNetV2's 3x3
    depthwise layers; on GPU/TPU the grouped convolution is the fast, fused path.
    """
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    return impl


def depthwise_conv3x3(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], ...], impl: str
) -> jax.Array:
    """3x3 depthwise convolution, both implementations.

    Args:
      x: (B, H, W, C) input.
      kernel: (3, 3, 1, C), Flax's HWIO layout for ``feature_group_count=C``.
      stride: 1 or 2.
      padding: ((top, bottom), (left, right)) zero padding.
      impl: "conv" or "shift" (already resolved).

    Returns:
      (B, H', W', C).
    """
    if impl == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    if impl != "shift":
        raise ValueError(f"unknown depthwise impl {impl!r}")
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))  # (B, H+pt+pb, W+pl+pr, C)
    kh, kw = kernel.shape[:2]
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (
                    xp.shape[0],
                    i + (out_h - 1) * stride + 1,
                    j + (out_w - 1) * stride + 1,
                    xp.shape[3],
                ),
                (1, stride, stride, 1),
            )  # (B, H', W', C)
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv3x3(nn.Module):
    """Bias-free 3x3 depthwise convolution with a selectable implementation."""

    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, 1, channels), self.param_dtype
        )
        if self.stride == 1:
            padding = ((1, 1), (1, 1))
        else:  # Keras pads explicitly, then runs a VALID convolution.
            padding = (keras_stride2_padding(x.shape[1]), keras_stride2_padding(x.shape[2]))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return depthwise_conv3x3(x, kernel, self.stride, padding, resolve_depthwise_impl(self.impl))


class MobileNetV2(nn.Module):
    """MobileNetV2 on one batch of frames.

    Input: float (B, H, W, 3) in [-1, 1]. Output: pooled features (B, D), or logits (B, K) with
    ``include_top``.
    """

    width: float = 1.0
    include_top: bool = False
    num_classes: int = 1000
    depthwise_impl: str = "auto"
    bn_momentum: float = 0.999
    bn_axis_name: str | None = None  # Pools BatchNorm statistics over a vmapped axis.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPSILON,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        dwconv = functools.partial(
            DepthwiseConv3x3,
            impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

        x = x.astype(self.dtype)
        x = conv(stem_channels(self.width), (3, 3), strides=2, padding="SAME", name="Conv1")(x)
        x = nn.relu6(norm(name="bn_Conv1")(x))  # (B, H/2, W/2, 32w)

        for block_id, (c_in, c_exp, c_out, stride) in enumerate(block_channels(self.width)):
            p = block_prefix(block_id)
            y = x
            if block_id:
                y = conv(c_exp, (1, 1), name=f"{p}expand")(y)
                y = nn.relu6(norm(name=f"{p}expand_BN")(y))
            y = dwconv(stride=stride, name=f"{p}depthwise")(y)
            y = nn.relu6(norm(name=f"{p}depthwise_BN")(y))
            y = conv(c_out, (1, 1), name=f"{p}project")(y)
            y = norm(name=f"{p}project_BN")(y)  # Linear bottleneck: no activation.
            x = x + y if (stride == 1 and c_in == c_out) else y

        x = conv(head_channels(self.width), (1, 1), name="Conv_1")(x)
        x = nn.relu6(norm(name="Conv_1_bn")(x))  # (B, H/32, W/32, D)
        x = jnp.mean(x, axis=(1, 2))  # (B, D)
        if self.include_top:
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="predictions",
            )(x)  # (B, K)
        return x
