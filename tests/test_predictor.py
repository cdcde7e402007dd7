"""The Predictor on real model directories (tiny random models) and on the built-in default.

References are independent of the Predictor's bucketing: the Flax model applied directly to the
same frames, one sample at a time. Compilation is counted with jax.monitoring events.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from har_flax import config as cfg_lib
from har_flax.checkpoint import CheckpointError, save_model
from har_flax.cli.predict import SAMPLE_IMAGE
from har_flax.cli.predict import main as predict_main
from har_flax.images import (
    LOCAL_LIMITS,
    ImageLimits,
    ImageTooLargeError,
    InvalidImageError,
    decode_frames,
    resize_frame,
)
from har_flax.models import FrameClassifier, MobileNetV2, create_model
from har_flax.predictor import ModelInfo, Predictor, frame_indices

REPO = Path(__file__).resolve().parents[1]
COMPILE_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/core/compile/jaxpr_trace_duration",
)
CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat",
               "Siamese cat, Siamese", "lynx, catamount"}  # fmt: skip
ACTION_CLASSES = ["calling", "clapping", "cycling"]
# Probabilities of the same input through different batch sizes (different XLA kernels) agree
# to ~1e-6 on the real model (test_default_model_batches_equal_one_by_one); the tiny random
# network amplifies float rounding more. Real bugs (order, padding, softmax) move them by > 1e-2.
TOL = 2e-4


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def gif(colours, size=(40, 40)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return buf.getvalue()


# Eight colours a GIF palette holds exactly, so frame i is recognisable after decoding.
EIGHT = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
         (0, 255, 255), (255, 0, 255), (128, 128, 128), (0, 0, 0)]  # fmt: skip


@pytest.fixture(scope="module")
def compile_events():
    """Names of the compile/trace events JAX reports while the list is being watched."""
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def init_calibrated(model, seed: int, inputs: np.ndarray) -> dict:
    """Random weights, with every BatchNorm's running statistics set to those of ``inputs``.

    Weights are drawn with NumPy in the shapes the model declares (``jax.eval_shape``): a
    jitted ``model.init`` spends ~10 s compiling its random-number generators on this CPU.
    ``model`` must have a BatchNorm momentum of 0, so that one training-mode pass stores the
    batch statistics. A random network with identity statistics shrinks its activations to
    ~1e-4 by the last layer, so every probability is ~1/K and float rounding dominates;
    calibrated like a trained network, its logits are of order 1 and differ between photos.
    """
    declared = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs[:1]))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))  # kernels: (..., in, out); depthwise (3,3,1,C)
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, declared)
    _, updates = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )
    )(variables, inputs)
    return jax.tree.map(np.asarray, {"params": variables["params"], **updates})


@pytest.fixture(scope="module")
def calibration_frames(photos) -> np.ndarray:
    """The four photos at 32x32, also mirrored and upside down: uint8 (12, S, S, 3)."""
    frames = np.stack([resize_frame(decode_frames(p)[0], 32) for p in photos.values()])
    return np.concatenate([frames, frames[:, :, ::-1], frames[:, ::-1]])


@pytest.fixture(scope="module")
def action_model(tmp_path_factory, calibration_frames):
    """A tiny random CNN-LSTM (T = 4, 32x32, K = 3), calibrated, saved as a model directory."""
    config = cfg_lib.override(cfg_lib.tiny(), {"model.num_frames": 4})
    calibrating = create_model(cfg_lib.override(config, {"model.bn_momentum": 0.0}).model)
    clips = np.stack([np.roll(calibration_frames, -i, axis=0)[:4] for i in range(12)])
    variables = init_calibrated(calibrating, 1, clips)  # clips: (12, T, S, S, 3)
    path = save_model(
        tmp_path_factory.mktemp("models") / "action",
        config=config,
        classes=ACTION_CLASSES,
        variables=variables,
    )
    return path, config, variables


@pytest.fixture(scope="module")
def action_predictor(action_model, compile_events):
    path, _, _ = action_model
    before = len(compile_events)
    predictor = Predictor.load(path, batch_sizes=(1, 4))
    # Warm-up compiled every bucket (proves the event counter sees compilations at all).
    assert len(compile_events) - before >= 2
    return predictor


@pytest.fixture(scope="module")
def frame_model(tmp_path_factory, calibration_frames):
    """A tiny random per-frame classifier (32x32, K = 3) saved as an "imagenet"-kind directory."""
    config = cfg_lib.tiny()
    model = FrameClassifier(num_classes=3, width=config.model.width)
    # FrameClassifier's tree is MobileNetV2's under "backbone"; calibrate it as a MobileNetV2.
    calibrating = MobileNetV2(
        width=config.model.width, include_top=True, num_classes=3, bn_momentum=0.0
    )
    variables = init_calibrated(calibrating, 2, calibration_frames / 127.5 - 1.0)
    variables = {k: {"backbone": v} for k, v in variables.items()}
    path = save_model(
        tmp_path_factory.mktemp("models") / "frames",
        config=config,
        classes=["x", "y", "z"],
        variables=variables,
        kind="imagenet",
        metadata={"name": "tiny-frames", "version": "v7"},
    )
    return path, model, variables


@pytest.fixture(scope="module")
def frame_predictor(frame_model):
    return Predictor.load(frame_model[0], batch_sizes=(4,))


def reference_probs(model, variables, samples: np.ndarray) -> np.ndarray:
    """softmax(model.apply(...)) on (B, T, S, S, 3), with no bucketing or padding."""
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, samples)
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def as_vector(ranked, classes) -> np.ndarray:
    d = dict(ranked)
    return np.array([d[c] for c in classes])


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "t", "expected"),
    [(8, 4, [1, 3, 5, 7]), (2, 4, [0, 0, 1, 1]), (1, 3, [0, 0, 0]), (4, 4, [0, 1, 2, 3]),
     (3, 4, [0, 1, 1, 2]), (100, 1, [50])],
)  # fmt: skip
def test_frame_indices(n, t, expected):
    assert frame_indices(n, t).tolist() == expected


def test_model_info(action_predictor, frame_predictor, action_model):
    assert action_predictor.info == ModelInfo(
        name="har-cnn-lstm",
        version=action_predictor.info.version,
        kind="action",
        num_classes=3,
        num_frames=4,
        image_size=32,
    )
    assert len(action_predictor.info.version) == 12
    assert action_predictor.classes == tuple(ACTION_CLASSES)
    assert action_predictor.max_batch_size == 4
    info = frame_predictor.info
    assert (info.name, info.version, info.kind, info.num_frames) == (
        "tiny-frames", "v7", "imagenet", 1)  # fmt: skip


def test_prepare_still_and_sequences(action_predictor, photos, photo_arrays):
    still = action_predictor.prepare([photos["coffee"]])
    assert still.shape == (4, 32, 32, 3) and still.dtype == np.uint8
    expected = resize_frame(decode_frames(photos["coffee"])[0], 32)
    for frame in still:  # a still fills every time step
        np.testing.assert_array_equal(frame, expected)

    eight = action_predictor.prepare([gif(EIGHT)])  # animated: 8 frames -> 1, 3, 5, 7
    np.testing.assert_array_equal(eight[:, 16, 16], [EIGHT[i] for i in (1, 3, 5, 7)])
    two = action_predictor.prepare([png(np.full((20, 20, 3), c, np.uint8)) for c in EIGHT[:2]])
    np.testing.assert_array_equal(two[:, 5, 5], [EIGHT[i] for i in (0, 0, 1, 1)])
    # A lone bytes object is one image, not a sequence of ints.
    np.testing.assert_array_equal(action_predictor.prepare(photos["coffee"]), still)


def test_predict_is_a_sorted_distribution_equal_to_the_model(
    action_predictor, action_model, photos
):
    _, config, variables = action_model
    samples = [action_predictor.prepare([photos[n]]) for n in ("chelsea", "rocket")]
    results = action_predictor.predict_samples(samples)
    reference = reference_probs(create_model(config.model), variables, np.stack(samples))
    for ranked, ref in zip(results, reference, strict=True):
        assert sorted(c for c, _ in ranked) == sorted(ACTION_CLASSES)  # every class, once
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1) < 1e-9
        np.testing.assert_allclose(as_vector(ranked, ACTION_CLASSES), ref, atol=TOL)
    # The inputs differ, and so must the answers (a model ignoring its input would pass above).
    assert np.abs(reference[0] - reference[1]).max() > 1e-3
    alone = action_predictor.predict([photos["rocket"]])
    assert [c for c, _ in alone] == [c for c, _ in results[1]]
    np.testing.assert_allclose([p for _, p in alone], [p for _, p in results[1]], atol=TOL)


def test_variables_as_constants_or_arguments_give_the_same_answers(
    action_predictor, action_model, photos
):
    # On a CPU the default compiles the variables in as constants; passing them as arguments
    # (the accelerator default) must give the same probabilities.
    assert action_predictor._embed == (jax.default_backend() == "cpu")
    other = Predictor.load(
        action_model[0], batch_sizes=(1,), embed_variables=not action_predictor._embed
    )
    samples = [action_predictor.prepare([photos[n]]) for n in ("chelsea", "coffee")]
    for a, b in zip(
        action_predictor.predict_samples(samples), other.predict_samples(samples), strict=True
    ):
        assert [c for c, _ in a] == [c for c, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=TOL)


def test_batches_equal_one_by_one(action_predictor, photos, photo_arrays):
    # 7 samples with buckets (1, 4): split into 4 + 3 (padded to 4).
    images = [[photos[n]] for n in photos]
    images += [[png(photo_arrays["astronaut"][::-1])], [photos["chelsea"], photos["coffee"]],
               [gif(EIGHT)]]  # fmt: skip
    samples = [action_predictor.prepare(i) for i in images]
    batched = action_predictor.predict_samples(samples)
    assert len(batched) == 7
    for sample, together in zip(samples, batched, strict=True):
        (alone,) = action_predictor.predict_samples([sample])
        assert [c for c, _ in alone] == [c for c, _ in together]
        np.testing.assert_allclose([p for _, p in alone], [p for _, p in together], atol=TOL)


def test_no_compilation_after_warmup(action_predictor, frame_predictor, photos, compile_events):
    sample = action_predictor.prepare([photos["chelsea"]])
    frames = frame_predictor.prepare([gif(EIGHT[:3])])
    start = len(compile_events)
    for n in (1, 2, 3, 4, 5, 9):
        action_predictor.predict_samples([sample] * n)
    action_predictor.predict([photos["rocket"], photos["coffee"]])
    for ts in ([1], [3, 1], [8, 8, 1], [5, 5, 5, 5, 5]):  # frame counts per sample
        frame_predictor.predict_samples([np.resize(frames, (t, 32, 32, 3)) for t in ts])
    assert compile_events[start:] == []
    # The counter is live: a new jitted function in the same window is seen.
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(3)).block_until_ready()
    assert len(compile_events) > start


def test_prepare_in_many_threads_while_predicting(action_predictor, photos, photo_arrays):
    # The server's shape: request threads decode while one batcher thread runs the model.
    requests = [[photos[n]] for n in photos] * 4 + [[gif(EIGHT)], [photos["rocket"]] * 3] * 2
    expected = [action_predictor.prepare(r) for r in requests]
    expected_answers = action_predictor.predict_samples(expected)
    stop = threading.Event()

    def batcher():
        while not stop.is_set():
            # The same 4 rows through the same executable: bitwise-equal answers.
            assert action_predictor.predict_samples(expected[:4]) == expected_answers[:4]

    with ThreadPoolExecutor(8) as pool:
        model_thread = pool.submit(batcher)
        prepared = list(pool.map(action_predictor.prepare, requests))
        stop.set()
        model_thread.result()
    for got, want in zip(prepared, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert action_predictor.predict_samples(prepared) == expected_answers


def test_per_frame_model_averages_logits_over_frames(frame_predictor, frame_model, photos):
    _, model, variables = frame_model
    three = frame_predictor.prepare([gif(EIGHT[:3])])
    assert three.shape == (3, 32, 32, 3)  # every frame kept, no resampling
    still = frame_predictor.prepare([photos["chelsea"]])
    assert still.shape == (1, 32, 32, 3)
    other = frame_predictor.prepare([photos["rocket"], photos["coffee"], photos["astronaut"]])
    results = frame_predictor.predict_samples([three, still, other])
    # FrameClassifier itself on (3, T=3, ...); the still repeated 3 times has the same mean.
    ref = reference_probs(model, variables, np.stack([three, np.repeat(still, 3, axis=0), other]))
    for ranked, r in zip(results, ref, strict=True):
        np.testing.assert_allclose(as_vector(ranked, ["x", "y", "z"]), r, atol=TOL)
    assert np.abs(ref[0] - ref[1]).max() > 1e-2


def test_still_image_action_model_classifies_every_photo_and_averages(
    tmp_path, calibration_frames, photos
):
    """T = 1 (the default for the Kaggle stills): several photos all count, none is dropped."""
    config = cfg_lib.tiny()
    assert config.model.num_frames == 1
    calibrating = create_model(cfg_lib.override(config, {"model.bn_momentum": 0.0}).model)
    variables = init_calibrated(calibrating, 3, calibration_frames[:, None])  # (12, 1, S, S, 3)
    path = save_model(tmp_path / "still", config=config, classes=ACTION_CLASSES,
                      variables=variables)  # fmt: skip
    predictor = Predictor.load(path, batch_sizes=(4,))
    sample = predictor.prepare([photos["rocket"], photos["chelsea"], photos["coffee"]])
    assert sample.shape == (3, 32, 32, 3)  # all three kept, not resampled to the middle one
    [ranked] = predictor.predict_samples([sample])
    # The model itself on each photo as a one-frame sample; logits averaged, then softmax.
    model = create_model(config.model)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, sample[:, None])
    want = np.asarray(jax.nn.softmax(jnp.mean(logits.astype(jnp.float32), axis=0)))
    got = as_vector(ranked, ACTION_CLASSES)
    np.testing.assert_allclose(got, want, atol=TOL)
    middle = as_vector(predictor.predict([photos["chelsea"]]), ACTION_CLASSES)
    assert np.abs(got - middle).max() > 1e-2


def test_request_errors_name_the_field(action_predictor, photos, cat_jpeg):
    with pytest.raises(InvalidImageError) as e:
        action_predictor.prepare([])
    assert e.value.field == "images"
    with pytest.raises(InvalidImageError) as e:
        action_predictor.prepare([cat_jpeg, b"%PDF-1.7 not a photo"])
    assert e.value.field == "images[1]" and "PDF" in str(e.value)
    # Under the server's limits (strangers' uploads); the Predictor's own default is higher.
    server = copy.copy(action_predictor)
    server.limits = ImageLimits()
    with pytest.raises(ImageTooLargeError, match="65 images is over the limit of 64") as e:
        server.prepare([cat_jpeg] * 65)
    assert e.value.field == "images"
    assert action_predictor.limits == LOCAL_LIMITS
    assert action_predictor.prepare([cat_jpeg] * 65).shape == (4, 32, 32, 3)
    # The frame budget spans the request: 2 stills + a 3-frame GIF is over 4 frames.
    strict = copy.copy(action_predictor)
    strict.limits = ImageLimits(max_frames=4)
    with pytest.raises(ImageTooLargeError) as e:
        strict.prepare([cat_jpeg, cat_jpeg, gif(EIGHT[:3])])
    assert e.value.field == "images[2]"
    with pytest.raises(ValueError, match=r"expected uint8 \(4, 32, 32, 3\)"):
        action_predictor.predict_samples([np.zeros((3, 32, 32, 3), np.uint8)])


def test_prepare_says_what_to_pass_for_a_wrong_argument_type(
    action_predictor, frame_predictor, photo_arrays, cat_jpeg, tmp_path
):
    path = tmp_path / "cat.jpg"
    path.write_bytes(cat_jpeg)
    decoded = photo_arrays["chelsea"]  # (300, 451, 3): not "300 images, over the limit"
    with pytest.raises(
        TypeError, match=r"images is a decoded numpy array uint8 \(300, 451, 3\)"
    ) as e:
        action_predictor.prepare(decoded)
    message = str(e.value)
    assert "encoded image files" in message and "predict_samples()" in message
    assert "resize_frame(frame, 32)" in message and "(4, 32, 32, 3)" in message
    # Following the advice works: decoded frames through resize_frame and predict_samples.
    sample = np.stack([resize_frame(decoded, 32)] * 4)
    assert len(action_predictor.predict_samples([sample])[0]) == len(ACTION_CLASSES)
    with pytest.raises(TypeError, match=r"\(T, 32, 32, 3\)"):  # any number of frames
        frame_predictor.prepare(decoded)
    with pytest.raises(TypeError, match=r"images is a path, .*Path\(p\)\.read_bytes\(\)"):
        action_predictor.prepare(path)
    with pytest.raises(
        TypeError, match=r"images is a str \(a file path\?\).*Path\(p\)\.read_bytes\(\)"
    ):
        action_predictor.prepare(str(path))
    with (
        path.open("rb") as f,
        pytest.raises(TypeError, match=r"images is an open file.*f\.read\(\)"),
    ):
        action_predictor.prepare(f)
    with pytest.raises(TypeError, match=r"images is of type int; .*sequence of them"):
        action_predictor.prepare(7)
    # The same inside a sequence, named by position; checked before the frame limit.
    with pytest.raises(TypeError, match=r"images\[1\] is a path"):
        action_predictor.prepare([cat_jpeg, path])
    with pytest.raises(TypeError, match=r"images\[0\] is a decoded numpy array"):
        action_predictor.prepare([decoded] * 100)
    with pytest.raises(TypeError, match=r"images is a path"):  # predict() checks the same
        action_predictor.predict(path)
    with pytest.raises(TypeError, match=r"images\[0\] is a PIL image.*read_bytes\(\).*np\.asarray"):
        action_predictor.predict_each([Image.open(path)])
    with pytest.raises(TypeError, match=r"frame_indices\(n, 4\) picks 4 of n frames"):
        action_predictor.prepare(decoded)
    # What the messages suggest is accepted.
    with path.open("rb") as f:
        np.testing.assert_array_equal(
            action_predictor.prepare(f.read()), action_predictor.prepare([path.read_bytes()])
        )
    assert action_predictor.prepare((bytearray(cat_jpeg),)).shape == (4, 32, 32, 3)


def test_predict_each_answers_each_photo_as_predict_does(action_predictor, photos, cat_jpeg):
    """A notebook's batch of photos: one answer each, in order, in as few calls as can be."""
    names = ["chelsea", "coffee", "rocket"]
    batches = []
    batched = copy.copy(action_predictor)  # counts its calls of the model
    batched._logits = lambda rows: batches.append(len(rows)) or action_predictor._logits(rows)
    answers = batched.predict_each([photos[n] for n in names])
    assert len(answers) == 3 and batches == [3], batches  # one batch of the three
    for name, answer in zip(names, answers, strict=True):
        alone = action_predictor.predict(photos[name])
        assert [c for c, _ in answer] == [c for c, _ in alone]
        np.testing.assert_allclose([p for _, p in answer], [p for _, p in alone], atol=TOL)
    assert action_predictor.predict_each([]) == []
    with pytest.raises(InvalidImageError, match=r"^images\[1\]: ") as e:
        action_predictor.predict_each([cat_jpeg, b"not a photo", cat_jpeg])
    assert e.value.field == "images[1]"
    # Samples stacked into one numpy batch are a sequence of samples too.
    samples = np.stack([action_predictor.prepare(photos[n]) for n in names])  # (3, 4, S, S, 3)
    stacked = action_predictor.predict_samples(samples)
    assert [[c for c, _ in a] for a in stacked] == [[c for c, _ in a] for a in answers]


