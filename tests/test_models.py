"""The MobileNetV2 backbone and the CNN-LSTM against independent references.

References: the same backbone applied frame by frame in a Python loop (for the vmap over time), a
NumPy LSTM and dense head (for the scan and the head), the XLA convolution (for the CPU
formulation of the convolutions), and Keras' published parameter count (for the real-size
architecture). Tiny shapes (32x32, width 0.35, K=3) everywhere except the one real-size test.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_flax.config import default, tiny
from har_flax.models import CNNLSTM, FrameClassifier, MobileNetV2, create_model
from har_flax.models.cnn_lstm import normalize_uint8
from har_flax.models.mobilenet_v2 import (
    Conv,
    DepthwiseConv3x3,
    conv2d,
    depthwise_conv3x3,
    keras_stride2_padding,
    resolve_depthwise_impl,
)

B, T = 4, 3
# Momentum 0: the running statistics after one training step ARE that batch's statistics, which
# makes training-mode BatchNorm directly comparable (see the train-vs-eval tests).
CFG = dataclasses.replace(tiny().model, bn_momentum=0.0)  # K=3, width 0.35, 32x32, U=16
NO_DROPOUT = dataclasses.replace(CFG, lstm_dropout=0.0, head_dropout=0.0)
HEAD_BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default; the head does not override it.


def random_variables(model: nn.Module, *example, seed: int) -> dict:
    """Random variables for ``model`` without compiling its init (shapes from eval_shape).

    Kernels ~ N(0, 1/fan_in); every BatchNorm off the identity (scale, bias, running mean and
    variance) and every bias off 0: freshly initialised BatchNorms (scale 1, bias 0, mean 0,
    var 1) would let a model that skips or misplaces a normalisation pass these tests.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example)
    rng = np.random.default_rng(seed)

    def new(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.2, shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(new, shapes)


def backbone_variables(variables: dict) -> dict:
    """The CNN-LSTM's backbone subtree as the variables of a standalone MobileNetV2."""
    return {c: variables[c]["backbone"] for c in ("params", "batch_stats")}


def assert_close(actual, desired, rtol=1e-5, atol_rel=1e-5):
    """allclose with an absolute tolerance relative to the reference's magnitude."""
    desired = np.asarray(desired, np.float32)
    atol = atol_rel * max(float(np.abs(desired).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(actual, np.float32), desired, rtol=rtol, atol=atol)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def forward(model, variables, frames, seed, train):
    """One forward, with the updated batch_stats and the sown/captured intermediates.

    Jitted once per (model, train, shapes): the tests below share these compilations.
    """
    return model.apply(
        variables,
        frames,
        train=train,
        rngs={"dropout": jax.random.key(seed)},
        capture_intermediates=lambda mdl, _: mdl.name == "lstm",
        mutable=["batch_stats", "intermediates"],
    )


@functools.partial(jax.jit, static_argnames=("model", "train"))
def backbone_forward(model, variables, x, train):
    return model.apply(variables, x, train=train, mutable=["batch_stats"])


@pytest.fixture(scope="module")
def frames() -> jax.Array:
    """uint8 (B, T, 32, 32, 3) random frames."""
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, 256, (B, T, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def variables(frames) -> dict:
    return random_variables(create_model(CFG), frames[:, :1], seed=1)


@pytest.fixture(scope="module")
def eval_run(frames, variables):
    """One eval forward of the tiny CNN-LSTM: logits, backbone features and LSTM outputs."""
    logits, state = forward(create_model(CFG), variables, frames, 0, False)
    inter = state["intermediates"]
    return {
        "logits": logits,  # (B, K)
        "features": inter["features"][0],  # (B, T, D)
        "lstm": inter["lstm"]["__call__"][0],  # (B, T, U)
        "batch_stats": state["batch_stats"],
    }


# --- vmap over time == a Python loop over frames -------------------------------------------------


def test_vmapped_backbone_equals_frame_loop_in_eval(frames, variables, eval_run):
    backbone = MobileNetV2(width=CFG.width, bn_momentum=CFG.bn_momentum)
    x = normalize_uint8(frames, jnp.float32)  # (B, T, H, W, 3)
    bv = backbone_variables(variables)
    loop = np.stack([backbone_forward(backbone, bv, x[:, t], False)[0] for t in range(T)], 1)
    assert eval_run["features"].shape == (B, T, 1280)
    assert_close(eval_run["features"], loop)
    # The frames really differ, so a model that fed one frame to every time step would fail.
    assert not np.allclose(loop[:, 0], loop[:, 1], atol=1e-3)


def test_vmapped_backbone_pools_batchnorm_over_all_frames_in_training(frames, variables):
    _, updates = forward(create_model(CFG), variables, frames, 1, True)
    feats = updates["intermediates"]["features"][0]  # (B, T, D)

    # Reference: the plain backbone in training mode on the (B*T) batch of frames.
    backbone = MobileNetV2(width=CFG.width, bn_momentum=CFG.bn_momentum)
    x = normalize_uint8(frames, jnp.float32).reshape(B * T, 32, 32, 3)  # b-major, like (B, T)
    bv = backbone_variables(variables)
    ref_feats, ref_updates = backbone_forward(backbone, bv, x, True)
    # Training statistics of a few frames, down to 1x1 pixels in the last blocks, amplify the
    # different summation order (a mean of per-step means) up to ~1e-3 relative.
    assert_close(feats.reshape(B * T, -1), ref_feats, rtol=1e-3, atol_rel=1e-3)
    jax.tree.map(
        lambda a, b: assert_close(a, b, rtol=1e-3, atol_rel=1e-3),
        updates["batch_stats"]["backbone"],
        ref_updates["batch_stats"],
    )
    # Statistics of one time step's frames (here: step 0's frames repeated T times, which has
    # the same statistics and reuses the compilation) give other features: pooling is observable.
    x0 = np.repeat(np.asarray(x).reshape(B, T, 32, 32, 3)[:, :1], T, axis=1)
    per_step, _ = backbone_forward(backbone, bv, x0.reshape(B * T, 32, 32, 3), True)
    assert not np.allclose(per_step.reshape(B, T, -1)[:, 0], feats[:, 0], rtol=1e-2, atol=1e-2)


# --- scan over time == a step loop; the head == NumPy --------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(params: dict, xs: np.ndarray) -> np.ndarray:
    """The LSTM equations in NumPy, from OptimizedLSTMCell's parameters: (B, T, D) -> (B, T, U)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def gate(g, x, h):
        return x @ p[f"i{g}"]["kernel"] + h @ p[f"h{g}"]["kernel"] + p[f"h{g}"]["bias"]

    units = p["hi"]["bias"].shape[0]
    h = c = np.zeros((xs.shape[0], units))
    out = []
    for t in range(xs.shape[1]):
        x = xs[:, t].astype(np.float64)
        i, f = _sigmoid(gate("i", x, h)), _sigmoid(gate("f", x, h))
        g, o = np.tanh(gate("g", x, h)), _sigmoid(gate("o", x, h))
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out, 1)


def test_scanned_lstm_equals_step_loop(variables, eval_run):
    feats, scanned = eval_run["features"], eval_run["lstm"]  # (B, T, D), (B, T, U)
    params = variables["params"]["cell"]
    assert scanned.shape == (B, T, CFG.lstm_units)

    # The same flax cell stepped by hand, carry threaded through a Python loop.
    cell = nn.OptimizedLSTMCell(CFG.lstm_units)
    carry = cell.initialize_carry(jax.random.key(0), feats[:, 0].shape)
    stepped = []
    for t in range(T):
        carry, y = cell.apply({"params": params}, carry, feats[:, t])
        stepped.append(y)
    assert_close(scanned, np.stack(stepped, 1))
    # And the equations themselves, independent of flax.
    assert_close(scanned, numpy_lstm(params, np.asarray(feats)), rtol=1e-4, atol_rel=1e-4)


def test_eval_head_equals_numpy(variables, eval_run):
    """Dense + BN(running stats) + ReLU per head block, then Dense K, on the last LSTM state."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    h = np.asarray(eval_run["lstm"][:, -1], np.float64)  # (B, U)
    for i in range(len(CFG.head_units)):
        h = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
        bn, st = p[f"bn_{i}"], s[f"bn_{i}"]
        h = (h - st["mean"]) / np.sqrt(st["var"] + HEAD_BN_EPSILON) * bn["scale"] + bn["bias"]
        h = np.maximum(h, 0.0)
    logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]  # (B, K)
    assert_close(eval_run["logits"], logits, rtol=1e-4, atol_rel=1e-4)


# --- shapes and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_frames", [1, 3])
def test_output_shapes_and_dtypes(num_frames, dtype):
    model = create_model(dataclasses.replace(CFG, dtype=dtype))
    x = jax.ShapeDtypeStruct((2, num_frames, 32, 32, 3), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    # Parameters stay float32 whatever the compute dtype (optimiser stability).
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    for train in (False, True):
        out, _ = jax.eval_shape(functools.partial(forward, model, train=train, seed=0), shapes, x)
        assert (out.shape, out.dtype) == ((2, CFG.num_classes), jnp.float32)


def test_bfloat16_compute_matches_float32(frames, variables, eval_run):
    model = create_model(dataclasses.replace(CFG, dtype="bfloat16"))
    logits, _ = forward(model, variables, frames, 0, False)
    assert logits.dtype == jnp.float32 and logits.shape == (B, CFG.num_classes)
    assert np.isfinite(np.asarray(logits)).all()
    # bfloat16 keeps ~3 significant digits; 17 blocks of rounding stay well inside 10%.
    ref = np.asarray(eval_run["logits"])
    assert np.abs(np.asarray(logits) - ref).max() <= 0.1 * np.abs(ref).max()
    assert not np.array_equal(np.asarray(logits), ref)  # It really computed in bfloat16.


def test_frame_classifier_averages_per_frame_logits(frames):
    clf = FrameClassifier(num_classes=5, width=CFG.width)
    v = random_variables(clf, frames[:, :1], seed=2)
    logits = jax.jit(clf.apply)(v, frames)
    assert (logits.shape, logits.dtype) == ((B, 5), jnp.float32)
    top = MobileNetV2(width=CFG.width, include_top=True, num_classes=5)
    x = normalize_uint8(frames, jnp.float32)
    bv = backbone_variables(v)
    ref = np.mean([backbone_forward(top, bv, x[:, t], False)[0] for t in range(T)], axis=0)
    assert_close(logits, ref)


@pytest.mark.parametrize("model_cls", [CNNLSTM, FrameClassifier])
def test_wrong_input_rank_is_a_clear_error(model_cls):
    model = model_cls(num_classes=3, width=CFG.width)
    with pytest.raises(ValueError, match=r"expected frames of shape \(B, T, H, W, 3\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8))


# --- train vs eval -------------------------------------------------------------------------------


def test_eval_is_deterministic_ignores_dropout_and_keeps_statistics(frames, variables, eval_run):
    other_rng, state = forward(create_model(CFG), variables, frames, 7, False)
    np.testing.assert_array_equal(other_rng, eval_run["logits"])
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


def test_train_dropout_depends_on_the_rng(frames, variables):
    model = create_model(CFG)
    a, state = forward(model, variables, frames, 1, True)
    b, _ = forward(model, variables, frames, 1, True)
    c, _ = forward(model, variables, frames, 2, True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)
    # Training moves every running statistic.
    moved = jax.tree.map(
        lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))),
        state["batch_stats"],
        variables["batch_stats"],
    )
    assert all(jax.tree.leaves(moved))


def test_train_differs_from_eval_only_through_batchnorm_and_dropout(frames, variables):
    """With momentum 0 the updated running statistics ARE the batch statistics of this batch.

    Eval with them must then reproduce training when dropout is off: BatchNorm's statistics are
    the only other difference between the modes. With dropout on, what remains is dropout's.
    """
    model = create_model(NO_DROPOUT)
    train_logits, updated = forward(model, variables, frames, 1, True)
    stats = {"batch_stats": updated["batch_stats"]}
    eval_batch_stats, _ = forward(model, variables | stats, frames, 1, False)
    # Same tolerance as the pooled-statistics test: tiny training batches are ill-conditioned.
    assert_close(eval_batch_stats, train_logits, rtol=1e-3, atol_rel=1e-3)
    # With the earlier running statistics the modes differ: this check can see BatchNorm.
    eval_running, _ = forward(model, variables, frames, 1, False)
    assert np.abs(np.asarray(eval_running) - train_logits).max() > 0.1

    dropped, updated_d = forward(create_model(CFG), variables, frames, 1, True)
    # Dropout acts after the backbone: its statistics are the same with and without dropout.
    jax.tree.map(
        np.testing.assert_array_equal,
        updated_d["batch_stats"]["backbone"],
        updated["batch_stats"]["backbone"],
    )
    assert np.abs(np.asarray(dropped) - train_logits).max() > 0.05


# --- the CPU form ("shift") and "gemm" == the fused XLA convolutions ("conv") ---------------------


def test_resolve_depthwise_impl():
    expected = {"cpu": "shift", "gpu": "gemm"}.get(jax.default_backend(), "conv")
    assert resolve_depthwise_impl("auto") == expected
    for impl in ("conv", "gemm", "shift"):
        assert resolve_depthwise_impl(impl) == impl
    with pytest.raises(ValueError, match="'auto', 'conv', 'gemm' or 'shift'"):
        resolve_depthwise_impl("fast")


def _padding(h, w, stride):
    if stride == 1:
        return ((1, 1), (1, 1))
    return (keras_stride2_padding(h), keras_stride2_padding(w))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 8), (16, 15)])
