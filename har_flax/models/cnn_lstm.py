"""The action recognizer: MobileNetV2 on every frame (vmap over time), an LSTM scan, a dense head.

Shape legend: B batch, T frames, H W C image, D backbone features, U LSTM units, K classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_flax.models.mobilenet_v2 import MobileNetV2

FRAME_AXIS_NAME = "frames"


def normalize_uint8(frames: jax.Array, dtype: Any) -> jax.Array:
    """uint8 [0, 255] -> [-1, 1], the range the MobileNetV2 ImageNet weights expect."""
    return frames.astype(dtype) / jnp.asarray(127.5, dtype) - jnp.asarray(1.0, dtype)


class CNNLSTM(nn.Module):
    """CNN-LSTM classifier. Input uint8 (B, T, H, W, 3); output float32 logits (B, K)."""

    num_classes: int
    width: float = 1.0
    lstm_units: int = 128
    lstm_dropout: float = 0.3
    head_units: tuple[int, ...] = (256, 128)
    head_dropout: float = 0.3
    depthwise_impl: str = "auto"
    bn_momentum: float = 0.99
    # Run the backbone's BatchNorm in inference mode even when training (Keras' advice for
    # fine-tuning a pretrained network): its statistics stay the pretrained ones. Essential for
    # the bundled TFLite weights, whose BatchNorm is folded into the convolutions: in training
    # mode, batch statistics would re-normalise every channel and lose its folded scale.
    freeze_backbone_batchnorm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, frames: jax.Array, train: bool = False, freeze_backbone: bool = False
    ) -> jax.Array:
        """Logits for a batch of clips.

        Args:
          frames: uint8 (B, T, H, W, 3).
          train: training mode (dropout, BatchNorm on batch statistics, which it updates).
          freeze_backbone: the backbone is not being trained (the head-only stage): its
            BatchNorm runs in inference mode, as Keras' ``trainable=False`` does, so its
            statistics neither normalise by the batch nor change. The head trains as ``train``
            says.

        Returns:
          float32 (B, K).
        """
        if frames.ndim != 5:
            raise ValueError(f"expected frames of shape (B, T, H, W, 3), got {frames.shape}")
        x = normalize_uint8(frames, self.dtype)  # (B, T, H, W, 3)

        # One set of backbone weights for every frame. BatchNorm pools its statistics over the
        # vmapped time axis too, so training statistics come from all B*T frames. (The backbone
        # has no dropout: its train flag only switches BatchNorm.)
        backbone = nn.vmap(
            MobileNetV2,
            in_axes=(1, None),
            out_axes=1,
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False, "dropout": False},
            axis_name=FRAME_AXIS_NAME,
        )(
            width=self.width,
            depthwise_impl=self.depthwise_impl,
            bn_momentum=self.bn_momentum,
            bn_axis_name=FRAME_AXIS_NAME,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="backbone",
        )
        backbone_bn_trains = train and not (self.freeze_backbone_batchnorm or freeze_backbone)
        feats = backbone(x, backbone_bn_trains)  # (B, T, D)
        # Kept only when "intermediates" is mutable: lets tests and analyses see the features.
        self.sow("intermediates", "features", feats)

        cell = nn.OptimizedLSTMCell(
            self.lstm_units, dtype=self.dtype, param_dtype=self.param_dtype, name="cell"
        )
        h = nn.RNN(cell, name="lstm")(feats)  # (B, T, U), a scan over T
        h = h[:, -1]  # (B, U): the state after the last frame
        h = nn.Dropout(self.lstm_dropout, deterministic=not train)(h)

        for i, units in enumerate(self.head_units):
            h = nn.Dense(units, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(
                h
            )
            h = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"bn_{i}",
            )(h)
            h = nn.relu(h)
            h = nn.Dropout(self.head_dropout, deterministic=not train)(h)

        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="logits"
        )(h)  # (B, K)
        return logits.astype(jnp.float32)


class FrameClassifier(nn.Module):
    """A per-frame image classifier (the built-in ImageNet model), averaged over frames.

    Input uint8 (B, T, H, W, 3); output float32 logits (B, K), the mean of the per-frame logits.
    """

    num_classes: int = 1001
    width: float = 1.0
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array, train: bool = False) -> jax.Array:
        if frames.ndim != 5:
            raise ValueError(f"expected frames of shape (B, T, H, W, 3), got {frames.shape}")
        b, t = frames.shape[:2]
        x = normalize_uint8(frames, self.dtype).reshape(b * t, *frames.shape[2:])  # (B*T, H, W, 3)
        logits = MobileNetV2(
            width=self.width,
            include_top=True,
            num_classes=self.num_classes,
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="backbone",
        )(x, train)  # (B*T, K)
        return logits.reshape(b, t, -1).astype(jnp.float32).mean(axis=1)  # (B, K)
