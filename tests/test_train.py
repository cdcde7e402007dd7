"""Training: schedules, the frozen stage, a resumed run ending where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tqdm
from PIL import Image

from har_flax import sharding, train
from har_flax.checkpoint import load_model
from har_flax.config import TrainConfig, get_config, override, tiny
from har_flax.data import ArraySource, load_splits
from har_flax.data.synthetic import write_synthetic_kaggle
from har_flax.models import create_model, init_variables

# Small and fast: 4 steps of 8 images per epoch.
CONFIG = override(
    tiny(),
    {
        "train.batch_size": 8,
        "train.epochs": 3,
        "model.bn_momentum": 0.9,
        "train.log_every_steps": 2,
    },
)
TIMING_KEYS = ("images_per_sec", "epoch_seconds")
# Two stages (one head-only epoch of 4 steps), no warm-up (stage 2's first step is at its peak
# rate) and no augmentation (so that _reference_loss needs no augmentation).
TWO_STAGE = override(
    CONFIG, {"train.head_only_epochs": 1, "train.warmup_epochs": 0.0, "train.augment": False}
)
# The same under the plateau rule, for 5 epochs: at this stage-2 rate the validation loss
# stalls in stage 2, so the rule lowers the rate (the plateau test needs a run where it does).
PLATEAU = override(
    TWO_STAGE,
    {"train.lr_schedule": "plateau", "train.plateau_patience": 1, "train.epochs": 5,
     "train.finetune_learning_rate": 3e-3},
)  # fmt: skip
# Compiling one of these train steps takes ~20 s on 2 CPU cores, and each configuration is a
# program of its own (its schedule and settings are constants in it). So the tests share few
# configurations (CONFIG, TWO_STAGE, PLATEAU) and run steps the way fit places them
# (_on_mesh): a test calling a step runs the very program a fit of that configuration compiled.


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_synthetic_kaggle(root / "data", train_per_class=14, test_count=3, seed=2)
    s = load_splits(data, root / "split", image_size=32, data_config=CONFIG.data)
    assert train.steps_per_epoch(len(s.train), 8) == 4
    return s


def _batch(splits):
    images, labels = splits.train.get_batch(np.arange(8))
    return {"image": images[:, None], "label": labels}


def _on_mesh(state, batch=None):
    """``state`` (and ``batch``) placed as :func:`train.fit` places them."""
    mesh = sharding.make_mesh()
    state = sharding.replicate(state, mesh)
    if batch is None:
        return state
    return state, sharding.shard_batch(batch, mesh, len(batch["label"]))


@functools.cache
def _reference_loss_fn(model_config):
    """The training loss by its definition: label-smoothed cross-entropy of the model in
    training mode, with the dropout key of step ``step`` of the run seeded by key(0).

    ``(variables, batch, step, label_smoothing) -> loss``, jitted: run op by op, MobileNetV2's
    few hundred operations take ~30 s of small compilations here.
    """
    model = create_model(model_config)

    def loss(variables, batch, step, label_smoothing):
        _, dropout_key = jax.random.split(jax.random.fold_in(jax.random.key(0), step))
        logits, _ = model.apply(variables, batch["image"], train=True,
                                rngs={"dropout": dropout_key}, mutable=["batch_stats"])  # fmt: skip
        targets = optax.smooth_labels(
            jax.nn.one_hot(batch["label"], model_config.num_classes), label_smoothing
        )
        return optax.softmax_cross_entropy(logits, targets).mean()

    return jax.jit(loss)


def _reference_loss(config, variables, batch, step, model_config=None):
    """The loss of ``config`` (its model unless ``model_config`` is given), as a float."""
    loss = _reference_loss_fn(model_config or config.model)
    return float(loss(variables, batch, step, config.train.label_smoothing))


@functools.cache
def _reference_grad_fn(model_config):
    """The gradient of :func:`_reference_loss_fn` in the parameters, jitted."""
    loss = _reference_loss_fn(model_config)
    return jax.jit(
        jax.grad(lambda params, variables, batch, step, smoothing:
                 loss({**variables, "params": params}, batch, step, smoothing))
    )  # fmt: skip


def test_two_stage_schedules():
    cfg = TrainConfig(epochs=4, head_only_epochs=2, warmup_epochs=0.5, learning_rate=1e-2,
                      finetune_learning_rate=1e-3)  # fmt: skip
    head, backbone = train.learning_rate_schedules(cfg, steps_per_epoch=10)
    # Stage 1 (steps 0-19): the backbone's rate is 0; the head warms up to 1e-2 in 5 steps.
    assert all(float(backbone(s)) == 0.0 for s in range(20))
    assert float(head(5)) == pytest.approx(1e-2, rel=1e-3)
    # Stage 2 (steps 20-39): both warm up again to the fine-tuning rate, then decay.
    assert float(head(25)) == pytest.approx(1e-3, rel=1e-3)
    assert float(backbone(25)) == pytest.approx(1e-3, rel=1e-3)
    assert float(backbone(39)) < 2e-4
    single_head, single_backbone = train.learning_rate_schedules(
        TrainConfig(epochs=4, head_only_epochs=0, warmup_epochs=1, learning_rate=1e-2), 10
    )
    assert float(single_backbone(10)) == float(single_head(10)) == pytest.approx(1e-2)


def test_plateau_schedules_hold_the_peak_after_the_warm_up():
    cfg = TrainConfig(epochs=4, head_only_epochs=2, warmup_epochs=0.5, learning_rate=1e-2,
                      finetune_learning_rate=1e-3, lr_schedule="plateau")  # fmt: skip
    head, backbone = train.learning_rate_schedules(cfg, steps_per_epoch=10)
    assert float(head(0)) == 0.0 and float(head(5)) == pytest.approx(1e-2, rel=1e-3)
    assert float(head(19)) == pytest.approx(1e-2)  # no decay: the plateau rule scales it
    assert float(backbone(19)) == 0.0 and float(backbone(20)) == 0.0  # stage 2 warms up again
    assert float(head(39)) == float(backbone(39)) == pytest.approx(1e-3)


def test_the_plateau_rule_advances_once_per_epoch_and_restarts_for_stage_two():
    cfg = override(CONFIG, {"train.lr_schedule": "plateau", "train.plateau_patience": 2})
    params = {"backbone": {"kernel": np.ones((2, 2), np.float32)}, "logits": {"bias": np.ones(2)}}
    tx = train.make_optimizer(cfg.train, 4)
    state = train.TrainState.create(apply_fn=None, params=params, batch_stats={}, tx=tx)
    scales = []
    for val_loss in (1.0, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8):
        state = train._advance_plateau(cfg.train, state, val_loss, restart=False)
        scales.append(float(train.plateau_scale(cfg.train, state.opt_state)))
    # Halved after 2 epochs without a lower loss, then after 2 more, ... down to 1% of the peak.
    assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625,
                      0.03125, 0.03125]  # fmt: skip
    for _ in range(6):
        state = train._advance_plateau(cfg.train, state, 0.8, restart=False)
    assert float(train.plateau_scale(cfg.train, state.opt_state)) == pytest.approx(0.01)
    state = train._advance_plateau(cfg.train, state, 0.8, restart=True)
    assert float(train.plateau_scale(cfg.train, state.opt_state)) == 1.0
    assert float(train.plateau_scale(CONFIG.train, state.opt_state)) == 1.0  # "cosine"


def _keras_plateau_scales(val_losses, factor, patience, min_scale, rtol=1e-4):
    """The scale in force during each epoch, by Keras' ReduceLROnPlateau (mode "min")."""
    scale, best, wait, scales = 1.0, float("inf"), 0, []
    for loss in val_losses:
        scales.append(scale)
        if loss < best * (1 - rtol):
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                scale, wait = max(scale * factor, min_scale), 0
    return scales