def test_model_directory_errors(tmp_path, action_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.load(tmp_path / "missing", warmup=False)
    _, config, variables = action_model
    wider = cfg_lib.override(config, {"model.width": 0.5})  # config and variables disagree
    path = save_model(tmp_path / "m", config=wider, classes=ACTION_CLASSES, variables=variables)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        Predictor.load(path, warmup=False)


def test_directory_version_is_a_content_hash(tmp_path, action_model):
    path, config, variables = action_model
    same = save_model(tmp_path / "a", config=config, classes=ACTION_CLASSES, variables=variables)
    changed = jax.tree.map(lambda a: a, variables)
    changed["params"]["logits"]["bias"] = changed["params"]["logits"]["bias"] + 1
    other = save_model(tmp_path / "b", config=config, classes=ACTION_CLASSES, variables=changed)
    v = [Predictor.load(p, warmup=False).info.version for p in (path, same, other)]
    assert v[0] == v[1] != v[2]


def test_cli_sequence_each_json_and_errors(action_model, tmp_path, photos, capsys):
    path = str(action_model[0])
    files = []
    for name in ("chelsea", "rocket"):
        files.append(tmp_path / f"{name}.jpg")
        files[-1].write_bytes(photos[name])
    assert (
        predict_main(["--model", path, "--top-k", "2", "--each", "--json", *map(str, files)]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["kind"] == "action" and len(out["predictions"]) == 2
    first = out["predictions"][0]
    assert first["images"] == [str(files[0])] and len(first["all_predictions"]) == 2
    assert first["action"] == first["all_predictions"][0]["action"] in ACTION_CLASSES

    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo")
    assert predict_main(["--model", path, str(files[0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "text" in err
    assert predict_main(["--model", path, str(tmp_path / "nope.jpg")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_each_answers_the_good_files_and_reports_the_bad(
    action_model, tmp_path, photos, capsys
):
    path = str(action_model[0])
    good, bad, folder = tmp_path / "cat.jpg", tmp_path / "notes.jpg", tmp_path / "folder"
    good.write_bytes(photos["chelsea"])
    bad.write_text("not a photo")
    folder.mkdir()
    argv = ["--model", path, "--top-k", "1", "--each", str(good), str(bad), str(folder), str(good)]
    assert predict_main(argv) == 2  # something failed: the exit says so, at the end
    captured = capsys.readouterr()
    assert captured.out.count(f"{good}:") == 2  # both good files answered, in order
    assert f"{bad}: text, not an image" in captured.err
    assert f"{folder}: is a directory, not an image file" in captured.err
    assert "2 of 4 images failed" in captured.err

    assert predict_main([*argv, "--json"]) == 2
    entries = json.loads(capsys.readouterr().out)["predictions"]
    assert [sorted(e) for e in entries] == [
        ["action", "all_predictions", "confidence", "images"],
        ["error", "images"],
        ["error", "images"],
        ["action", "all_predictions", "confidence", "images"],
    ]
    assert entries[1]["images"] == [str(bad)] and "not an image" in entries[1]["error"]


def test_cli_limits_are_flags_and_a_huge_file_is_not_read_whole(action_model, tmp_path, capsys):
    path = str(action_model[0])
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB that take no disk; reading them whole would take RAM
    assert predict_main(["--model", path, str(sparse)]) == 2
    err = capsys.readouterr().err
    assert "over the 64 MiB limit per image (raise the limit with --max-image-mb)" in err

    # 48 MP is over the server's 40 M pixels per frame, not over this command's default.
    phone = tmp_path / "phone.png"
    Image.new("L", (8000, 6000), 128).save(phone)
    assert predict_main(["--model", path, "--json", str(phone)]) == 0
    capsys.readouterr()
    assert predict_main(["--model", path, "--max-pixels", "1000000", str(phone)]) == 2
    assert "(raise the limit with --max-pixels)" in capsys.readouterr().err
    assert predict_main(["--model", path, "--max-frames", "1", str(phone), str(phone)]) == 2
    assert "(raise the limit with --max-frames)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict_main(["--model", path, "--max-pixels", "0", str(phone)])
    assert e.value.code == 2 and "--max-pixels must be positive" in capsys.readouterr().err


def test_cli_each_reads_in_order_through_one_pipe(action_model, tmp_path, photos):
    """`har-predict --each ... 2>&1 | less`: answers and errors in the order of the files."""
    good, bad = tmp_path / "cat.jpg", tmp_path / "notes.jpg"
    good.write_bytes(photos["chelsea"])
    bad.write_text("not a photo")
    proc = subprocess.run(
        [sys.executable, "-m", "har_flax.cli.predict", "--model", str(action_model[0]),
         "--top-k", "1", "--each", str(good), str(bad), str(good)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    said = {f"{good}:": "answer", "har-predict: 1 of 3 images failed": "summary"}
    error = f"har-predict: error: {bad}: text, not an image"
    lines = [
        said.get(line, "error" if line.startswith(error) else line)
        for line in proc.stdout.splitlines()
        if line.startswith((str(tmp_path), "har-"))
    ]
    assert lines == ["answer", "error", "answer", "summary"], proc.stdout


def test_cli_output_into_a_closed_pipe_ends_quietly():
    """`har-predict --json ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    sample = str(SAMPLE_IMAGE)
    proc = subprocess.Popen(  # 3 x 1001 classes: ~270 KB, far over a pipe's 64 KB buffer
        [sys.executable, "-m", "har_flax.cli.predict", "--json", "--top-k", "0", "--each",
         sample, sample, sample],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    assert proc.stdout.read(2) == b"{\n"
    proc.stdout.close()  # the writer is blocked on a full pipe: its next write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------------------------------------
# The built-in default: the real ported ImageNet MobileNetV2.


@pytest.fixture(scope="module")
def default_predictor():
    return Predictor.load(batch_sizes=(1, 2))


@pytest.mark.slow
def test_default_model_names_the_cat(default_predictor, cat_jpeg):
    info = default_predictor.info
    assert (info.name, info.kind, info.num_classes, info.image_size) == (
        "imagenet-mobilenet-v2", "imagenet", 1001, 224)  # fmt: skip
    assert default_predictor.classes[0] == "background" and len(info.version) == 12
    ranked = default_predictor.predict([cat_jpeg])
    assert len(ranked) == 1001 and abs(sum(p for _, p in ranked) - 1) < 1e-6
    assert ranked[0][0] in CAT_CLASSES and ranked[0][1] > 0.3
    # The ported weights are cached per process: loading again skips the port.
    assert Predictor.load(warmup=False).info == info


@pytest.mark.slow
def test_default_model_batches_equal_one_by_one(default_predictor, photos):
    samples = [default_predictor.prepare([photos[n]]) for n in ("chelsea", "rocket", "coffee")]
    batched = default_predictor.predict_samples(samples)  # buckets 2 + 1
    for sample, together in zip(samples, batched, strict=True):
        (alone,) = default_predictor.predict_samples([sample])
        assert alone[0][0] == together[0][0]
        a, b = (as_vector(r, default_predictor.classes) for r in (alone, together))
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert batched[0][0][0] in CAT_CLASSES and batched[0][0][0] != batched[1][0][0]


@pytest.mark.slow
def test_predict_script_classifies_the_bundled_photo():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), "--top-k", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "imagenet-mobilenet-v2" in proc.stdout and "cat.jpg" in proc.stdout
    top1 = next(line for line in lines if line.strip().startswith("1."))
    assert any(c in top1 for c in CAT_CLASSES), proc.stdout


def test_answers_are_ranked_most_probable_first_and_ties_keep_class_order():
    from har_flax.predictor import ranked

    p = np.array([0.25, 0.125, 0.25, 0.375])
    assert ranked(p, ("a", "b", "c", "d")) == [("d", 0.375), ("a", 0.25), ("c", 0.25), ("b", 0.125)]
