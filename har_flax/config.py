"""Frozen, typed configuration: the model, the data and the training run, with named presets.

Defaults live here and nowhere else. A resolved :class:`Config` is saved as JSON beside every
checkpoint, and loaded back with :func:`Config.from_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

# The 15 actions of the Kaggle "Human Action Recognition" dataset, in sorted order. Class names
# of a trained model always come from its data (saved with the checkpoint); this list is only the
# documented shape of the real dataset.
HAR_ACTIONS: tuple[str, ...] = (
    "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
    "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting", "using_laptop",
)  # fmt: skip

DTYPES = ("float32", "bfloat16", "float16")
DEPTHWISE_IMPLS = ("auto", "conv", "gemm", "shift")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer in [low, high]."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_float(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number in the range.

    The range is ``[low, high]``, open at either end with ``low_open``/``high_open``; no
    ``high``: at least (or above) ``low``. NaN and infinities are always refused.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if math.isfinite(value) and above and below:
        return
    if high is None:
        allowed = f"finite and {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_bool(name: str, value: Any, alternative: str = "") -> None:
    if not isinstance(value, bool):
        allowed = f"true, false or {alternative}" if alternative else "true or false"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The CNN-LSTM: MobileNetV2 per frame, an LSTM over time, a dense head."""

    num_classes: int = 15  # K: number of output classes.
    width: float = 1.0  # MobileNetV2 width multiplier (1.0 for the ImageNet weights).
    image_size: int = 224  # H = W fed to the backbone, after resizing.
    num_frames: int = 1  # T the model is trained and served with (1 = still images).
    lstm_units: int = 128  # U: LSTM cell size.
    lstm_dropout: float = 0.3  # Dropout after the LSTM.
    head_units: tuple[int, ...] = (256, 128)  # Dense + BatchNorm + ReLU + Dropout blocks.
    head_dropout: float = 0.3  # Dropout after each head block.
    dtype: str = "float32"  # Compute dtype; "bfloat16" on GPU/TPU.
    param_dtype: str = "float32"  # Parameter dtype (kept float32 for optimiser stability).
    # "conv" (all XLA convolutions), "gemm" (1x1 as matrix products), "shift" (CPU), "auto".
    depthwise_impl: str = "auto"
    bn_momentum: float = 0.99  # BatchNorm running-average momentum (Keras: 0.999 backbone).
    pretrained: str = "tflite"  # Backbone init: "tflite" (bundled), "none", or a ported dir.
    # Backbone BatchNorm in inference mode while training; None = yes for a pretrained backbone
    # (keeps its statistics, which the folded TFLite weights need), no when pretrained="none".
    freeze_backbone_batchnorm: bool | None = None

    @property
    def backbone_batchnorm_frozen(self) -> bool:
        if self.freeze_backbone_batchnorm is None:
            return self.pretrained != "none"
        return self.freeze_backbone_batchnorm

    def __post_init__(self):
        _check_int("model.num_classes", self.num_classes, 2)
        _check_float("model.width", self.width, 0.0, low_open=True)
        _check_int("model.image_size", self.image_size, 32)
        _check_int("model.num_frames", self.num_frames, 1)
        _check_int("model.lstm_units", self.lstm_units, 1)
        if not isinstance(self.head_units, tuple) or not all(
            _is_int(u) and u >= 1 for u in self.head_units
        ):
            # () is allowed: no hidden head blocks, the logits layer reads the LSTM state.
            raise ValueError(
                f"model.head_units must be a tuple of integers, each at least 1, "
                f"got {self.head_units!r}"
            )
        for name in ("lstm_dropout", "head_dropout", "bn_momentum"):
            _check_float(f"model.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.param_dtype != "float32":
            # DESIGN.md: float32 parameters, reduced-precision compute only (dtype="bfloat16").
            raise ValueError(
                f"model.param_dtype must be 'float32', got {self.param_dtype!r}; "
                "for mixed precision set dtype='bfloat16' instead"
            )
        if self.depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(
                f"model.depthwise_impl must be one of {DEPTHWISE_IMPLS}, "
                f"got {self.depthwise_impl!r}"
            )
        if self.freeze_backbone_batchnorm is not None:
            _check_bool(
                "model.freeze_backbone_batchnorm", self.freeze_backbone_batchnorm, "None (auto)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the Kaggle-layout data is and how it is split and read."""

    val_fraction: float = 0.2  # Stratified hold-out of the labelled set.
    split_seed: int = 42  # Fixes the split; saved in the work directory.
    skip_bad_images: bool = False  # Skip (and report) unreadable images instead of failing.

    def __post_init__(self):
        _check_float(
            "data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        _check_int("data.split_seed", self.split_seed, 0)
        _check_bool("data.skip_bad_images", self.skip_bad_images)


LR_SCHEDULES = ("cosine", "plateau")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation, schedule, augmentation and checkpointing."""

    seed: int = 0  # Root PRNG key; fold_in(key, step) per step.
    batch_size: int = 32  # Global batch, sharded over all devices.
    epochs: int = 30
    learning_rate: float = 1e-3  # Peak learning rate (stage 1 / single stage).
    finetune_learning_rate: float = 1e-4  # Peak rate of stage 2 (whole network).
    head_only_epochs: int = 5  # Stage 1 epochs with the backbone frozen; 0 = single stage.
    warmup_epochs: float = 1.0
    # After the warm-up, each stage's rate follows a cosine down to 1% of its peak ("cosine"),
    # or stays at the peak and is multiplied by plateau_factor whenever the validation loss
    # has not improved for plateau_patience epochs, down to plateau_min_scale x the peak
    # ("plateau": Keras' ReduceLROnPlateau, with optax.contrib.reduce_on_plateau's rule).
    lr_schedule: str = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_min_scale: float = 0.01
    weight_decay: float = 1e-4  # AdamW decoupled weight decay.
    label_smoothing: float = 0.1
    # Epochs without val-accuracy gain before stopping (stage 2's only: stage 1 never stops).
    early_stopping_patience: int = 7
    augment: bool = True  # Random resized crop, flip, colour jitter, on the accelerator.
    log_every_steps: int = 20
    # Steps with a non-finite loss or gradient are skipped (no update); this many in a row stop
    # training with an error (TrainingDivergedError) instead of wasting the rest of the run.
    max_nonfinite_steps: int = 10

    def __post_init__(self):
        # jax.random.key takes a signed 64-bit seed.
        _check_int("train.seed", self.seed, 0, 2**63 - 1)
        for name in (
            "batch_size", "epochs", "log_every_steps", "max_nonfinite_steps", "plateau_patience",
            "early_stopping_patience",
        ):  # fmt: skip
            _check_int(f"train.{name}", getattr(self, name), 1)
        # More head-only epochs than epochs is allowed: the whole run is stage 1.
        _check_int("train.head_only_epochs", self.head_only_epochs, 0)
        for name in ("learning_rate", "finetune_learning_rate"):
            _check_float(f"train.{name}", getattr(self, name), 0.0, low_open=True)
        for name in ("warmup_epochs", "weight_decay"):
            _check_float(f"train.{name}", getattr(self, name), 0.0)
        _check_float("train.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                f"got {self.lr_schedule!r}"
            )
        _check_float(
            "train.plateau_factor", self.plateau_factor, 0.0, 1.0, low_open=True, high_open=True
        )
        _check_float("train.plateau_min_scale", self.plateau_min_scale, 0.0, 1.0)
        _check_bool("train.augment", self.augment)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything one training run needs; saved as ``config.json`` beside each checkpoint."""

    name: str = "default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        if not isinstance(d, dict):
            raise ValueError(f"a config is a JSON object of settings, not {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}.get(f.name)
            kw[f.name] = _sub_from_dict(sub, d[f.name]) if sub else d[f.name]
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))


def _sub_from_dict(cls, d: dict[str, Any]):
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object of settings, not {d!r:.100}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    # JSON has no tuples; restore them where the field is a tuple.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def tiny() -> Config:
    """Seconds-per-step on a CPU: width 0.35, 32x32 images, 3 classes. For tests.

    Its convolutions are XLA's own (``depthwise_impl="conv"``): at 32 px compiling dominates
    a run on a CPU, and the train step compiles in ~18 s that way against ~28 s as "shift"
    (what "auto" picks on a CPU, for its speed at 224 px), on 2 cores.
    """
    return Config(
        name="tiny",
        model=ModelConfig(
            num_classes=3, width=0.35, image_size=32, lstm_units=16, head_units=(32, 16),
            pretrained="none", depthwise_impl="conv",
        ),
        train=TrainConfig(
            batch_size=16, epochs=3, head_only_epochs=0, warmup_epochs=0.5,
            learning_rate=3e-3, early_stopping_patience=100, log_every_steps=5,
        ),
    )  # fmt: skip


def smoke() -> Config:
    """A CPU run that shows learning: ``tiny`` for 30 epochs, about 2 minutes on 2 cores.

    What README's smoke run and the end-to-end test train on the synthetic set (100 images per
    class). From random initialisation, dropout, label smoothing and augmentation each slow
    fitting past that budget (augmentation has its own tests), and BatchNorm averages with
    momentum 0.9 settle within its ~450 steps. ``tiny`` itself (3 epochs) ends at chance
    there: it is for tests of the machinery, not of learning.
    """
    t = tiny()
    return dataclasses.replace(
        t,
        name="smoke",
        model=dataclasses.replace(t.model, head_dropout=0.0, lstm_dropout=0.0, bn_momentum=0.9),
        train=dataclasses.replace(t.train, epochs=30, augment=False, label_smoothing=0.0),
    )


def default() -> Config:
    """The DESIGN.md model at 224x224 from the bundled ImageNet weights."""
    return Config()


PRESETS = {"tiny": tiny, "smoke": smoke, "default": default}


def get_config(name: str) -> Config:
    """A preset by name, or the settings in a config JSON file (a run's ``W/config.json``).

    Raises:
      ValueError: neither a preset nor a readable config file (the presets are listed).
    """
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name)
    if path.suffix != ".json" and not path.is_file():
        raise ValueError(
            f"unknown config {name!r}; known: {sorted(PRESETS)}, or a config .json file "
            "(such as a run's W/config.json)"
        )
    try:
        return Config.from_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, or not a config's settings
        raise ValueError(f"{path} is not a har-flax config: {e}") from None


def override(config: Config, overrides: dict[str, Any]) -> Config:
    """Applies dotted overrides such as ``{"train.batch_size": 64, "model.dtype": "bfloat16"}``.

    Values are converted to the type of the field they replace; a wrong key or value is a
    ValueError naming it.
    """
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if "." in key:
            group, field = key.split(".", 1)
            groups.setdefault(group, {})[field] = value
        else:
            top[key] = value
    for group, fields in groups.items():
        if group not in ("model", "data", "train"):
            raise ValueError(f"unknown config group {group!r} in override; use model/data/train")
        sub = getattr(config, group)
        known = {f.name: f for f in dataclasses.fields(sub)}
        converted = {}
        for k, v in fields.items():
            if k not in known:
                raise ValueError(f"unknown field {group}.{k}; known: {sorted(known)}")
            optional = "None" in str(known[k].type)  # e.g. "bool | None": None means auto
            converted[k] = _convert(v, getattr(sub, k), f"{group}.{k}", optional=optional)
        config = dataclasses.replace(config, **{group: dataclasses.replace(sub, **converted)})
    if top:
        bad = set(top) - {"name"}
        if bad:
            raise ValueError(f"unknown config fields {sorted(bad)}")
        if not isinstance(top.get("name", ""), str):
            raise ValueError(f"cannot use {top['name']!r} for name (expects text)")
        config = dataclasses.replace(config, **top)
    return config


# What a setting of each type takes, in the words of a refusal: "(expects a whole number)".
_EXPECTS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "text",
    "tuple": "whole numbers separated by commas",
}


def _convert(value: Any, current: Any, key: str, optional: bool = False) -> Any:
    """Converts a CLI string to the type of ``current``; checks the type of non-strings."""
    kind = _EXPECTS.get(type(current).__name__, type(current).__name__)
    if optional:  # An optional bool ("auto" = None), the only optional fields here.
        if value is None or str(value).strip().lower() in ("none", "auto"):
            return None
        current, kind = False, "true, false or auto"
    if not isinstance(value, str):
        ok = (
            isinstance(value, bool)
            if isinstance(current, bool)
            else isinstance(value, int) and not isinstance(value, bool)
            if isinstance(current, int)
            else isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(current, float)
            else isinstance(value, (tuple, list))
            if isinstance(current, tuple)
            else isinstance(value, type(current))
        )
        if not ok:
            raise ValueError(f"cannot use {value!r} for {key} (expects {kind})")
        if isinstance(current, tuple):
            return tuple(value)
        return float(value) if isinstance(current, float) else value
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(int(x) for x in value.split(",") if x)
    except ValueError:
        raise ValueError(f"cannot use {value!r} for {key} (expects {kind})") from None
    return value