def test_a_plateau_run_lowers_its_rate_as_keras_would_and_resumes_in_either_stage(
    splits, tmp_path, caplog
):
    # The first test to train PLATEAU, so its programs compile in this run (checked below).
    cfg, tc = PLATEAU, PLATEAU.train
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        whole = train.fit(cfg, tmp_path / "whole", splits=splits, progress_bar=False)
    # Stage 1 (the head-only epoch) at the head's rate; the rule starts over for stage 2, at
    # stage 2's own peak rate.
    losses = [r["val_loss"] for r in whole.history]
    scales = [1.0] + _keras_plateau_scales(losses[1:], tc.plateau_factor, tc.plateau_patience,
                                           tc.plateau_min_scale)  # fmt: skip
    assert scales[-1] < 1, scales  # this run's validation loss stalls, so the rate came down
    peaks = [tc.learning_rate] + [tc.finetune_learning_rate] * (tc.epochs - 1)
    assert [r["learning_rate"] for r in whole.history] == pytest.approx(
        [p * s for p, s in zip(peaks, scales, strict=True)], rel=1e-6
    )
    assert "validation loss not lower for 1 epoch: learning rate x0.5" in caplog.text
    # This configuration's steps compile in epochs 1 (frozen) and 2 (seconds, against a
    # fraction of a second per epoch): the epochs' times and images/s leave them out.
    compiled = float(re.search(r"compiling took ([\d.]+) s", caplog.text)[1])
    seconds = [r["epoch_seconds"] for r in whole.history]
    assert compiled > 5 and max(seconds[:2]) < 1 + 2 * max(seconds[2:]), (compiled, seconds)

    # The rule's state is part of the checkpoint, and the backbone's optimiser counts only
    # stage 2's steps: stopped in stage 1, then in stage 2, and resumed, the run ends where the
    # uninterrupted one did.
    parts = tmp_path / "parts"
    for stop in (2, 6):
        result = train.fit(cfg, parts, splits=splits, max_steps=stop, progress_bar=False)
        assert result.interrupted and int(result.state.step) == stop
    resumed = train.fit(cfg, parts, splits=splits, progress_bar=False)
    assert resumed.finished and _strip(resumed.history) == _strip(whole.history)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get((resumed.state.params, resumed.state.batch_stats, resumed.state.opt_state)),
        jax.device_get((whole.state.params, whole.state.batch_stats, whole.state.opt_state)),
    )
    counts = jax.device_get(train._schedule_counts(resumed.state.opt_state))
    assert {k: int(v) for k, v in counts.items()} == {"head": 20, "backbone": 16}


def test_frozen_stage_changes_the_head_only(splits):
    assert not TWO_STAGE.model.backbone_batchnorm_frozen  # so only the frozen stage keeps them
    state, batch = _on_mesh(train.create_train_state(TWO_STAGE, 4), _batch(splits))
    before = jax.device_get((state.params, state.batch_stats))
    step = train.make_train_step(TWO_STAGE, 4, freeze_backbone=True)
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(0))
    after = jax.device_get((state.params, state.batch_stats))
    # Frozen: the backbone's weights and its BatchNorm statistics, bit for bit.
    for a, b in zip(after, before, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a["backbone"], b["backbone"])
    (params, stats), (params0, stats0) = after, before
    assert not np.allclose(params["logits"]["kernel"], params0["logits"]["kernel"])
    assert not np.allclose(params["cell"]["ii"]["kernel"], params0["cell"]["ii"]["kernel"])
    assert not np.allclose(stats["bn_0"]["mean"], stats0["bn_0"]["mean"])  # the head's trains
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


def test_frozen_stage_runs_the_backbone_batchnorm_in_inference_mode(splits):
    # As Keras' trainable=False: a frozen backbone normalises with its running statistics and
    # does not update them, even where the model's training mode trains them (here: stage 2).
    cfg, batch = TWO_STAGE, _batch(splits)
    state = train.create_train_state(cfg, 4)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    state, metrics = train.make_train_step(cfg, 4, freeze_backbone=True)(
        *_on_mesh(state, batch), jax.random.key(0)
    )
    inference = dataclasses.replace(cfg.model, freeze_backbone_batchnorm=True)
    expected = _reference_loss(cfg, variables, batch, 0, model_config=inference)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    # The two modes differ on this batch, so the comparison above tells them apart.
    assert abs(_reference_loss(cfg, variables, batch, 0) - expected) > 1e-3
    after = jax.device_get(state.batch_stats)
    jax.tree.map(
        np.testing.assert_array_equal, after["backbone"], variables["batch_stats"]["backbone"]
    )


