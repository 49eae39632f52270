"""Joining a multi-process JAX job, and the few cross-process helpers the entry points share.

A TPU pod slice or a multi-node GPU job runs one process per host; every process runs the same
command and ``jax.distributed.initialize`` connects them (JAX's own coordination service, no
framework of ours). The entry points (scripts/train.py, scripts/sample.py, scripts/evaluate.py)
take the same flags:

  --coordinator_address HOST:PORT   process 0's address (default: $JAX_COORDINATOR_ADDRESS, or
                                    auto-detected on Cloud TPU, SLURM, Open MPI, GKE)
  --num_processes N                 number of processes (auto-detected where JAX can)
  --process_id I                    this process, in [0, N) (auto-detected where JAX can)
  --distributed                     join a job whose settings JAX auto-detects (TPU pod, SLURM)
  --heartbeat_timeout_s S           a process silent for S seconds is dead: the others stop
                                    with an error (JAX's default 100 s)

Without any of them a script runs single-process, as before. On CPU (``JAX_PLATFORMS=cpu``,
the tests) cross-process collectives need gloo, which :func:`initialize` selects.
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any, Sequence

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The distributed flags (module docstring) on an argparse parser."""
    g = parser.add_argument_group("multi-process (one process per host; docs: README "
                                  "'Multi-host')")
    g.add_argument("--coordinator_address", default=None,
                   help="HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS / auto)")
    g.add_argument("--num_processes", type=int, default=None, help="number of processes")
    g.add_argument("--process_id", type=int, default=None, help="this process, in [0, N)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process job with JAX's auto-detected settings")
    g.add_argument("--heartbeat_timeout_s", type=int, default=None,
                   help="seconds after which a silent process counts as dead (JAX: 100)")


def requested(coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, distributed: bool = False) -> bool:
    """Whether the flags (or $JAX_COORDINATOR_ADDRESS) ask for a multi-process job."""
    return bool(distributed or coordinator_address or num_processes is not None
                or process_id is not None or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int | None = None) -> None:
    """``jax.distributed.initialize`` with these settings (None = JAX's auto-detection / default);
    a no-op when this process has already joined. Must run before any JAX computation.

    Raises ValueError naming the flag for an inconsistent combination."""
    import jax

    if jax.distributed.is_initialized():
        return
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None \
            and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} is not in [0, --num_processes "
                         f"{num_processes})")
    if heartbeat_timeout_s is not None and heartbeat_timeout_s < 1:
        raise ValueError(f"--heartbeat_timeout_s must be >= 1, got {heartbeat_timeout_s}")
    if _cpu_only():  # XLA:CPU has no cross-process collectives unless told to use gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {k: v for k, v in (
        ("coordinator_address", coordinator_address), ("num_processes", num_processes),
        ("process_id", process_id), ("heartbeat_timeout_seconds", heartbeat_timeout_s))
        if v is not None}
    jax.distributed.initialize(**kwargs)


def initialize_from_args(args) -> None:
    """:func:`initialize` from :func:`add_arguments`' flags, when they ask for it."""
    if requested(args.coordinator_address, args.num_processes, args.process_id,
                 args.distributed):
        initialize(args.coordinator_address, args.num_processes, args.process_id,
                   args.heartbeat_timeout_s)


def _cpu_only() -> bool:
    import jax

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().lower() == "cpu"


# ----------------------------------------------------------------------------------------------
# Work split and gathering.
# ----------------------------------------------------------------------------------------------


def process_index_and_count() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) when this process has not joined a
    job with :func:`initialize` (then no JAX backend is started here)."""
    import jax

    if not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the shared outputs (process 0, or a single process)."""
    return process_index_and_count()[0] == 0


def my_share(n: int, process_index: int | None = None,
             process_count: int | None = None) -> list[int]:
    """Indices of ``n`` work items this process does: ``range(n)[process_index::process_count]``
    (each item by exactly one process; shares differ by at most one item)."""
    index, count = process_index_and_count()
    p = index if process_index is None else process_index
    count = count if process_count is None else process_count
    return list(range(n))[p::count]


def sum_over_processes(value: int) -> int:
    """The sum of an integer over every process (every process must call it)."""
    if process_index_and_count()[1] == 1:
        return int(value)
    from jax.experimental import multihost_utils

    barrier("goal_jax.sum_over_processes")  # the collective starts everywhere together
    return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int64))))


def gather_share(local: np.ndarray, n: int) -> np.ndarray:
    """The ``[n, ...]`` array whose rows :func:`my_share` gave to each process, from every
    process's ``local`` rows (``[len(my_share(n)), ...]``), on every process."""
    local = np.asarray(local)
    count = process_index_and_count()[1]
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    barrier("goal_jax.gather_share")  # shares take different times: start the gather together
    rows = -(-n // count)  # the largest share; smaller shares are padded to it
    padded = np.zeros((rows,) + local.shape[1:], local.dtype)
    padded[: len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded))  # [count, rows, ...]
    out = np.zeros((n,) + local.shape[1:], local.dtype)
    for p in range(count):
        share = my_share(n, p, count)
        out[share] = every[p, : len(share)]
    return out


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches the barrier ``name``, through JAX's coordination
    service (no device collective: a process may arrive up to ``timeout_s`` later, e.g. after a
    longer compile or a larger share of work, where gloo's CPU collectives give a late peer
    30 s). No-op single-process. Every process must pass the same barriers in the same order."""
    if process_index_and_count()[1] == 1:
        return
    from jax._src import distributed as jax_distributed  # the client jax.distributed made

    jax_distributed.global_state.client.wait_at_barrier(f"{name}.{next(_BARRIERS)}",
                                                        timeout_in_ms=timeout_s * 1000)


def local_devices(devices: Sequence[Any]) -> list:
    """The devices of ``devices`` that belong to this process."""
    import jax

    return [d for d in devices if d.process_index == jax.process_index()]
