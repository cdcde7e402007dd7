"""The Keras .h5 port against its independent reference: Keras' own MobileNetV2 (JAX backend).

Keras builds ``MobileNetV2(weights=None)`` offline; we randomise its BatchNorm statistics so they
matter, write the legacy HDF5 layout the downloadable files use (Keras 2 weight names, like
``kernel:0``, and Keras 3 ones), port, and compare outputs. Two real-size compiles (with and
without the classifier) for the whole module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_flax.checkpoint import load_model
from har_flax.config import ModelConfig
from har_flax.models import MobileNetV2, create_model
from har_flax.weights import (
    WeightPortError,
    imagenet_labels,
    imagenet_model_config,
    load_pretrained_backbone,
)
from har_flax.weights.keras_h5 import port_keras_h5, read_keras_h5

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

# Keras 3.15 on NumPy 2 warns on every variable read; noise, not a finding.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 224
TOLERANCE = 1e-4  # max abs difference, float32


def _randomise_batchnorm(model, rng: np.random.Generator) -> None:
    """Keras initialises gamma=1, beta=0, mean=0, var=1: a port that dropped them would pass."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, c), rng.normal(0.0, 0.2, c),  # gamma, beta
                rng.normal(0.0, 0.2, c), rng.uniform(0.5, 1.5, c),  # moving mean, variance
            ])  # fmt: skip
    top = [layer for layer in model.layers if layer.name == "predictions"]
    if top:  # Keras zero-initialises the bias.
        kernel, bias = top[0].get_weights()
        top[0].set_weights([kernel, rng.normal(0.0, 0.5, bias.shape)])


def _write_keras3(model, path: Path) -> Path:
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def _keras2_name(name: str) -> str:
    """Keras 3 "block_1_depthwise/kernel" -> Keras 2 "block_1_depthwise/depthwise_kernel:0"."""
    layer, weight = name.rsplit("/", 1)
    if layer.endswith("depthwise") and weight == "kernel":
        weight = "depthwise_kernel"
    return f"{layer}/{weight}:0"


def _to_keras2(src: Path, dst: Path) -> Path:
    """Rewrites a Keras 3 legacy file with Keras 2's weight names, as in the downloaded files."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for layer in f.attrs["layer_names"]:
            group = f[_bytes(layer).decode()]
            names = [_bytes(n).decode() for n in group.attrs["weight_names"]]
            for name in names:
                group.move(name, _keras2_name(name))
            group.attrs["weight_names"] = np.array([_keras2_name(n).encode() for n in names])
    return dst


@pytest.fixture(scope="module")
def keras_models():
    """(with top, logits out; without top, average-pooled features out), the same weights."""
    top = keras.applications.MobileNetV2(weights=None, classifier_activation=None)
    _randomise_batchnorm(top, np.random.default_rng(0))
    no_top = keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3)
    )
    for layer in no_top.layers:
        if layer.weights:
            layer.set_weights(top.get_layer(layer.name).get_weights())
    return top, no_top


@pytest.fixture(scope="module")
def files(keras_models, tmp_path_factory) -> dict[str, Path]:
    top, no_top = keras_models
    d = tmp_path_factory.mktemp("keras")
    out = {
        "top_k3": _write_keras3(top, d / "top_k3.h5"),
        "no_top_k3": _write_keras3(no_top, d / "no_top_k3.h5"),
    }
    out["top_k2"] = _to_keras2(
        out["top_k3"], d / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    )
    out["no_top_k2"] = _to_keras2(
        out["no_top_k3"], d / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Random images in [-1, 1], (B, H, W, 3) float32."""
    return np.random.default_rng(1).uniform(-1.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)


def test_files_use_keras2_and_keras3_names(files):
    assert "Conv1/kernel" in read_keras_h5(files["top_k3"])["Conv1"]
    k2 = read_keras_h5(files["top_k2"])
    assert "expanded_conv_depthwise/depthwise_kernel:0" in k2["expanded_conv_depthwise"]
    assert "bn_Conv1/moving_variance:0" in k2["bn_Conv1"]


@pytest.mark.parametrize("variant", ["top", "no_top"])
def test_keras2_and_keras3_names_port_identically(files, variant):
    k2, k3 = port_keras_h5(files[f"{variant}_k2"]), port_keras_h5(files[f"{variant}_k3"])
    assert jax.tree.structure(k2) == jax.tree.structure(k3)
    jax.tree.map(np.testing.assert_array_equal, k2, k3)
    assert ("predictions" in k2["params"]) == (variant == "top")


def test_pooled_features_match_keras(files, keras_models, images):
    variables = port_keras_h5(files["no_top_k2"])  # The layout of the downloadable _no_top file.
    ours = jax.jit(MobileNetV2(include_top=False).apply)(variables, images)  # (B, 1280)
    ref = keras_models[1].predict(images, verbose=0)
    assert ours.shape == ref.shape == (2, 1280)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOLERANCE, rtol=0)
    assert np.abs(ref).max() > 0.1  # Not a vacuous comparison of near-zero features.