@pytest.mark.parametrize("cfg", [TWO_STAGE, PLATEAU], ids=["cosine", "plateau"])
def test_stage_two_starts_the_backbone_optimiser_afresh(splits, cfg):
    # Stage 1 must leave the backbone's AdamW untouched (its step count included), so that
    # stage 2's first backbone update is that of a fresh AdamW on the same gradients: Adam's
    # bias correction makes it about the learning rate per weight, whatever the gradient's size.
    tc, host_batch = cfg.train, _batch(splits)
    state, batch = _on_mesh(train.create_train_state(cfg, 4), host_batch)
    frozen = train.make_train_step(cfg, 4, freeze_backbone=True)
    for _ in range(4):  # the head-only epoch
        state, _ = frozen(state, batch, jax.random.key(0))
    if tc.lr_schedule == "plateau":  # as fit does at the end of stage 1
        state = train._advance_plateau(tc, state, 1.0, restart=True)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    grads = _reference_grad_fn(cfg.model)(
        variables["params"], variables, host_batch, 4, tc.label_smoothing
    )["backbone"]
    state, metrics = train.make_train_step(cfg, 4)(state, batch, jax.random.key(0))
    assert int(metrics["step"]) == 4 and not bool(metrics["skipped"])

    lr = tc.finetune_learning_rate  # stage 2's schedule at its first step (no warm-up)
    fresh = optax.adamw(lr, weight_decay=tc.weight_decay,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))  # fmt: skip
    w0 = variables["params"]["backbone"]
    # (jitted: op by op, AdamW on MobileNetV2's ~160 arrays takes ~20 s of compilations here)
    first_update = jax.jit(
        lambda g, w: optax.apply_updates(w, fresh.update(g, fresh.init(w), w)[0])
    )
    expected = first_update(grads, w0)
    w1, expected, w0, grads = (
        jax.tree.leaves(jax.device_get(t)) for t in (state.params["backbone"], expected, w0, grads)
    )
    # Adam's first step is about +-lr whatever the gradient's size, so it is compared where the
    # gradient is clearly not 0: some are 0 but for rounding (a BatchNorm bias before another
    # BatchNorm), and their sign, so their step, is noise. That still leaves most weights.
    compared = [(np.abs(g) > 1e-5) & (np.abs(g) > 1e-3 * np.abs(g).max()) for g in grads]
    assert sum(c.sum() for c in compared) > 0.9 * sum(g.size for g in grads)
    for a, b, c in zip(w1, expected, compared, strict=True):
        np.testing.assert_allclose(a[c], b[c], rtol=0, atol=0.02 * lr)  # a stale AdamW: ~0.45 lr
    # Without the weight decay (kernels only), no weight moved by more than the rate.
    for a, b in zip(w1, w0, strict=True):
        adam_step = np.abs(a - b + lr * tc.weight_decay * b * (b.ndim > 1))
        assert np.all(adam_step <= lr * (1 + 1e-3) + 2 * np.spacing(np.abs(b))), (
            adam_step.max() / lr
        )


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_an_optimiser_state_that_counts_otherwise_is_refused():
    # What the previous version saved after the head-only epoch: its backbone optimiser had
    # counted the 4 frozen steps. Resuming it would shift the backbone's schedule.
    state = train.create_train_state(TWO_STAGE, 4)
    train._check_schedule_counts(TWO_STAGE.train, 4, state)  # a fresh state is in order
    counts = {"head": np.int32(4), "backbone": np.int32(4)}
    old = state.replace(step=np.int32(4), opt_state=_set_schedule_counts(state.opt_state, counts))
    with pytest.raises(ValueError, match=r"schedule counts \{'head': 4, 'backbone': 4\}, where "
                       r"this version of har-flax keeps \{'head': 4, 'backbone': 0\}: the "
                       "checkpoint was written by an older version"):  # fmt: skip
        train._check_schedule_counts(TWO_STAGE.train, 4, old)


def _set_schedule_counts(opt_state, counts):
    inner = opt_state.inner_states
    return opt_state._replace(
        inner_states={
            k: jax.tree.map(
                lambda x, k=k: (
                    x._replace(count=counts[k]) if isinstance(x, optax.ScaleByScheduleState) else x
                ),
                v,
                is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState),
            )
            for k, v in inner.items()
        }
    )


def test_resume_ends_where_an_uninterrupted_run_ends(splits, tmp_path, caplog):
    whole = train.fit(CONFIG, tmp_path / "whole", splits=splits, progress_bar=False)
    assert whole.finished and not whole.interrupted and len(whole.history) == 3

    # Stopped in the middle of epoch 2 (step 6 of 12), then the same call again, twice.
    parts = tmp_path / "parts"
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        first = train.fit(CONFIG, parts, splits=splits, max_steps=6, progress_bar=False)
    assert first.interrupted and not first.finished and int(first.state.step) == 6
    assert [r["epoch"] for r in first.history] == [1]
    # A second run of one configuration in a process reuses the programs in memory.
    assert "compil" not in caplog.text, caplog.text
    caplog.clear()

    # Settings that shape the trajectory cannot change on resume: refused before anything is
    # built (a changed batch size used to crash, a changed schedule to fail restoring).
    for key, value, message in (
        ("train.batch_size", 16, "train.batch_size: 8 saved, 16 requested"),
        ("train.lr_schedule", "plateau", "train.lr_schedule: 'cosine' saved, 'plateau' requested"),
        ("train.epochs", 5, "unfinished run of train.epochs=3, .* resume with train.epochs=3"),
    ):
        with pytest.raises(ValueError, match=message):
            train.fit(override(CONFIG, {key: value}), parts, splits=splits, progress_bar=False)

    jax.clear_caches()  # as in a new process: no compiled program in memory
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        resumed = train.fit(CONFIG, parts, splits=splits, progress_bar=False)
    assert resumed.finished and int(resumed.state.step) == 12
    # A compilation cache configured already (here by conftest.py) is kept, and the resumed
    # run's programs came from it; without one a run uses W/jax_cache (test_multihost.py).
    cache = jax.config.jax_compilation_cache_dir
    loaded = re.search(rf"(\d+) programs came from the compilation cache {re.escape(cache)} ",
                       caplog.text)  # fmt: skip
    assert loaded and int(loaded[1]) >= 2, caplog.text
    assert not (parts / train.CACHE_DIR).exists()
    caplog.clear()

    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(resumed.state.params),
        jax.device_get(whole.state.params),
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(resumed.state.opt_state),
        jax.device_get(whole.state.opt_state),
    )
    assert _strip(resumed.history) == _strip(whole.history)
    lines = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert _strip(lines) == _strip(whole.history)  # one line per epoch, none repeated

    # A finished run restarted does nothing and says so; asking for more epochs says why not.
    again = train.fit(CONFIG, parts, splits=splits, progress_bar=False)
    assert again.finished and int(again.state.step) == 12
    longer = override(CONFIG, {"train.epochs": CONFIG.train.epochs + 2})
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        again = train.fit(longer, parts, splits=splits, progress_bar=False)
    assert again.finished and int(again.state.step) == 12
    assert "does not extend a finished run of 3 epochs" in caplog.text
    assert json.loads((parts / "config.json").read_text())["train"]["epochs"] == 3  # unchanged

    # The work directory: config, best model for the server, checkpoints, curves, cache.
    assert json.loads((parts / "config.json").read_text())["model"]["num_classes"] == 3
    config, labels, variables = load_model(parts / "model")
    best = max(whole.history, key=lambda r: r["val_accuracy"])
    assert labels["classes"] == list(splits.classes) and labels["kind"] == "action"
    assert labels["val_accuracy"] == best["val_accuracy"] and labels["epoch"] == best["epoch"]
    assert config == whole.config
    with Image.open(parts / "curves.png") as curves:  # loss, accuracy, learning rate
        assert curves.format == "PNG" and curves.size == (1500, 400)
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["best", "latest"]
    assert [p.name for p in (parts / "checkpoints" / "latest").iterdir() if p.name.isdigit()] == [
        "12"
    ]
    for r in whole.history:
        assert set(r) >= {
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "images_per_sec",
        }


