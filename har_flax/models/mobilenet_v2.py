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

from har_flax.config import DEPTHWISE_IMPLS

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
# "shift" convolutions with at most this many input channels run as broadcast multiply-adds
# (measured faster on XLA:CPU than its convolution or a K<=16 matrix product; see conv2d).
MAX_BROADCAST_CHANNELS = 16


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
    """'auto' picks "shift" on the CPU, "gemm" on a GPU and "conv" elsewhere (TPU).

    "conv" runs every convolution as an XLA convolution: the fused cuDNN/TPU path. "shift" is
    what XLA:CPU runs fast: 3x3 depthwise layers as nine shifted multiply-adds (XLA's CPU grouped
    convolution is ~40x slower on MobileNetV2's depthwise layers), 1x1 convolutions as matrix
    products on (B*H*W, C), and convolutions with few input channels (the RGB stem, block 1's
    expansion) as broadcast multiply-adds; see :func:`conv2d`. "gemm" keeps the 3x3 layers as
    XLA convolutions and runs the 1x1 layers as matrix products (cuBLAS rather than cuDNN on a
    GPU). The variables are the same, and so are the numbers up to float rounding
    (tests/test_models.py proves all three).

    Why "gemm" on a GPU: on an H200 (jax 0.11.2, bfloat16, batch 256) the cuDNN weight gradient
    of block 0's 1x1 projection, run as a convolution, came out non-finite in the very first
    step while every other gradient was finite (docs/BENCHMARKS.md). As a matrix product that
    gradient is a cuBLAS GEMM instead.

    Args:
      impl: "auto", "conv", "gemm" or "shift".

    Returns:
      "conv", "gemm" or "shift".
    """
    if impl == "auto":
        return {"cpu": "shift", "gpu": "gemm"}.get(jax.default_backend(), "conv")
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be 'auto', 'conv', 'gemm' or 'shift', got {impl!r}")
    return impl


