"""Training: optax AdamW with warm-up + cosine, two optional stages, jitted data-parallel steps.

:func:`fit` is the whole loop (resumable, early stopping, checkpoints, metrics, curves);
:func:`make_train_step` and :func:`predict_logits` are the pure, jitted pieces it is built from.
Shape legend: B batch, T frames, H W C image, K classes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from har_flax import sharding
from har_flax.augment import AugmentConfig, augment
from har_flax.checkpoint import (
    TRAIN_CHECKPOINTS_DIR,
    TrainCheckpoints,
    atomic_write_bytes,
    atomic_write_text,
    save_model,
    saved_progress,
)
from har_flax.config import Config, TrainConfig, get_config, override
from har_flax.models import create_model, init_variables

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # W/model: the best model, a plain model directory the server loads.
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.json"
CACHE_DIR = "jax_cache"
LOCK_FILE = "train.lock"  # held by the run using W (process 0 of it), so a second one refuses
DEFAULT_AUGMENT = AugmentConfig()


class Source(Protocol):
    """What training reads: a split of pre-resized images with random access (har_flax.data)."""

    labels: np.ndarray  # int32 (N,), -1 where unknown

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) images and int32 (n,) labels."""
        ...


class TrainState(train_state.TrainState):
    """Params, optimiser state and step, plus the BatchNorm running statistics."""

    batch_stats: Any = None


# --- Optimiser ------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; every epoch reshuffles)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"the training split has {num_examples} images, fewer than one batch of "
            f"{batch_size}; lower train.batch_size"
        )
    return steps


def _warmup_then(peak: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    """A linear warm-up from 0 to ``peak``, then a cosine to 1% of it, or ``peak`` held."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if kind == "plateau":  # held; the plateau rule scales it (scale_by_plateau)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
            [warmup_steps],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * 0.01,
    )


def learning_rate_schedules(
    config: TrainConfig, steps_per_epoch: int
) -> tuple[optax.Schedule, optax.Schedule]:
    """(head schedule, backbone schedule) over the global step.

    One stage: both warm up to ``learning_rate`` and decay with a cosine. Two stages
    (``head_only_epochs > 0``): stage 1 trains the head at ``learning_rate`` while the backbone's
    rate is 0; stage 2 warms everything up again to ``finetune_learning_rate`` and decays.
    With ``lr_schedule="plateau"`` the rates do not decay: they stay at the peak, and
    :func:`scale_by_plateau` scales them by what the validation loss says.
    """
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    stage1 = _head_only_steps(config, steps_per_epoch)
    kind = config.lr_schedule
    if stage1 == 0:
        single = _warmup_then(config.learning_rate, warmup, total, kind)
        return single, single
    stage2 = _warmup_then(config.finetune_learning_rate, warmup, max(total - stage1, 1), kind)
    head = optax.join_schedules(
        [_warmup_then(config.learning_rate, warmup, stage1, kind), stage2], [stage1]
    )
    backbone = optax.join_schedules([optax.constant_schedule(0.0), stage2], [stage1])
    return head, backbone


def _head_only_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The steps of stage 1 (head only, backbone frozen); 0 for a single stage."""
    return min(config.head_only_epochs, config.epochs) * steps_per_epoch


def _param_groups(params: Any) -> Any:
    """'backbone' for the MobileNetV2 subtree, 'head' for the LSTM and the dense head."""
    return {
        k: jax.tree.map(lambda _, k=k: "backbone" if k == "backbone" else "head", v)
        for k, v in params.items()
    }


def _plateau_rule(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    # Fed one validation loss per epoch (accumulation_size 1), as Keras' ReduceLROnPlateau is.
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        min_scale=config.plateau_min_scale,
    )


def scale_by_plateau(config: TrainConfig) -> optax.GradientTransformation:
    """Multiplies the updates by the scale of a reduce-on-plateau state it carries.

    The train step only reads the scale (a step sees no validation loss); :func:`fit` advances
    the state once per epoch with the validation loss (:func:`_advance_plateau`). The state is
    part of the optimiser state, so checkpoints keep it and a resumed run goes on with it.
    """

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: state.scale * u, updates), state

    return optax.GradientTransformation(_plateau_rule(config).init, update)