def test_depthwise_shift_equals_grouped_conv(stride, hw):
    rng = np.random.default_rng(stride * 100 + hw[0])
    x = jnp.asarray(rng.normal(size=(2, *hw, 24)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 24)), jnp.float32)
    pad = _padding(*hw, stride)
    conv = depthwise_conv3x3(x, kernel, stride, pad, "conv")
    shift = depthwise_conv3x3(x, kernel, stride, pad, "shift")
    assert shift.shape == conv.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 24)
    assert_close(shift, conv)
    assert_close(depthwise_conv3x3(x, kernel, stride, pad, "gemm"), conv)
    # The module (which derives the padding itself) agrees too.
    params = {"params": {"kernel": kernel}}
    mods = [DepthwiseConv3x3(stride=stride, impl=i) for i in ("conv", "shift")]
    assert_close(mods[1].apply(params, x), mods[0].apply(params, x))
    assert_close(mods[0].apply(params, x), conv)


@pytest.mark.parametrize(
    ("kernel_size", "stride", "c_in", "hw"),
    [
        (1, 1, 24, (7, 8)),  # pointwise: a matrix product
        (1, 1, 16, (7, 8)),  # pointwise, few channels: broadcast multiply-adds
        (3, 2, 3, (16, 16)),  # the RGB stem, even size: Keras pads (0, 1)
        (3, 2, 3, (15, 17)),  # odd sizes: (1, 1)
        (3, 1, 24, (9, 9)),  # neither: falls back to the XLA convolution
    ],
)
def test_conv_shift_equals_xla_conv(kernel_size, stride, c_in, hw):
    rng = np.random.default_rng(kernel_size + stride + c_in)
    x = jnp.asarray(rng.normal(size=(2, *hw, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, c_in, 16)), jnp.float32)
    pad = ((0, 0), (0, 0)) if kernel_size == 1 else _padding(*hw, stride)
    conv = conv2d(x, kernel, stride, pad, "conv")
    assert_close(conv2d(x, kernel, stride, pad, "shift"), conv)
    assert_close(conv2d(x, kernel, stride, pad, "gemm"), conv)
    # The module keeps nn.Conv's variables and, for the stem, Keras' padding (== SAME here).
    ref = nn.Conv(16, (kernel_size,) * 2, strides=stride, padding="SAME", use_bias=False)
    params = {"params": {"kernel": kernel}}
    for impl in ("conv", "gemm", "shift"):
        out = Conv(16, kernel_size=kernel_size, stride=stride, impl=impl).apply(params, x)
        assert_close(out, ref.apply(params, x))