def _taps(
    x: jax.Array, kh: int, kw: int, stride: int, padding: tuple[tuple[int, int], ...]
) -> list[list[jax.Array]]:
    """The kh x kw shifted (and strided) views of zero-padded ``x`` that a VALID conv reads.

    Args:
      x: (B, H, W, C).
      kh, kw: kernel size.
      stride: the same in both spatial axes.
      padding: ((top, bottom), (left, right)).

    Returns:
      taps[i][j]: (B, H', W', C), the input under kernel position (i, j) for every output pixel.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))  # (B, H+pt+pb, W+pl+pr, C)
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    return [
        [
            jax.lax.slice(
                xp,
                (0, i, j, 0),
                (
                    xp.shape[0],
                    i + (out_h - 1) * stride + 1,
                    j + (out_w - 1) * stride + 1,
                    xp.shape[3],
                ),
                (1, stride, stride, 1),
            )
            for j in range(kw)
        ]
        for i in range(kh)
    ]


def depthwise_conv3x3(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], ...], impl: str
) -> jax.Array:
    """3x3 depthwise convolution, both implementations.

    Args:
      x: (B, H, W, C) input.
      kernel: (3, 3, 1, C), Flax's HWIO layout for ``feature_group_count=C``.
      stride: 1 or 2.
      padding: ((top, bottom), (left, right)) zero padding.
      impl: "conv", "gemm" or "shift" (already resolved); "gemm" is the convolution here.

    Returns:
      (B, H', W', C).
    """
    if impl in ("conv", "gemm"):
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
    taps = _taps(x, kernel.shape[0], kernel.shape[1], stride, padding)
    out = None
    for i, row in enumerate(taps):
        for j, tap in enumerate(row):
            term = tap * kernel[i, j, 0]  # (B, H', W', C) * (C,)
            out = term if out is None else out + term
    return out


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], ...], impl: str
) -> jax.Array:
    """Dense (not grouped) convolution with bias-free HWIO ``kernel``, both implementations.

    "shift" has two fast CPU forms. A kernel with few input channels (the RGB stem, and the
    16-channel expansion of block 1) is a sum of kh*kw*C_in broadcast multiply-adds, which XLA
    fuses with the following BatchNorm and ReLU6 into one loop; XLA:CPU's convolution, and its
    matrix product at such a small contraction, are several times slower. Other 1x1 kernels are
    a matrix product on (B*H*W, C_in). "gemm" uses that matrix product for every 1x1 kernel.
    Anything else falls back to the XLA convolution.

    Args:
      x: (B, H, W, C_in) input.
      kernel: (kh, kw, C_in, C_out).
      stride: the same in both spatial axes.
      padding: ((top, bottom), (left, right)) zero padding.
      impl: "conv", "gemm" or "shift" (already resolved).

    Returns:
      (B, H', W', C_out).
    """
    kh, kw, c_in, c_out = kernel.shape
    if impl == "shift" and c_in <= MAX_BROADCAST_CHANNELS:
        out = None
        for i, row in enumerate(_taps(x, kh, kw, stride, padding)):
            for j, tap in enumerate(row):
                for c in range(c_in):
                    term = tap[..., c : c + 1] * kernel[i, j, c]  # (B, H', W', 1) * (C_out,)
                    out = term if out is None else out + term
        return out
    if impl in ("gemm", "shift") and (kh, kw, stride) == (1, 1, 1) and padding == ((0, 0), (0, 0)):
        b, h, w, _ = x.shape
        y = jnp.dot(x.reshape(b * h * w, c_in), kernel.reshape(c_in, c_out))  # (B*H*W, C_out)
        return y.reshape(b, h, w, c_out)
    if impl not in ("conv", "gemm", "shift"):
        raise ValueError(f"unknown conv impl {impl!r}")
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _same_padding(size: int, stride: int) -> tuple[int, int]:
    """Keras' padding for a 3x3 kernel: SAME at stride 1, ``correct_pad`` then VALID at 2."""
    return (1, 1) if stride == 1 else keras_stride2_padding(size)


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
        padding = (_same_padding(x.shape[1], self.stride), _same_padding(x.shape[2], self.stride))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return depthwise_conv3x3(x, kernel, self.stride, padding, resolve_depthwise_impl(self.impl))


class Conv(nn.Module):
    """Bias-free 1x1 or 3x3 convolution, Keras padding, variables exactly as ``nn.Conv``'s.

    ``{"kernel": (kh, kw, C_in, C_out)}`` with ``nn.Conv``'s default initializer, so weight ports
    and checkpoints do not depend on the implementation.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k not in (1, 3):
            raise ValueError(f"Conv supports 1x1 and 3x3 kernels (Keras padding), got {k}x{k}")
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )  # fmt: skip
        if k == 1:
            padding = ((0, 0), (0, 0))
        else:
            padding = (
                _same_padding(x.shape[1], self.stride),
                _same_padding(x.shape[2], self.stride),
            )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return conv2d(x, kernel, self.stride, padding, resolve_depthwise_impl(self.impl))


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
            Conv, impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype
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
        x = conv(stem_channels(self.width), kernel_size=3, stride=2, name="Conv1")(x)
        x = nn.relu6(norm(name="bn_Conv1")(x))  # (B, H/2, W/2, 32w)

        for block_id, (c_in, c_exp, c_out, stride) in enumerate(block_channels(self.width)):
            p = block_prefix(block_id)
            y = x
            if block_id:
                y = conv(c_exp, name=f"{p}expand")(y)
                y = nn.relu6(norm(name=f"{p}expand_BN")(y))
            y = dwconv(stride=stride, name=f"{p}depthwise")(y)
            y = nn.relu6(norm(name=f"{p}depthwise_BN")(y))
            y = conv(c_out, name=f"{p}project")(y)
            y = norm(name=f"{p}project_BN")(y)  # Linear bottleneck: no activation.
            x = x + y if (stride == 1 and c_in == c_out) else y

        x = conv(head_channels(self.width), name="Conv_1")(x)
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
