"""The TFLite port against its independent reference, the TFLite interpreter, on real photos.

Also the pure port's refusals, ``load_pretrained_backbone`` and ``har-port-weights --from tflite``
end to end. One real-size compile (FrameClassifier on the four photos) for the whole module.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from har_flax.checkpoint import load_model
from har_flax.config import ModelConfig
from har_flax.models import FrameClassifier, create_model
from har_flax.models.mobilenet_v2 import BN_EPSILON
from har_flax.weights import (
    BUNDLED_TFLITE,
    WeightPortError,
    imagenet_labels,
    imagenet_model_config,
    load_pretrained_backbone,
)
from har_flax.weights.tflite import NUM_CLASSES, port_ops, port_tflite, read_tflite

REPO = Path(__file__).resolve().parents[1]

SIZE = 224
CAT_CLASSES = {
    "tabby, tabby cat",
    "tiger cat",
    "Persian cat",
    "Siamese cat, Siamese",
    "Egyptian cat",
}


def resize(photo: np.ndarray) -> np.ndarray:
    """The one resize both models see: PIL bilinear to 224x224, uint8 (H, W, 3)."""
    return np.asarray(Image.fromarray(photo).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def images(photo_arrays) -> dict[str, np.ndarray]:
    return {name: resize(a) for name, a in photo_arrays.items()}


@pytest.fixture(scope="module")
def ops():
    return read_tflite(BUNDLED_TFLITE)


@pytest.fixture(scope="module")
def ported(ops):
    return port_ops(ops)


@pytest.fixture(scope="module")
def interpreter_results(images, ops) -> dict[str, dict[str, np.ndarray]]:
    """Per photo: the interpreter's dequantized probabilities and pre-softmax logits, (1001,)."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # preserve_all_tensors is "experimental"; we need one tensor
        warnings.simplefilter("ignore")
        interp = Interpreter(
            model_path=str(BUNDLED_TFLITE), num_threads=2, experimental_preserve_all_tensors=True
        )
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    # The logits are the output of the last convolution (the 1x1 classifier), before softmax.
    logits_op = [op for op in ops if op.op in ("CONV_2D", "FULLY_CONNECTED")][-1]
    logits_detail = next(
        d for d in interp.get_tensor_details() if d["index"] == logits_op.outputs[0]
    )

    def dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        return scale * (q.astype(np.float64) - zero)

    results = {}
    for name, img in images.items():
        # Quantize the float input [-1, 1] with the file's own input parameters.
        scale, zero = inp["quantization"]
        x = img.astype(np.float64) / 127.5 - 1.0
        info = np.iinfo(inp["dtype"])
        q = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], q[None])
        interp.invoke()
        results[name] = {
            "probs": dequantize(interp.get_tensor(out["index"])[0], out),
            "logits": dequantize(
                interp.get_tensor(logits_detail["index"]).reshape(-1), logits_detail
            ),
        }
    return results


@pytest.fixture(scope="module")
def flax_logits(images, ported) -> dict[str, np.ndarray]:
    """The ported weights in FrameClassifier (the served model), on the same uint8 images."""
    variables = {k: {"backbone": v} for k, v in ported.items()}
    frames = np.stack(list(images.values()))[:, None]  # (B, T=1, H, W, 3) uint8
    logits = jax.jit(FrameClassifier(num_classes=NUM_CLASSES).apply)(variables, frames)
    return dict(zip(images, np.asarray(logits), strict=True))


def test_reader_finds_the_mobilenet_v2_graph(ops):
    counts = {}
    for op in ops:
        counts[op.op] = counts.get(op.op, 0) + 1
    # SOURCE.md's facts about the file.
    assert counts["CONV_2D"] == 36 and counts["DEPTHWISE_CONV_2D"] == 17 and counts["ADD"] == 10
    for op in ops:
        if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            kernel, bias = op.weights
            assert kernel.dtype == np.float32 and bias.dtype == np.float32
            assert np.isfinite(kernel).all() and np.abs(kernel).max() > 0


