"""Data parallelism with ``jax.sharding``: a mesh over all devices, batch sharded, state replicated.

Multi-host runs start with :func:`maybe_initialize_distributed`, which calls
``jax.distributed.initialize()`` only when its environment is set, so a laptop run never waits
for a coordinator. Each process then feeds its own slice of every global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

T = TypeVar("T")

# Environment variables that ask for a multi-process run (the names jax.distributed reads, plus
# the two it takes as arguments).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def maybe_initialize_distributed(environ: dict[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is set.

    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the process count and this process' index
    (on clusters JAX detects itself, such as Cloud TPU pods or SLURM, they may be left out).
    Must run before anything touches a device.

    Returns:
      True when the distributed runtime was initialised by this call.
    """
    env = os.environ if environ is None else environ
    address = env.get(COORDINATOR_ENV)
    if not address:
        return False
    kwargs: dict[str, Any] = {"coordinator_address": address}
    for key, name in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
        if env.get(key):
            try:
                kwargs[name] = int(env[key])
            except ValueError:
                raise ValueError(f"{key} must be an integer, got {env[key]!r}") from None
    jax.distributed.initialize(**kwargs)
    return True


def process_zero_first(fn: Callable[[], T], name: str) -> T:
    """Calls ``fn`` on process 0 first, then on the other processes.

    For work on files that processes may share, such as preparing the data set in a work
    directory on a shared disk: started together, processes would race to write the same
    files. Here the others wait at a barrier until process 0 is done, then find its result
    ready (or, on local disks, make their own). If ``fn`` raises on process 0, the others
    still pass the barrier and run ``fn`` themselves, so bad data stops every process with
    the same error rather than leaving them waiting. One process: just ``fn()``.

    Args:
      fn: the work.
      name: the barrier's name, the same on every process.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_index() == 0:
        try:
            return fn()
        finally:
            multihost_utils.sync_global_devices(name)
    multihost_utils.sync_global_devices(name)
    return fn()


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding for parameters and optimiser state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding for a batch: the leading axis split over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the global batch splits evenly over devices and processes."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} does not split over {n} devices; use a multiple of {n} "
            f"(e.g. --set train.batch_size={max(n, batch_size // n * n)})"
        )
    if batch_size % jax.process_count():
        raise ValueError(
            f"batch size {batch_size} does not split over {jax.process_count()} processes"
        )


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch this process loads (contiguous, in process order)."""
    local = global_batch // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def shard_batch(batch: Any, mesh: Mesh, global_batch: int) -> Any:
    """Places this process' rows of a global batch onto the mesh, split along the batch axis.

    Args:
      batch: a pytree of host arrays holding this process' rows, leading axis
        ``global_batch // process_count``.
      mesh: the data-parallel mesh.
      global_batch: the batch size over all processes.

    Returns:
      The same pytree of global ``jax.Array``s with leading axis ``global_batch``.
    """
    sharding = batch_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of arrays to every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def gather_ints(value: int) -> list[int]:
    """Every process's ``value``, in process order: a collective, so every process must call it
    at the same point of its program. One process: ``[value]``."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    gathered = multihost_utils.process_allgather(np.array([value], np.int32))
    return [int(v) for v in np.asarray(gathered).reshape(-1)]
