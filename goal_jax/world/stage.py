"""A resumable training stage: jit step, orbax checkpoints, metrics JSONL, progress with ETA.

Every stage of the world recipe is ``run_stage(...)`` with its own step function. The batch of
step ``k`` is a pure function of ``k`` (the caller seeds it with ``[seed, k]``), and the state
(params, optimizer state, EMA, step) is saved by orbax every ``save_every`` steps, so an
interrupted stage restarts from its last save and computes the same steps as an uninterrupted
run. ``<stage_dir>/metrics.jsonl`` has one line per logged step (lines past the restored step
are dropped on resume, so each step appears once).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from goal_jax.world.data import progress


def adamw(learning_rate: float, steps: int, warmup: int = 200, weight_decay: float = 0.0,
          clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 10 % of ``learning_rate``."""
    warmup = min(warmup, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=0.1 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))


def init_state(params, tx: optax.GradientTransformation, ema: bool = False) -> dict:
    """{"step", "params", "opt_state"[, "ema"]} with a float32 copy of params as the EMA."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema"] = jax.tree_util.tree_map(jnp.array, params)
    return state


def apply_gradients(state: dict, grads, tx: optax.GradientTransformation,
                    ema_decay: float = 0.0) -> dict:
    """One optax update of ``state["params"]`` (and the EMA when present)."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if "ema" in state:
        # Warm-up of the decay (as in diffusers' EMAModel): early steps follow the weights.
        step = (state["step"] + 1).astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        new["ema"] = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p,
                                            state["ema"], params)
    return new


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def run_stage(name: str, stage_dir: str, state: dict, step_fn: Callable, batch_fn: Callable,
              steps: int, log_every: int = 50, save_every: int = 500,
              log: Callable[[str], Any] = print) -> tuple[dict, dict]:
    """Trains ``state`` for ``steps`` steps (resuming from ``stage_dir`` when it has a save).

    Args:
      name: stage name for the progress lines.
      stage_dir: folder of this stage (``ckpt/``, ``metrics.jsonl``, ``done.json``).
      state: the initial state pytree (also the restore target).
      step_fn: jitted ``(state, batch) -> (state, metrics dict of scalars)``.
      batch_fn: ``k -> batch`` for step k (deterministic in k).
      steps: total steps of the stage.
    Returns:
      (final state, {"steps", "seconds" (this run's wall time), "last metrics"}).
    """
    os.makedirs(stage_dir, exist_ok=True)
    done_path = os.path.join(stage_dir, "done.json")
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(stage_dir, "ckpt")),
        # Synchronous saves: a stage saves every few hundred steps, and a save finished before
        # the next step starts cannot race the deletion of the previous one.
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=False))
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        start = int(latest)
        log(f"[{name}] resumed at step {start}/{steps}")
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    _truncate_metrics(metrics_path, start)
    t0, last, sums, count = time.time(), {}, {}, 0
    with open(metrics_path, "a", encoding="utf-8") as mf:
        for k in range(start, steps):
            state, metrics = step_fn(state, batch_fn(k))
            sums = metrics if not sums else jax.tree_util.tree_map(jnp.add, sums, metrics)
            count += 1
            if (k + 1) % log_every == 0 or k + 1 == steps:
                last = {key: float(v) / count for key, v in jax.device_get(sums).items()}
                if not all(np.isfinite(v) for v in last.values()):
                    raise FloatingPointError(f"[{name}] non-finite metrics at step {k + 1}: {last}"
                                             " (the last save on disk is from before this step)")
                mf.write(json.dumps({"step": k + 1, **last}) + "\n")
                mf.flush()
                progress(name, k + 1, steps, t0, start, last)
                sums, count = {}, 0
            if (k + 1) % save_every == 0 and k + 1 < steps:
                manager.save(k + 1, args=ocp.args.StandardSave(state))
    if latest is None or latest < steps:
        manager.save(steps, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    seconds = time.time() - t0
    if start < steps or not os.path.isfile(done_path):
        prev = {}
        if os.path.isfile(done_path):
            with open(done_path, encoding="utf-8") as f:
                prev = json.load(f)
        info = {"steps": steps, "seconds": prev.get("seconds", 0.0) + seconds, "metrics": last}
        with open(done_path, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    with open(done_path, encoding="utf-8") as f:
        return state, json.load(f)