def _conv_and(impl: str, seed: int):
    """Input, the "conv" network, the same network in form ``impl``, shared random variables.

    33 is odd at every stride-2 layer (33, 17, 9, 5, 3): the asymmetric Keras padding at even
    sizes is covered by the layer tests above and by the weight-port tests at 224.
    """
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 33, 33, 3)), jnp.float32)
    conv, other = (
        MobileNetV2(width=CFG.width, include_top=True, depthwise_impl=i) for i in ("conv", impl)
    )
    return x, conv, other, random_variables(conv, x, seed=seed)


@pytest.mark.parametrize("impl", ["gemm", "shift"])
def test_mobilenet_v2_equal_under_each_impl(impl):
    x, conv, other, v = _conv_and(impl, seed=3)
    for train in (False, True):
        (a, sa), (b, sb) = (backbone_forward(m, v, x, train) for m in (conv, other))
        assert_close(b, a, rtol=1e-4, atol_rel=1e-4)
        jax.tree.map(lambda p, q: assert_close(p, q, rtol=1e-4, atol_rel=1e-4), sb, sa)


@pytest.mark.parametrize("impl", ["gemm", "shift"])
def test_mobilenet_v2_gradients_equal_under_each_impl(impl):
    """Training differentiates every form: the weight gradients must agree, layer by layer."""
    x, conv, other, v = _conv_and(impl, seed=4)

    def grads(model):
        def loss(params):
            logits, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

        return jax.jit(jax.grad(loss))(v["params"])

    ref, got = grads(conv), grads(other)
    assert len(jax.tree.leaves(ref)) == len(jax.tree.leaves(got)) > 100
    # Per leaf, relative to its norm; leaves that are zero in exact arithmetic (a BatchNorm
    # right after them cancels them) hold only rounding noise, hence the floor from the largest.
    floor = 1e-5 * max(float(np.linalg.norm(r)) for r in jax.tree.leaves(ref))
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref), strict=True
    ):
        err = float(np.linalg.norm(np.asarray(g) - np.asarray(r)))
        assert err <= 1e-4 * float(np.linalg.norm(r)) + floor, (jax.tree_util.keystr(path), err)