@functools.lru_cache(maxsize=16)
def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW per parameter group; weight decay only on kernels (not biases or BatchNorm).

    Cached: the optimiser is part of a train state's static structure, so a second run in one
    process with the same settings gets the same one, and the jitted steps are not traced again.

    With ``lr_schedule="plateau"``: ``chain(that, scale_by_plateau)``, whose state is
    ``(groups, ReduceLROnPlateauState)``.

    Each group's schedule reads that group's own step count. The head's counts every step; the
    backbone's only the steps that train it (a frozen step leaves the backbone's state as it
    was: :func:`_train_step`), so its AdamW starts afresh at stage 2, bias correction included,
    and its count ``n`` is global step ``head_only_steps + n``. Both schedules advance on
    skipped (non-finite) steps too, so they stay on the global step
    (:func:`_check_schedule_counts`).
    """
    head, backbone_by_step = learning_rate_schedules(config, steps_per_epoch)
    stage1 = _head_only_steps(config, steps_per_epoch)

    def backbone(count):
        return backbone_by_step(count + stage1)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    def adamw(schedule):
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)

    groups = optax.multi_transform(
        {"head": adamw(head), "backbone": adamw(backbone)}, _param_groups
    )
    if config.lr_schedule == "plateau":
        return optax.chain(groups, scale_by_plateau(config))
    return groups


def _groups_state(opt_state: Any) -> optax.MultiTransformState:
    """The per-group part of a :func:`make_optimizer` state (also inside the plateau chain)."""
    return opt_state if isinstance(opt_state, optax.MultiTransformState) else opt_state[0]


def _with_group_state(opt_state: Any, group: str, group_state: Any) -> Any:
    """``opt_state`` with the state of parameter group ``group`` replaced by ``group_state``."""
    if isinstance(opt_state, optax.MultiTransformState):
        return opt_state._replace(inner_states={**opt_state.inner_states, group: group_state})
    groups, *rest = opt_state
    return (_with_group_state(groups, group, group_state), *rest)


def _schedule_counts(opt_state: Any) -> dict[str, jax.Array]:
    """{group: the step count its learning-rate schedule reads}."""
    counts = {}
    for group, sub in _groups_state(opt_state).inner_states.items():
        (schedule,) = [
            x for x in jax.tree.leaves(sub, is_leaf=_is_schedule_state) if _is_schedule_state(x)
        ]
        counts[group] = schedule.count
    return counts


def _is_schedule_state(x: Any) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def _check_schedule_counts(config: TrainConfig, steps_per_epoch: int, state: TrainState) -> None:
    """Refuses an optimiser state whose schedules are not where ``state.step`` puts them.

    The head's schedule count is the global step; the backbone's, the steps since stage 2
    began (:func:`make_optimizer`). A checkpoint of an older version (whose backbone AdamW
    counted the frozen steps, and whose schedules stood still on skipped steps) would resume
    with shifted learning rates and a used-up Adam bias correction.

    Raises:
      ValueError: the counts differ; the message names them.
    """
    step = int(jax.device_get(state.step))
    expected = {"head": step, "backbone": max(step - _head_only_steps(config, steps_per_epoch), 0)}
    saved = jax.device_get(_schedule_counts(state.opt_state))
    counts = {k: int(saved[k]) for k in expected}
    if counts != expected:
        raise ValueError(
            f"the optimiser state at step {step} has learning-rate schedule counts {counts}, "
            f"where this version of har-flax keeps {expected}: the checkpoint was written by "
            "an older version, which counted them differently, and cannot be resumed; train "
            "in a new --workdir"
        )


def plateau_scale(config: TrainConfig, opt_state: Any) -> jax.Array | float:
    """The factor the plateau rule applies to the scheduled rates now (1.0 for "cosine")."""
    return opt_state[1].scale if config.lr_schedule == "plateau" else 1.0


def _advance_plateau(
    config: TrainConfig, state: TrainState, val_loss: float, *, restart: bool
) -> TrainState:
    """The plateau rule after an epoch with validation loss ``val_loss`` (``restart``: a new
    stage begins, so the rule starts over at scale 1)."""
    groups, old = state.opt_state
    rule = _plateau_rule(config)
    if restart:
        new = rule.init(state.params)  # reads the parameters' dtypes only
    else:
        # On the host: every process computes the same (the validation loss is the same on all).
        _, new = rule.update(jnp.zeros(()), jax.device_get(old), value=val_loss)
    new = jax.tree.map(
        lambda x, o: jax.device_put(np.asarray(x, dtype=o.dtype), o.sharding), new, old
    )
    return state.replace(opt_state=(groups, new))


def create_train_state(
    config: Config, steps_per_epoch: int, variables: dict | None = None
) -> TrainState:
    """A fresh train state: the variables (default: initialised, plus the pretrained backbone)."""
    model = create_model(config.model)
    if variables is None:
        variables = init_variables(config.model, jax.random.key(config.train.seed))
        if config.model.pretrained != "none":
            from har_flax.weights import load_pretrained_backbone

            variables = load_pretrained_backbone(variables, config.model.pretrained)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=make_optimizer(config.train, steps_per_epoch),
    )
    # An array step (not a Python int) so the state checkpoints and shards like every leaf.
    return state.replace(step=jnp.zeros((), jnp.int32))


# --- Steps ---------------------------------------------------------------------------------------


def _train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    config: Config,
    head_schedule: optax.Schedule,
    freeze_backbone: bool,
    augment_config: AugmentConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(rng, state.step)
    aug_key, dropout_key = jax.random.split(rng)
    images = batch["image"]  # (B, T, H, W, 3) uint8
    if config.train.augment:
        # (B, T, H, W, 3) in the compute dtype: bfloat16 resamples on the tensor units. (The
        # named scopes label the step's parts in a profile: har_flax/profiling.py.)
        with jax.named_scope("augment"):
            images = augment(images, aug_key, augment_config, jnp.dtype(config.model.dtype))
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch["label"], config.model.num_classes), config.train.label_smoothing
    )  # (B, K)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            freeze_backbone=freeze_backbone,  # its BatchNorm in inference mode, as Keras does
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )  # (B, K)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates["batch_stats"])

    if freeze_backbone:
        # Differentiate with respect to the head only: XLA then skips the backbone's backward
        # pass entirely. Its zero gradient keeps the optimiser state's structure unchanged.
        head = {k: v for k, v in state.params.items() if k != "backbone"}
        frozen = jax.lax.stop_gradient(state.params["backbone"])
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(
            lambda h: loss_fn({**h, "backbone": frozen}), has_aux=True
        )(head)
        grads = {**grads, "backbone": jax.tree.map(jnp.zeros_like, state.params["backbone"])}
    else:
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
    grad_norm = optax.tree.norm(grads)
    # A step whose loss or gradient is not finite (an overflow, a diverging learning rate, a
    # faulty kernel) is skipped: it changes nothing but the step counter (and the schedules'
    # counts, which follow it), and the host counts it (see _NonFiniteGuard), so one bad batch
    # cannot poison the weights for good.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": head_schedule(state.step) * plateau_scale(config.train, state.opt_state),
        "grad_norm": grad_norm,
        "skipped": jnp.logical_not(finite),
        "step": state.step,
    }
    with jax.named_scope("optimizer"):
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        if freeze_backbone:
            # Frozen means unchanged, whatever the schedule says (weight decay included), and so is
            # the backbone's AdamW state: stepping it on zero gradients would advance its count, and
            # so use up Adam's bias correction, before stage 2 trains it. (XLA drops the unused
            # backbone update.)
            updates = {**updates, "backbone": jax.tree.map(jnp.zeros_like, updates["backbone"])}
            frozen_state = _groups_state(state.opt_state).inner_states["backbone"]
            opt_state = _with_group_state(opt_state, "backbone", frozen_state)

        def keep_if_bad(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        def keep_if_bad_but_schedules(new, old):
            # A skipped step keeps the moments (and Adam's count, their bias correction) but the
            # schedules move on with the step, so the next step applies its own step's rate: the
            # rate it logs, and the rate of a run that was not skipped.
            return new if _is_schedule_state(new) else keep_if_bad(new, old)

        state = state.replace(
            step=state.step + 1,
            params=keep_if_bad(optax.apply_updates(state.params, updates), state.params),
            opt_state=jax.tree.map(
                keep_if_bad_but_schedules, opt_state, state.opt_state, is_leaf=_is_schedule_state
            ),
            batch_stats=keep_if_bad(batch_stats, state.batch_stats),
        )
    return state, metrics


@functools.lru_cache(maxsize=16)
def make_train_step(
    config: Config,
    steps_per_epoch: int,
    *,
    freeze_backbone: bool = False,
    augment_config: AugmentConfig = DEFAULT_AUGMENT,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The jitted, donated ``train_step(state, batch, rng) -> (state, metrics)``.

    ``batch`` is ``{"image": uint8 (B, T, H, W, 3), "label": int32 (B,)}``; ``rng`` is the run's
    root key, folded with ``state.step`` inside, so a step's randomness depends only on the seed
    and the step. Metrics are scalars: loss (with label smoothing), accuracy, learning_rate,
    grad_norm, skipped (the loss or gradient was not finite, so nothing was updated but the
    schedules' position) and step. ``learning_rate`` is the head's rate this step applied.
    ``freeze_backbone``: a head-only (stage 1) step, which leaves the backbone's weights,
    BatchNorm statistics and optimiser state as they are.
    Cached on its (hashable) arguments, so a second run in one process does not recompile.
    """
    head, _ = learning_rate_schedules(config.train, steps_per_epoch)
    step = functools.partial(
        _train_step,
        config=config,
        head_schedule=head,
        freeze_backbone=freeze_backbone,
        augment_config=augment_config,
    )
    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _logits_fn(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable:
    # Replicated output: every process can read all logits, also across hosts.
    return jax.jit(
        lambda variables, images: model.apply(variables, images, train=False),
        out_shardings=sharding.replicated(mesh),
    )


def eval_batches(
    source: Source, batch_size: int, num_frames: int = 1
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Every example of ``source`` once, in order, in batches padded to ``batch_size``.

    Yields:
      ({"image": uint8 (B, T, H, W, 3), "label": int32 (B,)}, n_valid): rows past ``n_valid``
      repeat the last example and must be ignored.
    """
    n = len(source)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        valid = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - valid, idx[-1])])
        images, labels = source.get_batch(idx)
        yield {"image": _add_time_axis(images, num_frames), "label": labels}, valid


def predict_logits(
    model: nn.Module,
    variables: Any,
    source: Source,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    num_frames: int = 1,
) -> np.ndarray:
    """float32 (N, K) logits for every example of ``source``, in order (inference mode)."""
    mesh = mesh or sharding.make_mesh()
    batch_size = _round_up(batch_size, mesh.devices.size)
    fn = _logits_fn(model, mesh)

    def on_devices() -> Iterator[tuple[jax.Array, int]]:
        local = sharding.process_slice(batch_size)
        for batch, valid in eval_batches(source, batch_size, num_frames):
            yield sharding.shard_batch(batch["image"][local], mesh, batch_size), valid

    # Read back once at the end, so that loading, copying and computing overlap throughout.
    batches = _prefetch(on_devices())
    try:
        out = [(fn(variables, images), valid) for images, valid in batches]
    finally:
        batches.close()
    out = [np.asarray(logits)[:valid] for logits, valid in jax.device_get(out)]
    k = out[0].shape[-1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy of (N, K) logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float(np.mean(logits.argmax(axis=1) == labels))


# --- The loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` did."""

    state: TrainState
    config: Config  # the resolved config (num_classes from the data)
    classes: tuple[str, ...]
    history: list[dict[str, Any]]  # every line of metrics.jsonl
    best_val_accuracy: float
    stopped_early: bool
    interrupted: bool  # stopped by max_steps or a signal; run again to resume
    finished: bool  # all epochs done or early-stopped
    stopped_by_signal: int | None = None  # SIGINT or SIGTERM, if one stopped the run


def enable_compilation_cache(workdir: Path) -> str:
    """Persists compiled programs so that a restart does not recompile.

    The cache is ``W/jax_cache``, unless one is configured already: by
    ``JAX_COMPILATION_CACHE_DIR`` (say one cache for a sweep's runs), or by an earlier run in
    this process (JAX opens its cache once per process and keeps it).

    Returns:
      The cache directory in use.
    """
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        directory = str(Path(workdir).absolute() / CACHE_DIR)
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


_LOCKS_HELD: dict[Path, int] = {}  # lock file -> how many nested workdir_lock hold it here


@contextlib.contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
    """Holds ``W/train.lock`` while entered, so that two runs cannot share a work directory.

    Two runs in one W would append to the same metrics and overwrite each other's checkpoints
    and model. The lock is the operating system's (``flock``): it goes with the process, so a
    killed run leaves no stale lock. Only process 0 of a multi-host run takes it (the others
    share its W). Re-entrant within a process (``har-train`` holds it from preparing the data
    to the end of ``fit``).

    Raises:
      ValueError: another process holds it; the message gives that process' id.
    """
    path = (Path(workdir) / LOCK_FILE).absolute()
    if jax.process_index() != 0 or path in _LOCKS_HELD:
        _LOCKS_HELD[path] = _LOCKS_HELD.get(path, 0) + 1
        try:
            yield
        finally:
            _LOCKS_HELD[path] -= 1
            if not _LOCKS_HELD[path]:
                del _LOCKS_HELD[path]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"{path.parent} is in use by another training run (process id {holder}); "
                "wait for it to end, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _LOCKS_HELD[path] = 1
        try:
            yield
        finally:
            del _LOCKS_HELD[path]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _CompileStats:
    """Counts, while entered, XLA's compilations and the programs the persistent cache gave."""

    _COMPILED = "/jax/core/compile/backend_compile_duration"
    _LOADED = "/jax/compilation_cache/compile_time_saved_sec"

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.compiled, self.compile_seconds = 0, 0.0
        self.loaded, self.saved_seconds = 0, 0.0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event == self._COMPILED:
            self.compiled += 1
            self.compile_seconds += duration
        elif event == self._LOADED:
            self.loaded += 1
            self.saved_seconds += max(duration, 0.0)

    @property
    def programs(self) -> int:
        """Programs compiled or loaded from the cache so far."""
        return self.compiled + self.loaded

    def __enter__(self) -> _CompileStats:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def summary(self) -> str:
        compiled = f"compiling took {self.compile_seconds:.1f} s ({self.compiled} programs); "
        if not self.loaded:
            return compiled + f"the slow ones are kept in {self.cache_dir} for a restart"
        return compiled + (
            f"{self.loaded} programs came from the compilation cache {self.cache_dir} "
            f"({self.saved_seconds:.1f} s of compiling saved)"
        )


def fit(
    config: Config | str | os.PathLike,
    workdir: str | Path,
    *,
    data_dir: str | Path | None = None,
    splits: Any = None,
    download_dir: str | Path | None = None,
    max_steps: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress_bar: bool = True,
) -> FitResult:
    """Trains ``config`` on the Kaggle-layout data in ``data_dir``; resumes from ``workdir``.

    Writes ``W/config.json``, ``W/checkpoints/{latest,best}``, ``W/model`` (the best model, a
    plain model directory for ``har-serve``), ``W/metrics.jsonl`` (one line per epoch) and
    ``W/curves.png``. Running it again with the same arguments continues from the latest
    checkpoint and ends where an uninterrupted run would.

    It turns on JAX's persistent compilation cache in ``W/jax_cache``
    (:func:`enable_compilation_cache`): a process-wide setting, so later compiles in the same
    process (another run, a Predictor) use that folder too, unless they set their own.

    Args:
      config: the run, or a preset name or the path of a config ``.json``, for
        :func:`har_flax.config.get_config`; ``model.num_classes`` is set from the data.
      workdir: W.
      data_dir: the Kaggle layout (``Training_set.csv``, ``train/``, ...); read with
        ``har_flax.data.load_splits``. Not needed when ``splits`` is given.
      splits: already loaded splits (``.classes``, ``.train``, ``.val``, ``.test``).
      download_dir: where the prepared copies of ``data_dir`` go (default ``W/tfds``); share
        one between runs to prepare each data set and size once (``har-train --download-dir``).
      max_steps: stop (and checkpoint) once the global step reaches this; resume later.
      mesh: the device mesh (default: every device).
      progress_bar: show progress bars (preparing the data; training, on process 0).

    Returns:
      A :class:`FitResult`.
    """
    if isinstance(config, (str, os.PathLike)):
        config = get_config(os.fspath(config))
    if not isinstance(config, Config):
        raise TypeError(
            f"config is of type {type(config).__name__}; pass a har_flax.config.Config (get_config("
            "'tiny'), override(...)) or a preset name or config .json"
        )
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be 0 or more (a global step), got {max_steps}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        if splits is None:  # Ctrl-C here raises KeyboardInterrupt: a preparation starts over
            if data_dir is None:
                raise ValueError("fit needs data_dir or splits")
            check_resume(workdir, config)  # before the data is prepared
            from har_flax.data import load_splits

            splits = sharding.process_zero_first(
                lambda: load_splits(
                    data_dir,
                    workdir,
                    image_size=config.model.image_size,
                    data_config=config.data,
                    download_dir=download_dir,
                    progress=progress_bar,
                ),
                "har_flax:load_splits",
            )
        # From here on, SIGINT/SIGTERM (Ctrl-C, a preemption) ask for a checkpoint and a stop
        # at the next step, also while the run is set up: then it stops before its first step.
        with (
            _stop_on_signal() as stop_requested,
            _CompileStats(enable_compilation_cache(workdir)) as compile_stats,
        ):
            result = _fit(
                config, workdir, splits, max_steps, mesh, progress_bar, compile_stats,
                stop_requested,
            )  # fmt: skip
            if result.interrupted:
                result.stopped_by_signal = stop_requested.agreed_signum
    if compile_stats.compiled or compile_stats.loaded:
        log.info(compile_stats.summary())
    return result


def _fit(
    config: Config,
    workdir: Path,
    splits: Any,
    max_steps: int | None,
    mesh: jax.sharding.Mesh | None,
    progress_bar: bool,
    compile_stats: _CompileStats,
    stop_requested: _StopRequest,
) -> FitResult:
    classes = tuple(splits.classes)
    if config.model.num_classes != len(classes):
        log.info("model.num_classes = %d (from the data)", len(classes))
        config = override(config, {"model.num_classes": len(classes)})

    tc = config.train
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(tc.batch_size, mesh)
    spe = steps_per_epoch(len(splits.train), tc.batch_size)
    total_steps = tc.epochs * spe

    progress = {
        "epoch": 0,  # epochs completed
        "step_in_epoch": 0,  # batches of the current epoch done
        "best_val_accuracy": -1.0,
        "best_epoch": 0,
        "epochs_without_improvement": 0,
        "sums": _new_sums(),
        "finished": False,
        "stopped_early": False,
    }
    ckpts = TrainCheckpoints(workdir / TRAIN_CHECKPOINTS_DIR)
    with _closing_on_error(ckpts):
        resuming = ckpts.latest_step() is not None
        # Before building anything: a refused resume answers at once.
        saved_epochs = _check_resumable_config(workdir, config) if resuming else None
        state = create_train_state(config, spe)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
            state,
        )
        restored = ckpts.restore("latest", abstract)
    if restored is not None:
        state, saved = restored
        progress.update(saved["progress"])
        if not progress["finished"]:  # a finished run is not trained again
            with _closing_on_error(ckpts):
                _check_schedule_counts(tc, spe, state)
        log.info(
            "resuming from step %d (epoch %d, batch %d)",
            int(state.step),
            progress["epoch"],
            progress["step_in_epoch"],
        )
    else:
        state = sharding.replicate(state, mesh)
    history = _read_history(workdir, keep_epochs=progress["epoch"])

    def result(interrupted: bool) -> FitResult:
        return FitResult(
            state=state,
            config=config,
            classes=classes,
            history=history,
            best_val_accuracy=progress["best_val_accuracy"],
            stopped_early=progress["stopped_early"],
            interrupted=interrupted,
            finished=progress["finished"],
        )

    def save(which: str) -> None:
        ckpts.save(
            which,
            int(jax.device_get(state.step)),
            state,
            {"progress": progress, "config": config.to_dict(), "classes": list(classes)},
        )

    if saved_epochs is not None and not progress["finished"]:
        ckpts.close()
        raise ValueError(_epochs_refusal(workdir, saved_epochs, tc.epochs))
    if _patience_used_up(progress, tc):  # resumed with a lower train.early_stopping_patience
        log.info(
            "early stopping: no val-accuracy gain for %d epochs, train.early_stopping_patience "
            "is now %d; the best model is %s",
            progress["epochs_without_improvement"],
            tc.early_stopping_patience,
            workdir / MODEL_DIR,
        )
        ckpts.close()
        return result(False)
    if progress["finished"]:
        log.info("%s already finished; nothing to do", workdir)
        if tc.epochs > progress["epoch"] and not progress["stopped_early"]:
            log.warning(
                "train.epochs=%d does not extend a finished run of %d epochs (its learning-rate "
                "schedule has ended); to train longer, use a new --workdir",
                tc.epochs,
                progress["epoch"],
            )
        ckpts.close()
        return result(False)
    atomic_write_text(workdir / CONFIG_FILE, config.to_json())  # what this run trains with

    steps = {
        frozen: make_train_step(config, spe, freeze_backbone=frozen) for frozen in (False, True)
    }
    root_key = jax.random.key(tc.seed)
    model = create_model(config.model)
    global_step = progress["epoch"] * spe + progress["step_in_epoch"]
    bar = _progress_bar(total_steps, global_step, progress_bar and jax.process_index() == 0)
    guard = _NonFiniteGuard(tc.max_nonfinite_steps)

    with bar, _closing_on_error(ckpts):
        for epoch in range(progress["epoch"], tc.epochs):
            frozen = epoch < tc.head_only_epochs
            order = epoch_permutation(len(splits.train), tc.seed, epoch)
            first = progress["step_in_epoch"]
            batches = _prefetch(
                _train_batches(splits.train, order, tc.batch_size, first, spe, config, mesh)
            )
            meter = _Meter(progress["sums"], bar, tc.batch_size, guard)

            with _closing_on_error(batches):  # e.g. TrainingDivergedError from a flush
                for i in range(first, spe):
                    # Several processes agree on a stop where the host syncs anyway: each
                    # epoch's first step and after each flush (log_every_steps), the same
                    # steps on every process. One process stops at the next step.
                    agree = jax.process_count() == 1 or meter.pending == 0
                    if (max_steps is not None and global_step >= max_steps) or (
                        agree and stop_requested.agreed()
                    ):
                        meter.flush()
                        batches.close()
                        progress["step_in_epoch"] = i
                        if ckpts.latest_step() != int(jax.device_get(state.step)):
                            save("latest")
                        # Else no step since the latest checkpoint (the epoch's end, or the one
                        # this run resumed from): it holds this very state and progress. Saving
                        # again would replace it, leaving no checkpoint while the copy is
                        # written (a kill then, as after a SIGTERM's grace period, lost the run).
                        ckpts.close()
                        log.info("stopped at step %d; run again to resume", global_step)
                        return result(True)
                    batch, programs, t0 = next(batches), compile_stats.programs, time.perf_counter()
                    state, metrics = steps[frozen](state, batch, root_key)
                    if compile_stats.programs != programs:  # compiled: not training time
                        meter.leave_out(time.perf_counter() - t0)
                    meter.add(metrics)
                    global_step += 1
                    if meter.pending >= tc.log_every_steps:
                        meter.flush()
                meter.flush()
            batches.close()

            val_logits = predict_logits(
                model,
                {"params": state.params, "batch_stats": state.batch_stats},
                splits.val,
                tc.batch_size,
                mesh,
                config.model.num_frames,
            )
            val_loss, val_acc = loss_and_accuracy(val_logits, np.asarray(splits.val.labels))
            if not np.isfinite(val_loss):
                # Finite weights can still overflow the forward pass: keep them out of every
                # checkpoint and export (_closing_on_error closes the checkpoint manager).
                raise TrainingDivergedError(
                    f"training diverged: the validation loss after epoch {epoch + 1} is not "
                    f"finite ({val_loss}); nothing from this epoch was saved or exported. "
                    + DIVERGENCE_REMEDIES
                )
            if tc.lr_schedule == "plateau":
                before = float(jax.device_get(plateau_scale(tc, state.opt_state)))
                # Stage 2 starts at its own peak rate: the rule starts over there.
                state = _advance_plateau(
                    tc, state, val_loss, restart=epoch + 1 == tc.head_only_epochs
                )
                after = float(jax.device_get(plateau_scale(tc, state.opt_state)))
                if after < before:
                    log.info(
                        "validation loss not lower for %d epoch%s: learning rate x%g, now %g "
                        "of the peak",
                        tc.plateau_patience,
                        "" if tc.plateau_patience == 1 else "s",
                        tc.plateau_factor,
                        after,
                    )
            sums = progress["sums"]
            n = max(sums["steps"], 1)
            record = {
                "epoch": epoch + 1,
                "step": global_step,
                "stage": "head" if frozen else "all",
                "train_loss": sums["loss"] / n,
                "train_accuracy": sums["accuracy"] / n,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "learning_rate": float(jax.device_get(metrics["learning_rate"])),
                "images_per_sec": sums["steps"] * tc.batch_size / max(sums["seconds"], 1e-9),
                "epoch_seconds": sums["seconds"],
                "skipped_steps": sums.get("skipped", 0),
            }
            progress["epoch"] = epoch + 1
            progress["step_in_epoch"] = 0
            progress["sums"] = _new_sums()
            improved = _track_early_stopping(progress, val_acc, epoch, frozen, tc)
            record["best_val_accuracy"] = progress["best_val_accuracy"]

            if jax.process_index() == 0:
                if improved:
                    _export_best(workdir, config, classes, state, record)
                with open(workdir / METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            history.append(record)
            if improved:
                save("best")
            save("latest")
            bar.write(
                f"epoch {epoch + 1}/{tc.epochs}: loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.3f} val_loss {val_loss:.4f} "
                f"val_acc {val_acc:.3f}" + (" (best)" if improved else "")
            )
            if progress["stopped_early"]:
                log.info(
                    "early stopping: no val-accuracy gain for %d epochs",
                    tc.early_stopping_patience,
                )
                break

    ckpts.close()
    if jax.process_index() == 0 and history:
        plot_curves(history, workdir / CURVES_FILE)
    return result(False)


def _track_early_stopping(
    progress: dict[str, Any], val_acc: float, epoch: int, frozen: bool, tc: TrainConfig
) -> bool:
    """Updates ``progress`` after epoch ``epoch`` (0-based) with its validation accuracy: the
    best so far, the epochs without a new best, and whether the run stopped early or finished.

    The head-only stage (``frozen``) never stops the run: it prepares the fine-tuning, and a
    frozen backbone soon stalls. Its epochs do not count towards the patience; stage 2 starts
    its own count (against the best accuracy so far, stage 1's included).

    Returns:
      Whether this epoch set a new best.
    """
    improved = val_acc > progress["best_val_accuracy"]
    if improved:
        progress["best_val_accuracy"] = val_acc
        progress["best_epoch"] = epoch + 1
        progress["epochs_without_improvement"] = 0
    elif not frozen:
        progress["epochs_without_improvement"] += 1
    else:
        progress["epochs_without_improvement"] = 0
    if _out_of_patience(progress, tc):
        progress["stopped_early"] = True
    progress["finished"] = progress["stopped_early"] or epoch + 1 == tc.epochs
    return improved


def _patience_used_up(progress: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a resumed run stops at once because a lowered ``early_stopping_patience`` is
    already used up (the rule is otherwise applied only as an epoch ends, so the run would
    train another epoch first). Marks ``progress`` stopped early and finished if so; nothing
    is saved (the latest checkpoint holds this state: each rerun decides the same)."""
    if progress["finished"] or not _out_of_patience(progress, tc):
        return False
    progress["stopped_early"] = progress["finished"] = True
    return True


def _out_of_patience(progress: dict[str, Any], tc: TrainConfig) -> bool:
    """The early-stopping rule: ``early_stopping_patience`` epochs without a new best."""
    return progress["epochs_without_improvement"] >= tc.early_stopping_patience


def _new_sums() -> dict[str, float]:
    return {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0, "skipped": 0}


@contextlib.contextmanager
def _closing_on_error(resource):
    """Closes ``resource`` (a prefetcher, the checkpoint manager) if the block raises."""
    try:
        yield resource
    except BaseException:
        resource.close()
        raise


DIVERGENCE_REMEDIES = (
    "Usual causes: a learning rate too high for this batch size (train.learning_rate, "
    "train.finetune_learning_rate); reduced precision (try --set model.dtype=float32); a GPU "
    "convolution kernel that returns non-finite gradients (try --set model.depthwise_impl=gemm, "
    "see docs/BENCHMARKS.md). Fix the cause and run the same command again: it resumes from the "
    "latest checkpoint (delete the work directory to start over). train.max_nonfinite_steps "
    "sets how many non-finite steps in a row are tolerated."
)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; training cannot go on."""


class _NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; raises once there are ``limit`` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[int] = []  # the steps of the current run of skipped steps

    def step(self, step: int, skipped: bool, loss: float, grad_norm: float) -> None:
        if not skipped:
            self.run.clear()
            return
        self.run.append(step)
        log.warning(
            "step %d skipped: loss %s, gradient norm %s (not finite); weights unchanged",
            step, loss, grad_norm,
        )  # fmt: skip
        if len(self.run) >= self.limit:
            raise TrainingDivergedError(
                f"training diverged: the loss or gradient was not finite in {len(self.run)} "
                f"consecutive steps ({self.run[0]} to {self.run[-1]}); none of them updated the "
                "weights, and nothing was saved after them. " + DIVERGENCE_REMEDIES
            )


class _Meter:
    """Running sums of the step metrics, read from the device only at log intervals."""

    def __init__(self, sums: dict[str, float], bar, batch_size: int, guard: _NonFiniteGuard):
        self.sums, self.bar, self.batch_size, self.guard = sums, bar, batch_size, guard
        self._pending: list[dict] = []
        self._tick = time.perf_counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def leave_out(self, seconds: float) -> None:
        """Keeps ``seconds`` just spent (compiling a step) out of the images/s and out of the
        bar's rate, hence its time left: the bar updates once per ``log_every_steps``, maybe
        once an epoch, and a 90 s compile counted as one epoch's time would show an hour left
        for a few minutes' run, for epochs. Its elapsed time stays the wall-clock time.
        """
        self._tick += seconds
        if not self.bar.disable:
            self.bar.last_print_t += seconds  # tqdm's rate: steps / time since its last print

    def flush(self) -> None:
        """One host sync: adds every pending step (in order, so sums resume exactly).

        Skipped steps count in ``sums["skipped"]`` and not in the loss and accuracy averages.
        Raises TrainingDivergedError after too many consecutive skipped steps.
        """
        s = self.sums
        pending, self._pending = self._pending, []
        for m in jax.device_get(pending):
            skipped = bool(m["skipped"])
            self.guard.step(int(m["step"]), skipped, float(m["loss"]), float(m["grad_norm"]))
            if skipped:
                s["skipped"] = s.get("skipped", 0) + 1
                continue
            s["loss"] += float(m["loss"])
            s["accuracy"] += float(m["accuracy"])
            s["steps"] += 1
        now = time.perf_counter()
        s["seconds"] += now - self._tick
        self._tick = now
        if pending and s["steps"]:
            n = s["steps"]
            self.bar.set_postfix(
                loss=f"{s['loss'] / n:.4f}",
                acc=f"{s['accuracy'] / n:.3f}",
                img_s=f"{n * self.batch_size / max(s['seconds'], 1e-9):.0f}",
                refresh=False,
            )
        self.bar.update(len(pending))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a function of (seed, epoch) only, so resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _train_batches(
    source: Source,
    order: np.ndarray,
    batch_size: int,
    first: int,
    steps: int,
    config: Config,
    mesh: jax.sharding.Mesh,
) -> Iterator[dict[str, jax.Array]]:
    """Batches ``first..steps-1`` of an epoch, on the mesh: this process' rows of each.

    One gather per batch on the host (the row order is the epoch's order) and the copy to the
    devices; run under :func:`_prefetch`, both overlap the steps.
    """
    local = sharding.process_slice(batch_size)
    for i in range(first, steps):
        images, labels = source.get_batch(order[i * batch_size : (i + 1) * batch_size][local])
        host = {
            "image": _add_time_axis(images, config.model.num_frames),
            "label": np.asarray(labels, np.int32),
        }
        yield sharding.shard_batch(host, mesh, batch_size)


def _add_time_axis(images: np.ndarray, num_frames: int) -> np.ndarray:
    """(B, H, W, 3) still images -> (B, T, H, W, 3), repeating the still when T > 1.

    For T = 1 the result is a view: no copy.
    """
    images = np.asarray(images)
    if images.ndim == 5:
        return images
    if num_frames == 1:
        return images[:, None]
    return np.repeat(images[:, None], num_frames, axis=1)


class _Prefetch:
    """Runs an iterator ``depth`` items ahead on a thread while the device computes (in order)."""

    def __init__(self, iterator: Iterator, depth: int = 2):
        self._it = iterator
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._queue: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        for _ in range(depth):
            self._queue.append(self._pool.submit(self._next))

    def _next(self):
        with self._lock:
            return next(self._it, _DONE)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.pop(0).result()
        if item is _DONE:
            raise StopIteration
        self._queue.append(self._pool.submit(self._next))
        return item

    def close(self):
        for f in self._queue:
            f.cancel()
        self._pool.shutdown(wait=True)


_DONE = object()


def _prefetch(iterator: Iterator, depth: int = 2) -> _Prefetch:
    return _Prefetch(iterator, depth)


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


# Training settings a resumed run may change: when to log or stop (not what a step does), and
# the peak learning rates, whose lowering is the usual remedy for a diverged run (a warning
# says that the run then leaves the uninterrupted run's trajectory).
RESUMABLE_CHANGES = ("log_every_steps", "max_nonfinite_steps", "early_stopping_patience")
REMEDY_CHANGES = ("learning_rate", "finetune_learning_rate")


def check_resume(workdir: str | Path, config: Config) -> None:
    """Refuses at once to resume ``workdir``'s run with other settings: the check :func:`fit`
    makes as it resumes, made before the data is prepared (minutes and gigabytes for a data set
    at a new image size, only to be refused). The class count, which comes from the data, is
    left to fit. A pretrained source that cannot load is refused here too, for the same reason.

    Raises:
      ValueError: naming each setting that differs from the saved one, or what is wrong with
        ``model.pretrained``.
    """
    from har_flax.weights import check_pretrained_source

    check_pretrained_source(config.model.pretrained, config.model.width)
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    latest = workdir / TRAIN_CHECKPOINTS_DIR / "latest"
    # A run resumes from a checkpoint (orbax names each by its step): no checkpoint, no resume.
    if not path.exists() or not any(p.name.isdigit() for p in _children(latest)):
        return
    saved = Config.from_json(path.read_text(encoding="utf-8"))
    classes = {"model.num_classes": saved.model.num_classes}
    saved_epochs = _check_resumable_config(workdir, override(config, classes), warn=False)
    if saved_epochs is not None:  # refused unless the run has finished
        progress = saved_progress(workdir / TRAIN_CHECKPOINTS_DIR)
        if progress is not None and not progress.get("finished", True):
            raise ValueError(_epochs_refusal(workdir, saved_epochs, config.train.epochs))


def _epochs_refusal(workdir: Path, saved: int, requested: int) -> str:
    return (
        f"{workdir} holds an unfinished run of train.epochs={saved}, whose learning-rate "
        f"schedule is fixed, so train.epochs={requested} cannot resume it; resume with "
        f"train.epochs={saved}, or use a new --workdir"
    )


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _check_resumable_config(workdir: Path, config: Config, warn: bool = True) -> int | None:
    """Refuses to resume a checkpoint made with another model or other training settings.

    The compute settings (``model.dtype``, ``model.depthwise_impl``) may change: they leave the
    variables as they are, and switching them is the remedy for some numerical failures. So
    may :data:`RESUMABLE_CHANGES`, and :data:`REMEDY_CHANGES` lowered, with a warning (a
    lower rate is the remedy for a diverging run; a higher one is a new run). Every other
    training setting shapes the trajectory (the batches, the schedule, the optimiser state's
    structure), so a resumed run with another value would be neither run. Every refused
    difference, of the model and of training, is named in one error.

    Returns:
      The saved ``train.epochs`` when the requested one differs (else None): allowed only for a
      finished run, which the caller knows once it has restored the checkpoint.
    """
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    old = Config.from_json(path.read_text(encoding="utf-8"))
    hint = (
        f"use a new work directory, or the saved settings ({path}: har-train uses them when "
        "given no --config; in Python, fit(get_config(that path), ...))"
    )
    compute = ("dtype", "depthwise_impl")
    model_changed = _differences(old.model, config.model, ignore=compute)
    changed = _differences(old.train, config.train, ignore=RESUMABLE_CHANGES)
    refused = {f"model.{k}": v for k, v in model_changed.items()}
    for k, (saved, requested) in changed.items():
        if k == "epochs" or (k in REMEDY_CHANGES and requested <= saved):
            continue
        refused[f"train.{k}"] = (saved, requested)
    if refused:
        listed = "; ".join(f"{k}: {a!r} saved, {b!r} requested" for k, (a, b) in refused.items())
        raising = [k for k in refused if k.split(".")[1] in REMEDY_CHANGES]
        note = (
            f" ({' and '.join(raising)} may only be lowered, the remedy for a diverging run)"
            if raising
            else ""
        )
        raise ValueError(
            f"{workdir} holds a run with other settings, which a resumed run cannot change: "
            f"{listed}{note}; {hint}"
        )
    for k in REMEDY_CHANGES:
        if warn and k in changed:
            log.warning(
                "resuming with train.%s=%g (saved: %g): the rest of the run follows the new "
                "value, so it will not end where an uninterrupted run would",
                k,
                changed[k][1],
                changed[k][0],
            )
    return changed["epochs"][0] if "epochs" in changed else None


def _differences(old: Any, new: Any, ignore: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for the fields of two config dataclasses that differ."""
    return {
        k: (v, getattr(new, k))
        for k, v in dataclasses.asdict(old).items()
        if k not in ignore and getattr(new, k) != (tuple(v) if isinstance(v, list) else v)
    }


def _read_history(workdir: Path, keep_epochs: int) -> list[dict]:
    """metrics.jsonl up to the checkpointed epoch.

    A crash may have left lines past it, or half a line (a kill or a full disk during the
    append): both are dropped, since the resumed run writes those epochs again.
    """
    path = workdir / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(text.splitlines()):
                raise ValueError(
                    f"{path}, line {number}, is not JSON ({e.msg}); fix or delete that line "
                    "(the checkpoints do not depend on it), then run again"
                ) from e
            log.warning("%s: dropped its unfinished last line %d", path, number)
            break
        lines.append(record)
    kept = [r for r in lines if r["epoch"] <= keep_epochs]
    if len(kept) < len(lines):
        log.warning(
            "%s: dropped epochs %s, past the latest checkpoint (%s); they are trained again",
            path,
            ", ".join(str(r["epoch"]) for r in lines if r["epoch"] > keep_epochs),
            f"epoch {keep_epochs}" if keep_epochs else "none",
        )
    rewritten = "".join(json.dumps(r) + "\n" for r in kept)
    if rewritten != text and jax.process_index() == 0:
        atomic_write_text(path, rewritten)
    return kept


def _export_best(
    workdir: Path, config: Config, classes: tuple[str, ...], state: TrainState, record: dict
) -> None:
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    save_model(
        workdir / MODEL_DIR,
        config=config,
        classes=classes,
        variables=variables,
        kind="action",
        metadata={
            "version": f"{config.name}-epoch{record['epoch']}-step{record['step']}",
            "epoch": record["epoch"],
            "step": record["step"],
            "val_accuracy": record["val_accuracy"],
            "val_loss": record["val_loss"],
        },
    )


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy per epoch (train and validation), and the learning rate at each
    epoch's end (where the schedule, or the plateau rule, took it), as a PNG written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="validation")
        ax.set_title(key)
        ax.legend()
    rates = [r["learning_rate"] for r in history]
    ax_lr.plot(epochs, rates, "o-", color="tab:green")
    if min(rates) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate (head, end of epoch)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)


class _StopRequest:
    """Called, says whether a signal asked this process to stop; ``signum`` is that signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed_signum: int | None = None  # a signal that stopped the run (any process's)

    def __call__(self) -> bool:
        return self.signum is not None

    def agreed(self) -> bool:
        """Whether the run stops here: the same answer on every process.

        With several processes, a signal reaches each at its own time (a preemption), or only
        one (Ctrl-C on one host); one process stopping alone, at its own step, would leave the
        others waiting for it in their next collective, for ever. So the processes compare
        their requests (a collective: call it at the same step everywhere, where the host
        syncs anyway) and stop together. One process: its own request, at once.
        """
        signums = [s for s in sharding.gather_ints(self.signum or 0) if s]
        if signums:
            self.agreed_signum = signums[0]
        return bool(signums)


@contextlib.contextmanager
def _stop_on_signal():
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step (a second one kills).

    Yields a :class:`_StopRequest` (never set outside the main thread, where Python delivers
    no signal).
    """
    requested = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {}

    def handler(signum, frame):
        if requested():
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        requested.signum = signum
        log.warning("signal %d: saving a checkpoint and stopping (send again to kill)", signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
