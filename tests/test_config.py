"""The typed configuration: presets, the JSON saved beside checkpoints, overrides, validation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from har_flax.config import (
    HAR_ACTIONS,
    PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    default,
    get_config,
    override,
    smoke,
    tiny,
)


def test_presets():
    assert sorted(PRESETS) == ["default", "smoke", "tiny"]
    d, t = get_config("default"), get_config("tiny")
    assert d == default() and t == tiny()
    # The DESIGN.md model: MobileNetV2 1.0 at 224 from the bundled weights, LSTM 128, 15 actions.
    assert (d.name, d.model.width, d.model.image_size, d.model.pretrained) == (
        "default", 1.0, 224, "tflite"
    )  # fmt: skip
    assert (d.model.lstm_units, d.model.head_units, d.model.num_classes) == (128, (256, 128), 15)
    assert (d.model.lstm_dropout, d.model.head_dropout) == (0.3, 0.3)
    assert len(HAR_ACTIONS) == 15 and list(HAR_ACTIONS) == sorted(HAR_ACTIONS)
    # tiny is small enough for tests: 3 classes, 32x32, width 0.35, no weights to load.
    assert (t.name, t.model.num_classes, t.model.image_size, t.model.width) == ("tiny", 3, 32, 0.35)
    assert t.model.pretrained == "none"
    # smoke is tiny trained long enough to learn the synthetic set (tests/test_end_to_end.py).
    s = get_config("smoke")
    assert s == smoke() and s.name == "smoke" and s.model.image_size == 32
    assert (s.train.epochs, s.train.augment, s.model.bn_momentum) == (30, False, 0.9)


def test_unknown_preset_lists_the_known_ones():
    known = r"\['default', 'smoke', 'tiny'\]"
    with pytest.raises(ValueError, match=rf"unknown config 'huge'; known: {known}"):
        get_config("huge")


def test_configs_are_frozen():
    c = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.model.width = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("preset", ["default", "smoke", "tiny"])
def test_json_round_trip(preset):
    c = get_config(preset)
    text = c.to_json()
    # Plain JSON (what sits beside a checkpoint), grouped like the dataclasses.
    assert set(json.loads(text)) == {"name", "model", "data", "train"}
    back = Config.from_json(text)
    assert back == c
    # Tuples survive the trip (JSON has only lists), so equality is not an accident of lists.
    assert isinstance(back.model.head_units, tuple)
    assert back.to_json() == text


def test_json_round_trip_of_an_overridden_config():
    c = override(tiny(), {"model.head_units": "64,32,8", "train.seed": "7", "name": "exp1"})
    assert Config.from_json(c.to_json()) == c


def test_from_json_fills_missing_fields_with_defaults():
    c = Config.from_json('{"name": "partial", "train": {"epochs": 2}}')
    assert c.name == "partial" and c.train.epochs == 2
    assert c.model == ModelConfig() and c.data == DataConfig()
    assert dataclasses.replace(c.train, epochs=TrainConfig().epochs) == TrainConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"modle": {}}', r"unknown config keys: \['modle'\]"),
        ('{"model": {"widht": 1.0}}', r"unknown ModelConfig keys: \['widht'\]"),
        ('{"train": {"batch": 3}}', r"unknown TrainConfig keys: \['batch'\]"),
        ('{"model": {"num_classes": 1}}', "num_classes must be at least 2, got 1"),
    ],
)
def test_from_json_rejects_unknown_keys_and_invalid_values(text, message):
    with pytest.raises(ValueError, match=message):
        Config.from_json(text)


def test_override_converts_strings_to_the_field_type():
    c = override(
        default(),
        {
            "train.batch_size": "64",
            "train.learning_rate": "3e-4",
            "train.augment": "off",
            "model.dtype": "bfloat16",
            "model.head_units": "512,256",
            "model.width": "0.5",
            "data.skip_bad_images": "yes",
            "name": "run-2",
        },
    )
    assert c.train.batch_size == 64 and isinstance(c.train.batch_size, int)
    assert c.train.learning_rate == 3e-4
    assert c.train.augment is False and c.data.skip_bad_images is True
    assert c.model.dtype == "bfloat16" and c.model.head_units == (512, 256)
    assert c.model.width == 0.5 and c.name == "run-2"
    # Everything else keeps its default, and the input config is unchanged.
    assert c.train.epochs == default().train.epochs
    assert default().train.batch_size == 32


def test_override_freeze_backbone_batchnorm_takes_bool_or_auto():
    off = override(default(), {"model.freeze_backbone_batchnorm": "false"})
    assert off.model.freeze_backbone_batchnorm is False and not off.model.backbone_batchnorm_frozen
    auto = override(off, {"model.freeze_backbone_batchnorm": "auto"})
    assert auto.model.freeze_backbone_batchnorm is None and auto.model.backbone_batchnorm_frozen
    assert Config.from_json(off.to_json()) == off


def test_override_accepts_typed_values_and_an_empty_dict():
    c = override(tiny(), {"train.epochs": 9, "model.head_units": (8,)})
    assert c.train.epochs == 9 and c.model.head_units == (8,)
    assert override(tiny(), {}) == tiny()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modle.width": "1"}, "unknown config group 'modle' in override; use model/data/train"),
        ({"model.widht": "1"}, r"unknown field model.widht; known: \[.*'width'"),
        ({"epochs": "3"}, r"unknown config fields \['epochs'\]"),
        (
            {"train.batch_size": "lots"},
            r"cannot use 'lots' for train.batch_size \(expects a whole number\)",
        ),
        ({"model.width": "wide"}, r"cannot use 'wide' for model.width \(expects a number\)"),
        (
            {"train.augment": "maybe"},
            r"cannot use 'maybe' for train.augment \(expects true or false\)",
        ),
        (
            {"model.head_units": "64,x"},
            r"cannot use '64,x' for model.head_units \(expects whole numbers separated by commas\)",
        ),
        # Typed (non-string) values are checked too, not passed through.
        ({"train.epochs": 2.5}, r"cannot use 2.5 for train.epochs \(expects a whole number\)"),
        ({"train.augment": 1}, r"cannot use 1 for train.augment \(expects true or false\)"),
        ({"model.width": True}, r"cannot use True for model.width \(expects a number\)"),
        ({"name": 5}, r"cannot use 5 for name \(expects text\)"),
        (
            {"model.freeze_backbone_batchnorm": "maybe"},
            r"cannot use 'maybe' for model.freeze_backbone_batchnorm "
            r"\(expects true, false or auto\)",
        ),
        # Converted fine, then refused by the dataclass's own validation.
        ({"model.num_classes": "1"}, "num_classes must be at least 2, got 1"),
        ({"model.depthwise_impl": "fast"}, "depthwise_impl must be one of"),
        ({"data.val_fraction": "1.5"}, r"val_fraction must be in \(0, 1\), got 1.5"),
    ],
)
def test_override_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        override(tiny(), overrides)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ModelConfig, {"num_classes": 1}, "num_classes must be at least 2"),
        (ModelConfig, {"width": 0.0}, r"model.width must be finite and > 0, got 0.0"),
        (ModelConfig, {"image_size": 16}, "image_size must be at least 32"),
        (ModelConfig, {"num_frames": 0}, "num_frames must be at least 1"),
        (ModelConfig, {"dtype": "float64"}, r"dtype must be one of \('float32'"),
        (ModelConfig, {"param_dtype": "int8"}, "param_dtype must be .float32."),
        (ModelConfig, {"param_dtype": "bfloat16"}, "set dtype=.bfloat16. instead"),
        (ModelConfig, {"depthwise_impl": "fast"}, "depthwise_impl must be one of"),
        (ModelConfig, {"lstm_dropout": 1.0}, r"lstm_dropout must be in \[0, 1\)"),
        (ModelConfig, {"head_dropout": -0.1}, r"head_dropout must be in \[0, 1\)"),
        (DataConfig, {"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
        (
            TrainConfig,
            {"lr_schedule": "step"},
            "lr_schedule must be one of cosine, plateau, got 'step'",
        ),
        (TrainConfig, {"plateau_factor": 1.0}, r"plateau_factor must be in \(0, 1\), got 1.0"),
        (TrainConfig, {"plateau_patience": 0}, "plateau_patience must be at least 1, got 0"),
        (TrainConfig, {"plateau_min_scale": -0.1}, r"plateau_min_scale must be in \[0, 1\]"),
    ],
)
def test_validation_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
    cls()  # The defaults themselves are valid.


# Each refused as the CLI's --set passes it (a string), with a message naming the setting and
# what it allows; har-train turns these into "har-train: error: ..." with exit status 2.
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.lstm_units", "0", "model.lstm_units must be at least 1, got 0"),
        (
            "model.head_units",
            "256,0",
            r"model.head_units must be a tuple of integers, each at least 1",
        ),
        ("model.head_units", "-4", r"model.head_units must be .*, got \(-4,\)"),
        ("model.width", "nan", r"model.width must be finite and > 0, got nan"),
        ("model.width", "inf", r"model.width must be finite and > 0, got inf"),
        ("model.width", "-1", r"model.width must be finite and > 0, got -1.0"),
        ("model.num_classes", "1", "model.num_classes must be at least 2, got 1"),
        ("model.image_size", "31", "model.image_size must be at least 32, got 31"),
        ("model.num_frames", "0", "model.num_frames must be at least 1, got 0"),
        ("model.bn_momentum", "2", r"model.bn_momentum must be in \[0, 1\), got 2.0"),
        ("model.bn_momentum", "1", r"model.bn_momentum must be in \[0, 1\), got 1.0"),
        ("model.bn_momentum", "-0.1", r"model.bn_momentum must be in \[0, 1\)"),
        ("model.bn_momentum", "nan", r"model.bn_momentum must be in \[0, 1\), got nan"),
        ("model.lstm_dropout", "1", r"model.lstm_dropout must be in \[0, 1\), got 1.0"),
        ("model.lstm_dropout", "nan", r"model.lstm_dropout must be in \[0, 1\), got nan"),
        ("model.head_dropout", "-0.1", r"model.head_dropout must be in \[0, 1\), got -0.1"),
        ("data.split_seed", "-1", "data.split_seed must be at least 0, got -1"),
        ("data.val_fraction", "nan", r"data.val_fraction must be in \(0, 1\), got nan"),
        ("data.val_fraction", "1", r"data.val_fraction must be in \(0, 1\), got 1.0"),
        ("train.seed", "-1", r"train.seed must be in \[0, 9223372036854775807\], got -1"),
        ("train.seed", str(2**63), r"train.seed must be in \[0, 9223372036854775807\]"),
        ("train.learning_rate", "nan", "train.learning_rate must be finite and > 0, got nan"),
        ("train.learning_rate", "inf", "train.learning_rate must be finite and > 0, got inf"),
        ("train.learning_rate", "-0.01", "train.learning_rate must be finite and > 0, got -0.01"),
        ("train.learning_rate", "0", "train.learning_rate must be finite and > 0, got 0.0"),
        ("train.finetune_learning_rate", "nan", "train.finetune_learning_rate must be finite"),
        ("train.finetune_learning_rate", "0", "train.finetune_learning_rate must be .* > 0"),
        ("train.weight_decay", "-1e-4", "train.weight_decay must be finite and >= 0, got -0.0001"),
        ("train.weight_decay", "nan", "train.weight_decay must be finite and >= 0, got nan"),
        ("train.weight_decay", "inf", "train.weight_decay must be finite and >= 0, got inf"),
        ("train.label_smoothing", "5", r"train.label_smoothing must be in \[0, 1\), got 5.0"),
        ("train.label_smoothing", "1", r"train.label_smoothing must be in \[0, 1\), got 1.0"),
        ("train.label_smoothing", "nan", r"train.label_smoothing must be in \[0, 1\)"),
        ("train.warmup_epochs", "-1", "train.warmup_epochs must be finite and >= 0, got -1.0"),
        ("train.warmup_epochs", "inf", "train.warmup_epochs must be finite and >= 0, got inf"),
        ("train.warmup_epochs", "nan", "train.warmup_epochs must be finite and >= 0, got nan"),
        ("train.head_only_epochs", "-1", "train.head_only_epochs must be at least 0, got -1"),
        ("train.early_stopping_patience", "0", "train.early_stopping_patience must be at least 1"),
        ("train.epochs", "0", "train.epochs must be at least 1, got 0"),
        ("train.batch_size", "-8", "train.batch_size must be at least 1, got -8"),
        ("train.log_every_steps", "0", "train.log_every_steps must be at least 1, got 0"),
        ("train.max_nonfinite_steps", "0", "train.max_nonfinite_steps must be at least 1"),
        ("train.plateau_patience", "0", "train.plateau_patience must be at least 1, got 0"),
        ("train.plateau_factor", "nan", r"train.plateau_factor must be in \(0, 1\), got nan"),
        ("train.plateau_min_scale", "nan", r"train.plateau_min_scale must be in \[0, 1\]"),
    ],
)
def test_override_refuses_out_of_range_settings(key, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        override(tiny(), {key: value})
    with pytest.raises(ValueError, match=f"^{message}"):
        override(default(), {key: value})


# The edges of each range that are allowed, and the values the presets, README, scripts and
# tests pass with --set or override().
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.head_units", ""),  # no hidden head blocks: the logits read the LSTM state
        ("model.head_units", "1"),
        ("model.lstm_units", "1"),
        ("model.width", "1e-3"),
        ("model.width", "1.4"),
        ("model.num_classes", "2"),
        ("model.image_size", "32"),
        ("model.bn_momentum", "0"),
        ("model.bn_momentum", "0.999"),
        ("model.lstm_dropout", "0"),
        ("model.head_dropout", "0.99"),
        ("data.split_seed", "0"),
        ("data.val_fraction", "0.01"),
        ("train.seed", "0"),
        ("train.seed", str(2**63 - 1)),
        ("train.learning_rate", "1e30"),  # tests/test_train.py's divergence test
        ("train.learning_rate", "1e-12"),
        ("train.finetune_learning_rate", "1e-12"),
        ("train.weight_decay", "0"),
        ("train.label_smoothing", "0"),
        ("train.label_smoothing", "0.99"),
        ("train.warmup_epochs", "0"),
        ("train.warmup_epochs", "0.5"),
        ("train.warmup_epochs", "100"),  # longer than the run: the schedule clamps it
        ("train.head_only_epochs", "0"),  # single stage
        ("train.head_only_epochs", "100"),  # more than epochs: the whole run is stage 1
        ("train.early_stopping_patience", "1"),
        ("train.plateau_min_scale", "0"),
        ("train.plateau_min_scale", "1"),
    ],
)
def test_override_accepts_the_edges_of_each_range(key, value):
    group, field = key.split(".")
    got = getattr(getattr(override(tiny(), {key: value}), group), field)
    if field == "head_units":
        assert got == tuple(int(x) for x in value.split(",") if x)
    else:
        assert got == (int(value) if isinstance(got, int) else float(value))


def test_typed_values_are_checked_too():
    # Python callers and config.json bypass the CLI's conversion; the dataclasses still check.
    for cls, kwargs, message in [
        (ModelConfig, {"width": float("nan")}, "model.width must be finite and > 0, got nan"),
        (ModelConfig, {"lstm_units": 0}, "model.lstm_units must be at least 1, got 0"),
        (ModelConfig, {"head_units": [8]}, r"model.head_units must be a tuple .*, got \[8\]"),
        (ModelConfig, {"head_units": (8.0,)}, r"model.head_units must be a tuple of integers"),
        (ModelConfig, {"freeze_backbone_batchnorm": 1}, "model.freeze_backbone_batchnorm must be"),
        (DataConfig, {"split_seed": 1.5}, "data.split_seed must be an integer, got 1.5"),
        (DataConfig, {"skip_bad_images": "yes"}, "data.skip_bad_images must be true or false"),
        (TrainConfig, {"epochs": 2.0}, "train.epochs must be an integer, got 2.0"),
        (TrainConfig, {"learning_rate": "1e-3"}, "train.learning_rate must be a number"),
        (TrainConfig, {"weight_decay": True}, "train.weight_decay must be a number, got True"),
        (TrainConfig, {"augment": "false"}, "train.augment must be true or false, got 'false'"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)
    with pytest.raises(ValueError, match="train.label_smoothing must be in"):
        Config.from_json('{"train": {"label_smoothing": 5}}')
    # Integers where a float is expected are fine (tests/test_train.py: warmup_epochs=1), and
    # so are numpy scalars (a class count computed with numpy).
    assert TrainConfig(warmup_epochs=1, weight_decay=0).warmup_epochs == 1
    assert ModelConfig(num_classes=np.int64(4), width=np.float32(0.5)).num_classes == 4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_pass_their_own_validation(preset):
    c = get_config(preset)
    # Rebuilding each group from its fields runs __post_init__ again on exactly these values.
    for group in (c.model, c.data, c.train):
        assert dataclasses.replace(group) == group


def test_configs_require_keywords():
    with pytest.raises(TypeError):
        ModelConfig(3)  # type: ignore[misc]