class _SignalAt:
    """A training source that sends this process ``signum`` when batch ``n`` is read: what a
    cloud preemption (SIGTERM) or Ctrl-C (SIGINT) does to a run at an arbitrary moment."""

    def __init__(self, source, n, signum):
        self.source, self.n, self.signum, self.reads = source, n, signum, 0
        self.labels = source.labels

    def __len__(self):
        return len(self.source)

    def get_batch(self, indices):
        self.reads += 1
        if self.reads == self.n:
            os.kill(os.getpid(), self.signum)
        return self.source.get_batch(indices)


def test_a_signal_saves_a_checkpoint_and_stops_and_the_run_resumes(splits, tmp_path, caplog):
    signum = signal.SIGTERM  # a preemption; Ctrl-C's SIGINT takes the same path (below)
    work = tmp_path / "w"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stopped = dataclasses.replace(splits, train=_SignalAt(splits.train, 6, signum))
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        first = train.fit(CONFIG, work, splits=stopped, progress_bar=False)
    step = int(first.state.step)
    # Stopped within epoch 2 (batch 6 is read ahead of its step), not at the end of the run.
    assert first.interrupted and not first.finished and 4 <= step < 12, step
    assert first.stopped_by_signal == signum
    assert f"signal {signum}: saving a checkpoint and stopping" in caplog.text
    assert f"stopped at step {step}; run again to resume" in caplog.text
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert [p.name for p in (work / "checkpoints" / "latest").iterdir()] == [str(step)]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        resumed = train.fit(CONFIG, work, splits=splits, progress_bar=False)
    assert f"resuming from step {step}" in caplog.text
    assert resumed.finished and int(resumed.state.step) == 12
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def _wait_for(condition, timeout=10.0):
    # A signal sent to this (multi-threaded) process is handled in the main thread soon, not at
    # once: wait for its effect rather than assume it.
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_ctrl_c_asks_to_stop_and_a_second_one_goes_to_the_previous_handler(caplog):
    # In a terminal the previous handler is Python's own, which raises KeyboardInterrupt; here
    # a recording one stands in for it, so the test does not depend on pytest's.
    received = []

    def previous(signum, frame):
        received.append(signum)

    before = signal.signal(signal.SIGINT, previous)
    try:
        with caplog.at_level(logging.WARNING), train._stop_on_signal() as stop_requested:
            assert not stop_requested()
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(stop_requested)  # the loop checkpoints and stops at its next step
            assert f"signal {signal.SIGINT}: saving a checkpoint and stopping" in caplog.text
            assert received == []
            os.kill(os.getpid(), signal.SIGINT)  # impatient: the second one is not ours
            assert _wait_for(lambda: received == [signal.SIGINT]), received
        assert signal.getsignal(signal.SIGINT) is previous  # restored
    finally:
        signal.signal(signal.SIGINT, before)


def test_early_stopping_and_model_mismatch(splits, tmp_path):
    # The rule: stop after `patience` epochs in a row without a new best validation accuracy.
    # With a head-only first epoch: the two-stage loop runs the frozen step, then the full one.
    # (TWO_STAGE's programs: the rule runs on the host, so its patience is not part of them)
    cfg = override(TWO_STAGE, {"train.early_stopping_patience": 1})
    result = train.fit(cfg, tmp_path, splits=splits, progress_bar=False)
    assert [r["stage"] for r in result.history][:2] == ["head", "all"]
    accs = [r["val_accuracy"] for r in result.history]
    stop = next((i for i in range(1, len(accs)) if accs[i] <= max(accs[:i])), None)
    if stop is None:
        assert len(accs) == cfg.train.epochs and not result.stopped_early
    else:
        assert len(accs) == stop + 1 and result.stopped_early and result.finished
    assert result.best_val_accuracy == max(accs)

    # Resuming a run with another model is refused with the fields that differ.
    with pytest.raises(ValueError, match="cannot change: model.lstm_units: 16 saved, 8 requested"):
        train.fit(override(cfg, {"model.lstm_units": 8}), tmp_path, splits=splits)


def test_fit_reads_a_kaggle_layout_itself(tmp_path):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=14, test_count=3, seed=2)
    # Up to step 0: the data prepared and split, a checkpoint, no training.
    result = train.fit(CONFIG, tmp_path / "w", data_dir=data, max_steps=0, progress_bar=False)
    assert result.interrupted and int(result.state.step) == 0 and result.stopped_by_signal is None
    assert result.classes == ("calling", "clapping", "cycling")
    assert (tmp_path / "w" / "split.json").exists() and (tmp_path / "w" / "tfds").is_dir()
    with pytest.raises(ValueError, match="fit needs data_dir or splits"):
        train.fit(CONFIG, tmp_path / "v")