def test_each_impl_lowers_to_what_it_claims():
    """ "conv" is all XLA convolutions, "gemm" only the 3x3 ones, "shift" (the CPU path) none."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    texts = {}
    for impl in ("conv", "gemm", "shift"):
        model = MobileNetV2(width=CFG.width, depthwise_impl=impl)
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        texts[impl] = jax.jit(model.apply).lower(v, x).as_text()
    # 1 stem + 16 expand + 17 depthwise + 17 project + 1 head convolutions; 17 of them grouped.
    assert texts["conv"].count("stablehlo.convolution") == 52
    assert texts["conv"].count("feature_group_count = 1 :") == 35
    # "gemm": the stem and the 17 depthwise layers stay convolutions; 34 1x1 layers are dots.
    assert texts["gemm"].count("stablehlo.convolution") == 18
    assert texts["gemm"].count("stablehlo.dot_general") >= 34
    assert "stablehlo.convolution" not in texts["shift"]


# --- the real size -------------------------------------------------------------------------------


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
def test_default_model_real_size():
    cfg = default().model
    assert (cfg.width, cfg.image_size, cfg.num_classes) == (1.0, 224, 15)
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 2, 224, 224, 3)), jnp.uint8)
    model = create_model(cfg)
    variables = random_variables(model, frames, seed=4)
    # Keras MobileNetV2(include_top=False): 2,223,872 trainable (kernels, BN gamma and beta)
    # and 34,112 non-trainable (BN moving mean and variance).
    assert _count(variables["params"]["backbone"]) == 2_223_872
    assert _count(variables["batch_stats"]["backbone"]) == 34_112
    logits = jax.jit(model.apply)(variables, frames)
    assert (logits.shape, logits.dtype) == ((1, 15), jnp.float32)
    assert np.isfinite(np.asarray(logits)).all()
    # With the 1001-way ImageNet top of the bundled weights: + 1280 * 1001 + 1001.
    clf_shapes = jax.eval_shape(FrameClassifier(num_classes=1001).init, jax.random.key(0), frames)
    assert _count(clf_shapes["params"]) == 2_223_872 + 1280 * 1001 + 1001


# --- pretrained backbones keep their BatchNorm statistics while fine-tuning ----------------------


def test_frozen_backbone_batchnorm_trains_the_head_only(frames, variables, eval_run):
    frozen = dataclasses.replace(CFG, freeze_backbone_batchnorm=True)
    _, state = forward(create_model(frozen), variables, frames, 0, True)
    # The backbone runs in inference mode: eval-mode features, untouched running statistics.
    assert_close(state["intermediates"]["features"][0], eval_run["features"])
    for a, b in zip(
        jax.tree.leaves(state["batch_stats"]["backbone"]),
        jax.tree.leaves(variables["batch_stats"]["backbone"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The head's BatchNorm still trains (momentum 0: its statistics become the batch's).
    assert not np.allclose(
        state["batch_stats"]["bn_0"]["mean"], variables["batch_stats"]["bn_0"]["mean"]
    )
    # Without freezing, training mode does move the backbone (the check above can fail).
    _, unfrozen = forward(create_model(CFG), variables, frames, 0, True)
    assert not np.allclose(
        unfrozen["intermediates"]["features"][0], eval_run["features"], atol=1e-3
    )


def test_pretrained_backbones_freeze_batchnorm_by_default():
    assert default().model.backbone_batchnorm_frozen  # the bundled TFLite weights
    assert not tiny().model.backbone_batchnorm_frozen  # trained from scratch
    assert create_model(default().model).freeze_backbone_batchnorm
    explicit = dataclasses.replace(default().model, freeze_backbone_batchnorm=False)
    assert not create_model(explicit).freeze_backbone_batchnorm