def test_logits_match_keras(files, keras_models, images):
    variables = port_keras_h5(files["top_k2"])
    ours = jax.jit(MobileNetV2(include_top=True, num_classes=1000).apply)(variables, images)
    ref = keras_models[0].predict(images, verbose=0)
    assert ours.shape == ref.shape == (2, 1000)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOLERANCE, rtol=0)
    assert np.abs(ref).max() > 0.1


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _bytes(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode()


def _add_layer(f):
    group = f.create_group("mystery_dense")
    group.create_dataset("mystery_dense/kernel:0", data=np.zeros((4, 4), np.float32))
    group.attrs["weight_names"] = np.array([b"mystery_dense/kernel:0"])
    f.attrs["layer_names"] = np.array([*map(_bytes, f.attrs["layer_names"]), b"mystery_dense"])


def _drop_weight(f):
    group = f["bn_Conv1"]
    del group["bn_Conv1/moving_variance:0"]
    group.attrs["weight_names"] = np.array(
        [_bytes(n) for n in group.attrs["weight_names"] if not _bytes(n).endswith(b"variance:0")]
    )


def _reshape_weight(f):
    del f["block_3_project"]["block_3_project/kernel:0"]
    f["block_3_project"].create_dataset(
        "block_3_project/kernel:0", data=np.zeros((1, 1, 144, 33), np.float32)
    )


def _rename_weight(f):
    group = f["Conv_1"]
    group.move("Conv_1/kernel:0", "Conv_1/weights:0")
    group.attrs["weight_names"] = np.array([b"Conv_1/weights:0"])


def _drop_layer(f):
    names = [_bytes(n) for n in f.attrs["layer_names"]]
    f.attrs["layer_names"] = np.array([n for n in names if n != b"block_16_project"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (_add_layer, "not in MobileNetV2: mystery_dense"),
        (_drop_weight, "'bn_Conv1' lacks weights: moving_variance"),
        (
            _reshape_weight,
            r"block_3_project/kernel: shape \(1, 1, 144, 33\), expected \(1, 1, 144, 32\)",
        ),
        (_rename_weight, "'Conv_1': unknown weight 'Conv_1/weights:0'"),
        (_drop_layer, "missing from the Keras file: block_16_project"),
    ],
    ids=["extra-layer", "missing-weight", "wrong-shape", "unknown-weight", "missing-layer"],
)
def test_tampered_files_fail_naming_the_problem(files, tmp_path, edit, message):
    bad = _edit(files["no_top_k2"], tmp_path / "bad.h5", edit)
    with pytest.raises(WeightPortError, match=message):
        port_keras_h5(bad)


def test_reader_rejects_files_that_are_not_keras_weights(tmp_path):
    with pytest.raises(WeightPortError, match="does not exist"):
        read_keras_h5(tmp_path / "absent.h5")
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_bytes(b"PK\x03\x04" + bytes(100))  # e.g. a .keras zip renamed
    with pytest.raises(WeightPortError, match="not an HDF5 file"):
        read_keras_h5(not_h5)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightPortError, match="without Keras 'layer_names'"):
        read_keras_h5(tmp_path / "other.h5")


def test_keras3_native_weights_file_is_named_as_such(keras_models, tmp_path):
    native = tmp_path / "mnv2.weights.h5"
    keras_models[0].save_weights(native)  # Keras 3's default writer, not the legacy layout
    with pytest.raises(WeightPortError, match="Keras 3's native .weights.h5 format"):
        read_keras_h5(native)


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_ports_the_keras_file_to_a_loadable_model_directory(files, tmp_path):
    out = tmp_path / "imagenet-float"
    proc = _cli("--from", "keras-h5", files["top_k2"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    config, labels, variables = load_model(out)
    assert config == imagenet_model_config(1000)
    assert labels["kind"] == "imagenet" and labels["classes"] == imagenet_labels()[1:]
    assert labels["source"] == f"keras-h5:{files['top_k2'].name}"
    expected = {k: {"backbone": v} for k, v in port_keras_h5(files["top_k2"]).items()}
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_cli_refuses_a_no_top_file_with_advice(files, tmp_path):
    proc = _cli("--from", "keras-h5", files["no_top_k2"], "--out", tmp_path / "m")
    assert proc.returncode == 1
    assert "no classifier" in proc.stderr and "model.pretrained=FILE.h5" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_load_pretrained_backbone_from_a_keras_file(files):
    model = create_model(ModelConfig(num_classes=3, pretrained="none"))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 64, 64, 3), jnp.uint8))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    out = load_pretrained_backbone(variables, files["no_top_k2"])
    ported = port_keras_h5(files["no_top_k2"])
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, out[collection]["backbone"], ported[collection])