def test_port_folds_batchnorm_as_identity_plus_bias(ported):
    params, stats = ported["params"], ported["batch_stats"]
    assert len(stats) == 52  # Conv1 + 17 depthwise + 17 project + 16 expand + Conv_1
    for layer, s in stats.items():
        np.testing.assert_array_equal(params[layer]["scale"], 1.0)
        np.testing.assert_array_equal(s["mean"], 0.0)
        # (x - 0) / sqrt(var + eps) must be x exactly: var + eps == 1 in float32.
        np.testing.assert_array_equal(s["var"] + np.float32(BN_EPSILON), 1.0)
    assert params["predictions"]["kernel"].shape == (1280, NUM_CLASSES)


def test_same_top1_as_the_interpreter_on_real_photos(
    interpreter_results, flax_logits, record_property
):
    labels = imagenet_labels()
    overlaps = {}
    for name, ref in interpreter_results.items():
        ours = flax_logits[name]
        ref_top5 = np.argsort(-ref["probs"], kind="stable")[:5]
        our_top5 = np.argsort(-ours, kind="stable")[:5]
        overlaps[name] = len(set(ref_top5) & set(our_top5))
        print(
            f"{name}: interpreter {[labels[i] for i in ref_top5]} / "
            f"flax {[labels[i] for i in our_top5]} (top-5 overlap {overlaps[name]}/5)"
        )
        assert our_top5[0] == ref_top5[0], (name, labels[our_top5[0]], labels[ref_top5[0]])
    record_property("top5_overlap", overlaps)
    assert labels[int(np.argmax(flax_logits["chelsea"]))] in CAT_CLASSES


def test_logits_track_the_interpreter(interpreter_results, flax_logits):
    # Int8 activations differ from float ones by quantization noise only: the logit vectors
    # correlate almost perfectly (a transposed kernel or a lost bias drops this far below).
    for name, ref in interpreter_results.items():
        corr = np.corrcoef(ref["logits"], flax_logits[name])[0, 1]
        assert corr > 0.98, (name, corr)


def _replace(ops, index, **changes):
    return [dataclasses.replace(op, **changes) if op.index == index else op for op in ops]


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda ops: [op for op in ops if op.index != 3], "expanded_conv_project"),
        (lambda ops: [*ops, ops[1]], "left over"),
        (lambda ops: _replace(ops, 5, stride=(1, 1)), "block_1_depthwise: stride"),
        (lambda ops: _replace(ops, 3, activation="RELU6"), "expanded_conv_project: activation"),
        (
            lambda ops: _replace(
                ops, 4, weights=(ops[4].weights[0][:, :, :, :8], ops[4].weights[1])
            ),
            "block_1_expand: kernel",
        ),
        (lambda ops: _replace(ops, 10, op="PAD"), r"#10 \(PAD\) is not part of MobileNetV2"),
        (lambda ops: [op for op in ops if op.op != "ADD" or op.index != 10], "ADD operators"),
        (lambda ops: [op for op in ops if op.index < 60], "ends before"),
    ],
    ids=["missing", "leftover", "stride", "activation", "shape", "unknown-op", "no-add", "short"],
)
def test_port_rejects_graphs_that_are_not_mobilenet_v2(ops, tamper, message):
    with pytest.raises(WeightPortError, match=message):
        port_ops(tamper(ops))


