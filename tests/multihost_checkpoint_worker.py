"""One process of a multi-host checkpoint test (tests/test_multihost.py); not a test itself.

Usage: python tests/multihost_checkpoint_worker.py DIRECTORY SAVES, with the environment of a
two-process run (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). It saves the way
``fit`` does at the end of an epoch, as fast as it can: "best" (two steps in three), then
"latest", each in the background, so that the two managers' saves overlap. Then it restores
both and prints what it read as one line of JSON.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from har_flax import sharding
from har_flax.checkpoint import TrainCheckpoints


def main(directory: str, saves: int) -> None:
    if not sharding.maybe_initialize_distributed():
        raise SystemExit("set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    mesh = sharding.make_mesh()
    state = sharding.replicate({"w": np.zeros(4096, np.float32), "step": np.int32(0)}, mesh)
    # Donated, as a train step is: the next step overwrites the buffers a save copies from.
    step_fn = jax.jit(lambda s: {"w": s["w"] + 1.0, "step": s["step"] + 1}, donate_argnums=0)
    ckpts = TrainCheckpoints(directory)
    for step in range(1, saves + 1):
        state = step_fn(state)
        progress = {"epoch": step}
        if step % 3:
            ckpts.save("best", step, state, progress)
        ckpts.save("latest", step, state, progress)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        state,
    )
    read = {}
    for which in ("best", "latest"):
        restored, progress = ckpts.restore(which, abstract)
        w = [float(jax.device_get(f(restored["w"]))) for f in (jnp.min, jnp.max)]
        read[which] = {
            "saved_step": ckpts.latest_step(which),
            "step": int(jax.device_get(restored["step"])),
            "w": w,
            "progress": progress,
        }
    ckpts.close()
    print(json.dumps({"process": jax.process_index(), **read}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