def test_fit_takes_a_preset_name_a_shared_data_folder_and_shows_no_bars(tmp_path, capfd):
    """What a notebook passes: a preset name, a download_dir shared between runs, no bars."""
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=14, test_count=3, seed=2)
    prepared = tmp_path / "prepared"
    capfd.readouterr()
    result = train.fit(
        "tiny", tmp_path / "w", data_dir=data, download_dir=prepared, max_steps=0,
        progress_bar=False,
    )  # fmt: skip
    assert result.config == get_config("tiny") and int(result.state.step) == 0
    assert (prepared / "har_kaggle").is_dir() and not (tmp_path / "w" / "tfds").exists()
    err = capfd.readouterr().err
    assert "%|" not in err, err  # no tqdm bar of any kind
    with pytest.raises(TypeError, match="config is of type int; pass a har_flax.config.Config"):
        train.fit(42, tmp_path / "v", data_dir=data)
    # The run's saved settings, as a path: the way to go on with them.
    again = train.fit(tmp_path / "w" / "config.json", tmp_path / "w", data_dir=data,
                      download_dir=prepared, max_steps=0, progress_bar=False)  # fmt: skip
    assert again.config == result.config


def test_too_few_images_for_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        train.steps_per_epoch(10, 64)


# --- non-finite steps: skipped, counted, and a clear stop ---------------------------------------


def test_a_non_finite_step_changes_nothing_but_the_step(splits):
    step = train.make_train_step(CONFIG, 4)
    state, batch = _on_mesh(train.create_train_state(CONFIG, 4), _batch(splits))
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(0))
    assert not bool(metrics["skipped"]) and int(metrics["step"]) == 1
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0

    # One NaN weight makes the loss and every gradient NaN: the step must leave all as it was.
    params = jax.tree.map(np.array, jax.device_get(state.params))  # writable copies
    params["logits"]["bias"][0] = np.nan
    state = _on_mesh(state.replace(params=params))
    before = jax.device_get((state.params, state.opt_state, state.batch_stats))
    state, metrics = step(state, batch, jax.random.key(0))
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get((state.params, state.opt_state, state.batch_stats))
    # All as it was (NaN == NaN here), except the schedule's position: it follows the step.
    schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    jax.tree.map(
        lambda a, b: (np.testing.assert_array_equal(a.count, b.count + 1) if schedule(a)
                      else jax.tree.map(np.testing.assert_array_equal, a, b)),
        after, before, is_leaf=schedule,
    )  # fmt: skip
    assert int(state.step) == 3


def test_after_a_skipped_step_the_logged_rate_is_the_applied_one(splits):
    # A skipped step moves the schedule on with the step: the next step applies the rate the
    # uninterrupted schedule gives it, and logs that rate. Steps 0 and 1 are CONFIG's warm-up.
    state, batch = _on_mesh(train.create_train_state(CONFIG, 4), _batch(splits))
    step, key = train.make_train_step(CONFIG, 4), jax.random.key(0)
    state, _ = step(state, batch, key)
    good = jax.device_get(state.params)
    bad = jax.tree.map(np.array, good)
    bad["logits"]["bias"][0] = np.nan
    state, metrics = step(_on_mesh(state.replace(params=bad)), batch, key)
    assert bool(metrics["skipped"]) and int(metrics["step"]) == 1
    state, metrics = step(_on_mesh(state.replace(params=good)), batch, key)
    assert int(metrics["step"]) == 2 and not bool(metrics["skipped"])
    head, _ = train.learning_rate_schedules(CONFIG.train, 4)
    assert float(head(1)) < float(head(2))  # so a schedule one step late would show
    logged = float(metrics["learning_rate"])
    assert logged == pytest.approx(float(head(2)), rel=1e-6)

    # The rate applied, by Adam's rule on a bias (no weight decay): the step's update divided
    # by the bias-corrected direction, from the moments and count this step left.
    adam = jax.device_get(state.opt_state.inner_states["head"].inner_state[0])
    assert isinstance(adam, optax.ScaleByAdamState)
    n = int(adam.count)  # 2: the skipped step left Adam's moments and count as they were
    mu = adam.mu["logits"]["bias"] / (1 - 0.9**n)
    nu = adam.nu["logits"]["bias"] / (1 - 0.999**n)
    direction = mu / (np.sqrt(nu) + 1e-8)
    delta = jax.device_get(state.params)["logits"]["bias"] - good["logits"]["bias"]
    np.testing.assert_allclose(-delta / direction, logged, rtol=1e-4)


def test_a_diverging_run_stops_with_an_error_and_no_bad_checkpoint(splits, tmp_path):
    # A learning rate of 1e30: the first real update overflows the weights (finite, but every
    # later loss is NaN). The run must stop after max_nonfinite_steps skipped steps in a row,
    # and an epoch that ends with a NaN validation loss must not be saved or exported.
    cfg = override(
        CONFIG,
        {"train.learning_rate": 1e30, "train.max_nonfinite_steps": 3, "train.log_every_steps": 1},
    )
    with pytest.raises(train.TrainingDivergedError, match="validation loss after epoch 1 is not"):
        train.fit(cfg, tmp_path / "w", splits=splits, progress_bar=False)
    cfg = override(cfg, {"train.max_nonfinite_steps": 2})
    with pytest.raises(train.TrainingDivergedError, match="not finite in 2 consecutive steps"):
        train.fit(cfg, tmp_path / "w", splits=splits, progress_bar=False)
    assert not (tmp_path / "w" / "model").exists()  # nothing exported
    assert not (tmp_path / "w" / "metrics.jsonl").exists()  # no epoch recorded

    # The remedy the message gives: fix the setting and run again in the same work directory
    # (here for one epoch: CONFIG's programs, which the other tests compiled already).
    result = train.fit(CONFIG, tmp_path / "w", splits=splits, max_steps=4, progress_bar=False)
    assert [r["epoch"] for r in result.history] == [1] and result.interrupted
    assert result.history[0]["skipped_steps"] == 0
    assert np.isfinite(result.history[0]["train_loss"])


def test_har_train_reports_divergence_and_exits_1(tmp_path, capsys):
    from har_flax.cli.train import main

    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=14, test_count=3, seed=5)
    # The diverging run above, through the command line (so its programs are compiled already).
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "w"), "--config", "tiny",
            "--no-progress", "--set", "train.batch_size=8", "--set", "model.bn_momentum=0.9",
            "--set", "train.learning_rate=1e30", "--set", "train.max_nonfinite_steps=2",
            "--set", "train.log_every_steps=1"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "har-train: error: training diverged" in err
    assert "model.dtype=float32" in err and "train.learning_rate" in err
    assert "Traceback" not in err


