"""Data parallelism: 4 fake CPU devices train the same trajectory as 1 device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from har_flax import sharding

# Runs in a fresh interpreter: the device count is fixed when JAX starts.
FOUR_DEVICES = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from har_flax import sharding, train
    from har_flax.config import override, tiny

    assert jax.device_count() == 4, jax.devices()
    # "conv" depthwise: fewer ops than the CPU's "shift" form, so two compiles cost less. A small
    # learning rate: Adam's first steps are ~lr * sign(g), so at tiny's 3e-3 a float-rounding
    # difference in a near-zero gradient (the sums run in another order over 4 devices) grows
    # into a different trajectory within a few steps; 1e-4 keeps the comparison about sharding.
    config = override(tiny(), {"train.batch_size": 8, "model.bn_momentum": 0.9,
                               "model.depthwise_impl": "conv", "train.learning_rate": 1e-4})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 1, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (6, 8)).astype(np.int32)

    def run(devices):
        mesh = sharding.make_mesh(devices)
        state = sharding.replicate(train.create_train_state(config, 6), mesh)
        step = train.make_train_step(config, 6)
        losses = []
        for i in range(6):
            batch = sharding.shard_batch({"image": images[i], "label": labels[i]}, mesh, 8)
            state, m = step(state, batch, jax.random.key(0))
            losses.append(float(m["loss"]))
        kernel = state.params["logits"]["kernel"]
        split = batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
        return losses, np.asarray(kernel).tolist(), bool(split), len(kernel.sharding.device_set)

    one = run(jax.devices()[:1])
    four = run(jax.devices())
    print(json.dumps({"one": one, "four": four}))
    """
)


def test_four_devices_follow_the_one_device_trajectory():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (loss1, kernel1, _, ndev1), (loss4, kernel4, split4, ndev4) = out["one"], out["four"]
    assert (ndev1, ndev4) == (1, 4)  # params replicated on every device
    assert split4  # the batch split over the data axis
    # Same numbers up to the order of float reductions.
    np.testing.assert_allclose(loss4, loss1, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(kernel4, kernel1, rtol=1e-3, atol=1e-5)
    assert len(set(np.round(loss1, 4))) > 1  # it trained: the loss moved


def test_batch_must_split_over_devices():
    mesh = sharding.make_mesh()
    sharding.check_batch_size(mesh.devices.size * 3, mesh)
    if mesh.devices.size > 1:  # pragma: no cover - only on multi-device machines
        with pytest.raises(ValueError, match="does not split over"):
            sharding.check_batch_size(mesh.devices.size + 1, mesh)


def test_shard_batch_and_replicate_place_arrays():
    mesh = sharding.make_mesh()
    batch = sharding.shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh, 8)
    assert batch["x"].shape == (8, 3)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(24).reshape(8, 3))
    tree = sharding.replicate({"w": np.ones(3)}, mesh)
    assert tree["w"].sharding.is_fully_replicated


def test_distributed_init_only_when_asked():
    assert sharding.maybe_initialize_distributed({}) is False
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        sharding.maybe_initialize_distributed(
            {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two"}
        )
