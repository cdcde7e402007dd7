"""Model definitions and their construction from a :class:`~har_flax.config.ModelConfig`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from har_flax.config import ModelConfig
from har_flax.models.cnn_lstm import CNNLSTM, FrameClassifier
from har_flax.models.mobilenet_v2 import MobileNetV2

__all__ = ["CNNLSTM", "FrameClassifier", "MobileNetV2", "create_model", "init_variables"]


@functools.lru_cache(maxsize=8)
def create_model(config: ModelConfig) -> CNNLSTM:
    """The CNN-LSTM that ``config`` describes.

    Cached: one config gives the same (immutable) module, so a train state's ``apply_fn`` is
    the same too, and a second run in one process reuses the jitted steps without tracing.
    """
    return CNNLSTM(
        num_classes=config.num_classes,
        width=config.width,
        lstm_units=config.lstm_units,
        lstm_dropout=config.lstm_dropout,
        head_units=tuple(config.head_units),
        head_dropout=config.head_dropout,
        depthwise_impl=config.depthwise_impl,
        bn_momentum=config.bn_momentum,
        freeze_backbone_batchnorm=config.backbone_batchnorm_frozen,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
    )


def init_variables(config: ModelConfig, rng: jax.Array) -> dict:
    """Randomly initialised variables ``{"params", "batch_stats"}`` for ``config`` (T = 1).

    Pretrained backbone weights are put in by :func:`har_flax.weights.load_pretrained_backbone`.
    """
    return _init_fn(config)(rng)


@functools.lru_cache(maxsize=8)
def _init_fn(config: ModelConfig):
    # Cached, so that a second model of one config in a process is not traced and compiled again.
    model = create_model(config)
    frames = jnp.zeros((1, 1, config.image_size, config.image_size, 3), jnp.uint8)
    return jax.jit(lambda rng: model.init(rng, frames, train=False))