def test_a_resume_may_lower_the_learning_rate_with_a_warning(tmp_path, caplog):
    # The remedy for a diverged run; changing when to log or stop says nothing.
    (tmp_path / "config.json").write_text(CONFIG.to_json())
    changed = override(CONFIG, {"train.learning_rate": 1e-4, "train.log_every_steps": 7})
    with caplog.at_level(logging.WARNING, logger="har_flax.train"):
        assert train._check_resumable_config(tmp_path, changed) is None
    assert "resuming with train.learning_rate=0.0001 (saved: 0.003)" in caplog.text
    assert "log_every_steps" not in caplog.text
    # A higher rate is not a remedy but another run; every refused difference is named at once.
    raised = override(
        CONFIG,
        {"train.learning_rate": 1.0, "train.batch_size": 16, "model.lstm_units": 8},
    )
    with pytest.raises(ValueError) as e:
        train._check_resumable_config(tmp_path, raised)
    for part in ("model.lstm_units: 16 saved, 8 requested",
                 "train.batch_size: 8 saved, 16 requested",
                 "train.learning_rate: 0.003 saved, 1.0 requested",
                 "(train.learning_rate may only be lowered"):  # fmt: skip
        assert part in str(e.value), str(e.value)


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_one_named(tmp_path, caplog):
    path = tmp_path / train.METRICS_FILE
    good = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.6}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"epoch": 3, "sta')  # killed during the append
    with caplog.at_level(logging.WARNING, logger="har_flax.train"):
        assert train._read_history(tmp_path, keep_epochs=2) == good
    assert "dropped its unfinished last line 3" in caplog.text
    assert path.read_text() == text  # repaired, so the resumed run appends after epoch 2

    path.write_text(json.dumps(good[0]) + "\nnot json\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not JSON"):
        train._read_history(tmp_path, keep_epochs=2)


def test_one_run_per_work_directory(tmp_path):
    work = tmp_path / "w"
    take = f"from har_flax import train\nwith train.workdir_lock({str(work)!r}): pass\n"
    with train.workdir_lock(work), train.workdir_lock(work):  # re-entrant in one process
        other = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert other.returncode == 1
        assert (
            f"ValueError: {work} is in use by another training run (process id {os.getpid()}); "
            "wait for it to end, or use another --workdir"
        ) in other.stderr
    free = subprocess.run([sys.executable, "-c", take], capture_output=True, timeout=120)
    assert free.returncode == 0, free.stderr  # released