def test_reader_rejects_a_file_that_is_not_tflite(tmp_path):
    with pytest.raises(WeightPortError, match="does not exist"):
        read_tflite(tmp_path / "absent.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(WeightPortError, match="not a TFLite model"):
        read_tflite(bad)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_reader_names_a_damaged_tflite_file(tmp_path, damage):
    good = BUNDLED_TFLITE.read_bytes()
    bad = tmp_path / "damaged.tflite"
    # A download cut short, or the right header over garbage.
    bad.write_bytes(good[:100_000] if damage == "truncated" else good[:8] + b"\xff" * 5000)
    with pytest.raises(WeightPortError, match="damaged.tflite is a damaged TFLite file"):
        read_tflite(bad)


def test_imagenet_class_names_are_unique():
    names = imagenet_labels()
    assert len(names) == 1001 and len(set(names)) == 1001
    assert (names[135], names[518]) == ("crane (bird)", "crane (machine)")


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    """``python scripts/port_weights.py --out DIR`` (defaults: --from tflite, bundled file)."""
    out = tmp_path_factory.mktemp("ported") / "imagenet"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "port_weights.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1001 ImageNet classes" in proc.stdout
    return out


def test_cli_writes_a_model_directory_the_frame_classifier_loads(cli_model_dir):
    config, labels, variables = load_model(cli_model_dir)
    assert config == imagenet_model_config(1001)
    assert labels["kind"] == "imagenet" and labels["name"] == "imagenet-mobilenet-v2"
    assert labels["classes"] == imagenet_labels() and labels["classes"][0] == "background"
    assert labels["source"].startswith("tflite:")
    # Exactly the tree FrameClassifier.init declares, and exactly the ported values.
    declared = jax.eval_shape(
        FrameClassifier(num_classes=1001).init,
        jax.random.key(0),
        jnp.zeros((1, 1, SIZE, SIZE, 3), jnp.uint8),
    )
    assert jax.tree.structure(variables) == jax.tree.structure(declared)
    jax.tree.map(lambda a, d: np.testing.assert_equal(a.shape, d.shape), variables, declared)
    expected = {k: {"backbone": v} for k, v in port_tflite().items()}
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_cli_usage_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", "--from", "keras-h5", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "needs the .h5 file" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", str(tmp_path / "nope.tflite"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    not_tflite = tmp_path / "photo.tflite"
    not_tflite.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", str(not_tflite),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "not a TFLite model" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", str(tmp_path), "--out", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        proc.returncode == 2 and f"{tmp_path} is a directory; give the .tflite file" in proc.stderr
    )


def test_cli_never_replaces_a_directory_of_other_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.txt").write_text("precious")
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.port_weights", "--out", str(home)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "exists and is not a model directory (it holds thesis.txt)" in proc.stderr
    assert (home / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.fixture(scope="module")
def cnn_lstm_variables():
    """CNN-LSTM variables at width 1.0, as zeros: the port only needs the tree, not a compile."""
    model = create_model(ModelConfig(num_classes=4, pretrained="none"))
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 1, SIZE, SIZE, 3), jnp.uint8)
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("source", ["tflite", "cli-dir"])
def test_load_pretrained_backbone(cnn_lstm_variables, ported, cli_model_dir, source):
    src = "tflite" if source == "tflite" else cli_model_dir
    out = load_pretrained_backbone(cnn_lstm_variables, src)
    assert jax.tree.structure(out) == jax.tree.structure(cnn_lstm_variables)
    backbone = {k: dict(v) for k, v in ported.items()}
    del backbone["params"]["predictions"]
    for collection in ("params", "batch_stats"):
        jax.tree.map(
            np.testing.assert_array_equal, out[collection]["backbone"], backbone[collection]
        )
    # The LSTM and head are untouched, and the input was not modified.
    for name in ("cell", "dense_0", "logits"):
        assert out["params"][name] is cnn_lstm_variables["params"][name]
    assert not np.any(cnn_lstm_variables["params"]["backbone"]["Conv1"]["kernel"])


def test_load_pretrained_backbone_refuses_another_width():
    model = create_model(ModelConfig(num_classes=3, width=0.35, image_size=32, pretrained="none"))
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 1, 32, 32, 3), jnp.uint8)
    )
    with pytest.raises(
        ValueError,
        match=r"params/Conv1/kernel: shape \(3, 3, 3, 32\), expected \(3, 3, 3, 16\).*width 1.0",
    ):
        load_pretrained_backbone(variables, "tflite")
    with pytest.raises(ValueError, match="neither 'tflite'"):
        load_pretrained_backbone(variables, "imagenet")


def test_load_pretrained_backbone_keeps_the_models_param_dtype(cnn_lstm_variables, ported):
    variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), cnn_lstm_variables)
    out = load_pretrained_backbone(variables, "tflite")
    kernel = out["params"]["backbone"]["block_5_expand"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        kernel.astype(np.float32), ported["params"]["block_5_expand"]["kernel"], rtol=1e-2
    )
