"""Device mesh, batch and parameter shardings, multi-host helpers (jit with shardings, no pmap).

The mesh has two axes, ``('data', 'fsdp')``, over all devices (all hosts):

* the **batch** is split along its leading axis over both axes together (``P(('data', 'fsdp'))``):
  every device sees a different slice of the global batch; ``fsdp`` devices are data-parallel too
  (ZeRO-3 style), they only additionally split the parameters;
* **parameters** (and optimizer state) are replicated by default (``mode="replicated"``), or, with
  ``mode="fsdp"``, every array with at least ``min_size`` elements is split over ``'fsdp'`` along
  its largest axis that the fsdp size divides (others stay replicated). XLA inserts the
  all-gathers / reduce-scatters.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` when asked; each
host feeds its local slice of the batch and :func:`put_batch` assembles the global arrays with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def initialize_distributed(enabled: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Calls ``jax.distributed.initialize`` (multi-host) when ``enabled`` and this process has
    not joined yet (goal_jax.distributed.initialize); no-op otherwise.

    On Cloud TPU and SLURM/GKE the arguments are auto-detected and may stay None."""
    if not enabled:
        return
    from goal_jax import distributed

    distributed.initialize(coordinator_address, num_processes, process_id)


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) with axis names ('data', 'fsdp').

    Args:
      data: size of the data axis; -1 = all devices / fsdp.
      fsdp: size of the fsdp axis.
      devices: default ``jax.devices()`` (all hosts).
    Raises:
      ValueError: when data * fsdp does not equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except Exception:  # non-standard topologies / simulated devices
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, DATA_AXES)


def mesh_from_config(sharding_config) -> Mesh:
    """The run's mesh from ``config.sharding`` (fields ``distributed``, ``data``, ``fsdp``; see
    goal_jax.train): initialises multi-host JAX first when ``distributed`` is set."""
    initialize_distributed(bool(sharding_config.get("distributed", False)))
    return create_mesh(int(sharding_config.get("data", -1)), int(sharding_config.get("fsdp", 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(DATA_AXES))


def param_spec(shape: Sequence[int], fsdp_size: int, mode: str = "replicated",
               min_size: int = 2 ** 14) -> P:
    """PartitionSpec for one parameter array (see the module docstring)."""
    if mode == "replicated" or fsdp_size == 1:
        return P()
    if mode != "fsdp":
        raise ValueError(f"parameter sharding mode must be 'replicated' or 'fsdp', got {mode!r}")
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh, mode: str = "replicated",
                    min_size: int = 2 ** 14) -> Any:
    """A NamedSharding for every array leaf of ``tree`` (params or optimizer state; arrays or
    ShapeDtypeStructs). Scalars and small arrays are replicated."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), fsdp, mode, min_size))

    return jax.tree_util.tree_map(one, tree)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Places every leaf of ``tree`` with the matching sharding (single-host arrays)."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local batch (numpy, leading axis = this host's share) -> global sharded jax arrays.

    Every host passes its own ``local_batch = global_batch / process_count`` rows; the global
    batch size must be divisible by the number of devices."""
    sharding = batch_sharding(mesh)
    n_dev = mesh.devices.size
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % n_dev:
            raise ValueError(
                f"batch[{key!r}]: global batch size {global_rows} is not divisible by the "
                f"{n_dev} devices of the mesh"
            )
        global_shape = (global_rows,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def jit_sharded(fn: Callable, in_shardings, out_shardings,
                donate_argnums: Sequence[int] = (0,)) -> Callable:
    """``jax.jit`` with explicit in/out shardings (pytrees of NamedSharding matching the
    arguments / results) and donation of the train state."""
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums))