def test_har_train_checks_its_directories_before_anything(tmp_path, capsys):
    from har_flax.cli.train import main

    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, message in (
        (["--workdir", str(afile)], f"--workdir {afile} exists and is not a directory"),
        (["--workdir", str(afile / "w")],
         f"--workdir {afile / 'w'}: {afile} exists and is not a directory, so"),
        (["--workdir", str(tmp_path / "w"), "--download-dir", str(afile)],
         f"--download-dir {afile} exists and is not a directory"),
        (["--workdir", str(tmp_path / "w"), "--max-steps", "-1"],
         "--max-steps must be 0 or more (a global step), got -1"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["--data-dir", str(tmp_path), *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_har_train_stops_cleanly_on_ctrl_c_and_lists_skipped_images(tmp_path):
    data = write_synthetic_kaggle(tmp_path / "data", train_per_class=40, test_count=3, seed=5)
    (data / "train" / "Image_3.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    command = [os.path.join(os.path.dirname(sys.executable), "har-train"), "--data-dir",
               str(data), "--workdir", str(tmp_path / "w"), "--config", "tiny", "--no-progress",
               "--set", "data.skip_bad_images=true"]  # fmt: skip
    # Ctrl-C while it prepares the data (before the training loop): a message, no traceback.
    # As from a terminal: SIGINT not ignored, whatever this process inherited (a job started
    # in the background by a non-interactive shell ignores it, and so would its children).
    # A small launcher resets it and execs (preexec_fn would fork this multithreaded process).
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.argv[1], sys.argv[1:])")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", launcher, *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    err = []
    for line in proc.stderr:
        err.append(line)
        if "har_builder: preparing" in line:  # then it decodes 123 images
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(err) + rest
    assert proc.returncode == 130, err
    assert "har-train: interrupted; the same command goes on" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    with train.workdir_lock(tmp_path / "w"):  # the lock went with the process
        pass

    # Run again (up to step 0: a checkpoint and no training), it lists the image it skips.
    done = subprocess.run([*command, "--max-steps", "0"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "har-train: skipped 1 bad rows or images (data.skip_bad_images):" in done.stderr
    # One sentence per image, naming its CSV line (not the file name twice).
    assert re.search(r"\n  Training_set\.csv line \d+: train/Image_3\.jpg is unreadable",
                     done.stderr), done.stderr  # fmt: skip
    assert "stopped at step 0; run the same command to resume" in done.stdout


def test_a_ctrl_c_that_python_drops_still_stops_har_train(monkeypatch):
    # Python drops an exception raised in a __del__ or a gc callback (JAX runs one at every
    # collection): a KeyboardInterrupt raised there by Ctrl-C vanished, and the run went on.
    # Nor is Python's report of it (a traceback on stderr) passed on: it is no error.
    from har_flax.cli.train import _Interrupts

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, at a jump
                pass

    before = signal.getsignal(signal.SIGINT)
    with _Interrupts() as interrupts:
        Collected()  # freed at once
        assert interrupts.seen and dropped == []  # dropped, and not reported
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        # Anything else dropped is reported as before.
        sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError))
        assert dropped == [ValueError]
    assert signal.getsignal(signal.SIGINT) is before
    assert sys.unraisablehook != interrupts._unraisable  # the previous hook is back
    sys.unraisablehook(types.SimpleNamespace(exc_type=KeyboardInterrupt))  # restored: reported
    assert dropped == [ValueError, KeyboardInterrupt]


class _SignalOnLen(_SignalAt):
    """A training source that sends this process ``signum`` when its size is first asked for,
    which fit does as it sets the run up (before its state, checkpoints or programs)."""

    def __init__(self, source, signum):
        super().__init__(source, 0, signum)  # (no batch read sends it: reads count from 1)
        self.sent = False

    def __len__(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return super().__len__()


def test_a_signal_while_the_run_is_set_up_stops_it_before_its_first_step(
    splits, tmp_path, caplog, monkeypatch
):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stopped = dataclasses.replace(splits, train=_SignalOnLen(splits.train, signal.SIGINT))
    with caplog.at_level(logging.INFO, logger="har_flax.train"):
        first = train.fit(CONFIG, tmp_path / "w", splits=stopped, progress_bar=False)
    assert stopped.train.sent and first.interrupted and int(first.state.step) == 0
    assert first.stopped_by_signal == signal.SIGINT
    assert f"signal {signal.SIGINT}: saving a checkpoint and stopping" in caplog.text
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert [p.name for p in (tmp_path / "w" / "checkpoints" / "latest").iterdir()] == ["0"]
    saves = []  # (which, step) of every checkpoint written, by the real save
    real_save = train.TrainCheckpoints.save

    def save(self, which, step, *args):
        saves.append((which, step))
        return real_save(self, which, step, *args)

    monkeypatch.setattr(train.TrainCheckpoints, "save", save)
    resumed = train.fit(CONFIG, tmp_path / "w", splits=splits, max_steps=4, progress_bar=False)
    assert [r["epoch"] for r in resumed.history] == [1]
    # It stopped at epoch 2's first step, which epoch 1's end had just saved: not saved again
    # (a second save at a step replaces the first, leaving no checkpoint while it is written).
    assert saves == [("best", 4), ("latest", 4)]
    assert [p.name for p in (tmp_path / "w" / "checkpoints" / "latest").iterdir()] == ["4"]


def test_har_train_exits_with_128_plus_the_signal_that_stopped_it(tmp_path, monkeypatch, capsys):
    """A preempted run (SIGTERM) must not look finished to a job runner or a retry loop."""
    from har_flax import data
    from har_flax.cli.train import main

    real = data.load_splits

    def signalling(*args, **kwargs):
        s = real(*args, **kwargs)
        return dataclasses.replace(s, train=_SignalOnLen(s.train, signal.SIGTERM))

    data_dir = write_synthetic_kaggle(tmp_path / "data", train_per_class=14, test_count=3, seed=2)
    command = ["--data-dir", str(data_dir), "--workdir", str(tmp_path / "w"), "--config",
               "tiny", "--no-progress"]  # fmt: skip
    monkeypatch.setattr(data, "load_splits", signalling)
    assert main(command) == 128 + signal.SIGTERM == 143
    assert "stopped at step 0; run the same command to resume" in capsys.readouterr().out
    # Stopped where it was asked to stop: 0.
    monkeypatch.setattr(data, "load_splits", real)
    assert main([*command, "--max-steps", "0"]) == 0
    assert "stopped at step 0; run the same command to resume" in capsys.readouterr().out


def test_har_train_resumes_with_the_saved_settings_and_refuses_others_before_the_data(
    tmp_path, capsys
):
    from har_flax.cli.train import main

    data_dir = write_synthetic_kaggle(tmp_path / "data", train_per_class=14, test_count=3, seed=2)
    work = tmp_path / "w"
    command = ["--data-dir", str(data_dir), "--workdir", str(work), "--no-progress",
               "--max-steps", "0"]  # fmt: skip
    assert main([*command, "--config", "tiny"]) == 0  # a run, with a checkpoint at step 0
    copies = sorted(p.name for p in (work / "tfds" / "har_kaggle").glob("*px-*"))
    capsys.readouterr()
    # Other settings are refused before the data is prepared (at 224 px: minutes and
    # gigabytes for the Kaggle set, only to be refused).
    assert main([*command, "--config", "default"]) == 1
    err = capsys.readouterr().err
    assert "which a resumed run cannot change: model.width: 0.35 saved, 1.0 requested" in err
    assert "har-train uses them when given no --config" in err
    assert sorted(p.name for p in (work / "tfds" / "har_kaggle").glob("*px-*")) == copies
    # So are, before any data is prepared (here into an empty --download-dir): a changed
    # train.epochs for an unfinished run, and a pretrained source that cannot load (in a new
    # run too).
    fresh = tmp_path / "fresh-tfds"
    for workdir, settings, message in (
        (work, ["--set", "train.epochs=5"], "holds an unfinished run of train.epochs=3"),
        (tmp_path / "w2", ["--set", "model.pretrained=tflite"],
         "the bundled ImageNet weights (model.pretrained='tflite') fit MobileNetV2 width 1.0 "
         "only, not model.width=0.35"),
        (tmp_path / "w2", ["--set", f"model.pretrained={tmp_path / 'nope.h5'}"],
         f"pretrained source '{tmp_path / 'nope.h5'}' does not exist"),
        (tmp_path / "w2", ["--set", "model.pretrained=imagenet"],
         "pretrained source 'imagenet' does not exist; model.pretrained takes 'tflite'"),
        (tmp_path / "w2", ["--set", f"model.pretrained={data_dir / 'Training_set.csv'}"],
         "Training_set.csv' is neither 'tflite', 'none', a model directory"),
    ):  # fmt: skip
        argv = ["--data-dir", str(data_dir), "--workdir", str(workdir), "--no-progress",
                "--download-dir", str(fresh), "--config", "tiny", *settings]  # fmt: skip
        assert main(argv) == 1
        assert message in capsys.readouterr().err
        assert not any(fresh.rglob("*.array_record*"))
    # Without --config, or with the saved file as it, the run goes on with its own settings.
    for config in ([], ["--config", str(work / "config.json")]):
        assert main([*command, *config, "--set", "train.log_every_steps=3"]) == 0
        out, err = capsys.readouterr()
        assert "stopped at step 0; run the same command to resume" in out
        assert ("going on with the run's saved settings" in err) == (not config)
    assert json.loads((work / "config.json").read_text())["train"]["log_every_steps"] == 3
    # A config file that is not one is a usage error naming it.
    (tmp_path / "bad.json").write_text('{"model": {"wdith": 1}}')
    for config, message in (("bad.json", "bad.json is not a har-flax config: unknown Model"),
                            ("nope", "unknown config 'nope'; known: ['default', 'smoke', "
                             "'tiny'], or a config .json file")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*command, "--config", str(tmp_path / config) if "." in config else config])
        assert e.value.code == 2 and message in capsys.readouterr().err


# --- Units that mutation testing showed untested -------------------------------------------------


def test_early_stopping_counts_stage_two_epochs_only():
    tc = override(CONFIG, {"train.epochs": 8, "train.head_only_epochs": 3,
                           "train.early_stopping_patience": 2}).train  # fmt: skip
    progress = {"best_val_accuracy": -1.0, "best_epoch": 0, "epochs_without_improvement": 0,
                "stopped_early": False, "finished": False}  # fmt: skip
    # Stage 1 stalls for two epochs (its patience): it goes on to stage 2 all the same.
    seen = []
    for epoch, acc in enumerate([0.5, 0.4, 0.5, 0.45, 0.6, 0.55, 0.6]):
        improved = train._track_early_stopping(
            progress, acc, epoch, epoch < tc.head_only_epochs, tc
        )
        seen.append((improved, progress["epochs_without_improvement"], progress["finished"]))
        if progress["finished"]:
            break
    assert seen == [
        (True, 0, False), (False, 0, False), (False, 0, False),  # stage 1: no count
        (False, 1, False), (True, 0, False), (False, 1, False), (False, 2, True),  # stage 2
    ]  # fmt: skip
    assert progress["stopped_early"] and progress["best_val_accuracy"] == 0.6
    assert progress["best_epoch"] == 5


def test_a_resume_with_a_patience_already_used_up_stops_at_once():
    progress = {"epochs_without_improvement": 2, "stopped_early": False, "finished": False}
    lowered = override(CONFIG, {"train.early_stopping_patience": 2}).train
    kept = override(CONFIG, {"train.early_stopping_patience": 3}).train
    assert not train._patience_used_up(dict(progress), kept)
    assert not train._patience_used_up({**progress, "finished": True}, lowered)
    stopped = dict(progress)
    assert train._patience_used_up(stopped, lowered)
    assert stopped["stopped_early"] and stopped["finished"]


def test_label_smoothing_is_applied(splits):
    """The step's loss is the label-smoothed cross-entropy, not the plain one (a setting that
    did nothing would not show)."""
    cfg, batch = TWO_STAGE, _batch(splits)
    state = train.create_train_state(cfg, 4)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    _, metrics = train.make_train_step(cfg, 4)(*_on_mesh(state, batch), jax.random.key(0))
    smoothed = _reference_loss(cfg, variables, batch, 0)
    plain = override(cfg, {"train.label_smoothing": 0.0})
    assert abs(smoothed - _reference_loss(plain, variables, batch, 0)) > 1e-3
    assert cfg.train.label_smoothing > 0
    np.testing.assert_allclose(float(metrics["loss"]), smoothed, rtol=1e-5)


def test_weight_decay_shrinks_kernels_only():
    """AdamW's decay applies to kernels, never to biases or BatchNorm scales and offsets."""
    tc = dataclasses.replace(TrainConfig(), weight_decay=0.5, warmup_epochs=0.0,
                             head_only_epochs=0, epochs=1)  # fmt: skip
    tx = train.make_optimizer(tc, 10)
    ones = {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4), "scale": jnp.ones(4)}
    params = {"backbone": {"conv": dict(ones)}, "logits": dict(ones)}
    state, new = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = tx.update(zeros, state, new)
        new = optax.apply_updates(new, updates)
    for group in ("backbone", "logits"):
        layer = new[group]["conv"] if group == "backbone" else new[group]
        assert float(jnp.max(layer["kernel"])) < 1.0, group
        np.testing.assert_array_equal(layer["bias"], 1.0)
        np.testing.assert_array_equal(layer["scale"], 1.0)


def test_every_epoch_has_its_own_order():
    orders = [train.epoch_permutation(100, seed=0, epoch=e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(100))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(orders[1], train.epoch_permutation(100, seed=0, epoch=1))
    assert not np.array_equal(orders[0], train.epoch_permutation(100, seed=1, epoch=0))


def test_predict_logits_keeps_each_example_its_own_row():
    """N not a multiple of the batch: the padded last batch's rows go back to their examples."""
    config = tiny()
    model = create_model(config.model)
    variables = init_variables(config.model, jax.random.key(2))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    source = ArraySource(images, range(10), [f"{i}.jpg" for i in range(10)],
                         np.zeros(10, np.int32), 32)  # fmt: skip
    got = train.predict_logits(model, variables, source, batch_size=4)
    one = jax.jit(lambda v, x: model.apply(v, x, train=False))
    want = np.concatenate([np.asarray(one(variables, images[i : i + 1, None])) for i in range(10)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _metrics(step: int, loss: float = 1.0, skipped: bool = False) -> dict:
    return {"loss": loss, "accuracy": 0.5, "grad_norm": 1.0, "skipped": skipped, "step": step}


def _bar(**kwargs):
    return tqdm.tqdm(total=100, file=io.StringIO(), **kwargs)


def test_skipped_steps_stay_out_of_the_epoch_averages():
    sums = train._new_sums()
    meter = train._Meter(sums, _bar(), batch_size=8, guard=train._NonFiniteGuard(10))
    for step, (loss, skipped) in enumerate(((1.0, False), (float("nan"), True), (3.0, False))):
        meter.add(_metrics(step, loss, skipped))
    meter.flush()
    assert (sums["loss"], sums["accuracy"], sums["steps"], sums["skipped"]) == (4.0, 1.0, 2, 1)


def test_compiling_stays_out_of_the_bar_s_rate_and_time_left():
    """The bar updates once per log_every_steps (maybe once an epoch): a compile counted in
    its rate would show hours left for a run of minutes, for epochs."""
    clock = [1000.0]
    bar = _bar(mininterval=0)
    bar._time = lambda: clock[0]  # tqdm's clock, which it reads through this attribute
    bar.start_t = bar.last_print_t = clock[0]
    meter = train._Meter(train._new_sums(), bar, batch_size=8, guard=train._NonFiniteGuard(10))
    clock[0] += 30.0  # the first step compiles for 30 s,
    meter.leave_out(30.0)
    clock[0] += 1.0  # then it and 9 more run in 1 s
    for step in range(10):
        meter.add(_metrics(step))
    meter.flush()
    info = bar.format_dict
    assert info["rate"] == pytest.approx(10.0)  # steps/s, so 9 s left for the other 90 steps
    assert info["elapsed"] == pytest.approx(31.0)  # the elapsed time is the wall-clock time
