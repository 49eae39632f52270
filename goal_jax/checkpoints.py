"""Training checkpoints: a thin wrapper over ``orbax.checkpoint.CheckpointManager``.

Layout of a checkpoint directory (``<workdir>/checkpoints``)::

    <step>/state/   the train-state pytree (orbax StandardSave; sharded arrays are written
                    shard-wise and restored onto the shardings of the restore target)
    <step>/data/    JSON: the input iterator state, so a resumed run sees the same batches
    <step>/meta/    JSON: free-form metadata (config, step, wall time, base model paths...)

Saving is asynchronous by default (the next train steps run while the arrays are written);
``wait()`` blocks until the last save is on disk. Only the last ``max_to_keep`` steps are kept.
Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` (uint32) and wrapped
again on restore, so ``TrainState.rng`` round-trips exactly.

The data-iterator state may be any JSON value, or ``bytes`` (e.g. a serialized tf.data
iterator), which is stored base64-encoded.

Failures are loud and early: the directory is checked writable when the manager opens
(:class:`CheckpointSaveError`, no hang), :meth:`CheckpointManager.check_for_errors` raises as
soon as a background save has failed (the training loop calls it every step), and
:meth:`CheckpointManager.restore_params` reads the trainable parameters only (never the
optimizer state) and refuses non-finite values. Model folders (diffusers safetensors or orbax
``params/``) are read by goal_jax.weights, not here.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, META = "state", "data", "meta"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (unwritable folder, full disk...); names the step."""


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns."""

    step: int
    state: Any
    data_state: Any
    metadata: dict


# ----------------------------------------------------------------------------------------------
# PRNG keys and data-iterator states in storable form.
# ----------------------------------------------------------------------------------------------


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG key leaves -> their uint32 key data (storable by orbax)."""
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
    """Like :func:`_keys_to_data` for a target made of arrays or ShapeDtypeStructs."""

    def convert(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

    return jax.tree_util.tree_map(convert, tree)


def _data_to_keys(restored, target):
    """Wraps the key data back into typed keys wherever ``target`` holds a key."""

    def convert(value, like):
        if _is_key(like):
            return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)
                                            if isinstance(like, jax.Array) else None)
        return value

    return jax.tree_util.tree_map(convert, restored, target)


def _encode_data_state(data_state):
    if data_state is None:
        return {"format": "none"}
    if isinstance(data_state, (bytes, bytearray)):
        return {"format": "bytes_b64", "value": base64.b64encode(bytes(data_state)).decode()}
    return {"format": "json", "value": data_state}


def _decode_data_state(stored):
    fmt = stored.get("format")
    if fmt == "none":
        return None
    if fmt == "bytes_b64":
        return base64.b64decode(stored["value"])
    if fmt == "json":
        return stored["value"]
    raise ValueError(f"checkpoint data-iterator state has unknown format {fmt!r}")


def _path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _flat_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {_path_str(p): tuple(x.shape) for p, x in leaves if x is not None
            and hasattr(x, "shape")}


def check_tree(stored, expected, source: str, what: str) -> None:
    """Raises CheckpointError unless ``stored`` (orbax metadata tree) has exactly the array
    paths and shapes of ``expected`` (arrays / ShapeDtypeStructs); lists every difference."""
    from goal_jax.weights import CheckpointError

    have, want = _flat_shapes(stored), _flat_shapes(expected)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(f"{k}: stored {have[k]}, expected {want[k]}"
                        for k in set(have) & set(want) if have[k] != want[k])
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def _empty_entries(stored, target) -> list[str]:
    """The top-level entries of a stored state that hold nothing (None) and that ``target``, a
    dataclass such as goal_jax.train.TrainState, has no field for: the fields of an older
    layout, e.g. ``frozen`` (always saved as None) before the frozen params left TrainState."""
    if not isinstance(stored, dict) or not dataclasses.is_dataclass(target):
        return []
    fields = {f.name for f in dataclasses.fields(target)}
    return sorted(k for k, v in stored.items() if v is None and k not in fields)


def _abstract(x):
    """Array -> ShapeDtypeStruct with its sharding (restore target)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


# ----------------------------------------------------------------------------------------------
# The manager.
# ----------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores (train state, data-iterator state, metadata) by step.

    Args:
      directory: the checkpoint directory (created if missing; must be absolute or is made so).
      max_to_keep: number of most recent checkpoints kept (older ones are deleted).
      async_save: write arrays in a background thread (``wait()`` to block).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 check_writable: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        if check_writable:
            _check_writable(self.directory)
        self._last_save = None
        self._unchecked = False  # a save started whose outcome check_for_errors has not seen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           DATA: ocp.JsonCheckpointHandler(),
                           META: ocp.JsonCheckpointHandler()},
        )

    # -- queries ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest finished checkpoint step, or None when the directory has none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption signal was received (orbax sync point)."""
        return self._manager.reached_preemption(step)

    # -- save ------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: Any = None,
             metadata: dict | None = None, force: bool = True) -> bool:
        """Starts saving ``state`` (a pytree of arrays) at ``step``.

        ``data_state``: the input iterator's state (JSON value or bytes). ``metadata``: a JSON
        dict. Returns whether a save was started (False when ``step`` is already saved).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        meta = dict(metadata or {})
        meta.setdefault("step", step)
        try:
            started = self._save(step, state, data_state, meta, force)
        except Exception as e:  # includes a failure of the previous save, raised here
            raise self._save_error(e) from e
        self._last_save, self._unchecked = step, True
        return started

    def _save(self, step, state, data_state, meta, force) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(_keys_to_data(state)),
                    DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
                    META: ocp.args.JsonSave(meta),
                }
            ),
            force=force,
        )

    # -- restore ---------------------------------------------------------------------------

    def restore(self, target: Any, step: int | None = None) -> Restored:
        """Restores ``step`` (default: the latest) onto the structure of ``target``.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (with shardings): the
        restored arrays take its shapes, dtypes and shardings. Raises FileNotFoundError naming
        the directory when there is no checkpoint, ValueError when the stored tree does not
        match ``target``. Checkpoints of an older layout with an empty entry the target lacks
        (TrainState's ``frozen=None`` before the frozen params left it) restore too.
        """
        step = self._resolve_step(step)
        abstract = jax.tree_util.tree_map(_abstract, target)
        stored = self._manager.item_metadata(step)[STATE]
        stored = getattr(stored, "tree", stored)
        check_tree(stored, _abstract_keys_to_data(abstract),
                   f"checkpoint {self.directory}/{step}", "the train state")
        empty = _empty_entries(stored, abstract)
        item = _abstract_keys_to_data(abstract)
        if empty:  # an older layout: restore onto its structure, then drop those entries
            item = {**{f.name: getattr(item, f.name) for f in dataclasses.fields(item)},
                    **{name: None for name in empty}}
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(item),
                        DATA: ocp.args.JsonRestore(),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match the train state: {e}"
            ) from e
        state = restored[STATE]
        if empty:
            state = abstract.replace(**{k: v for k, v in state.items() if k not in empty})
        state = _data_to_keys(state, abstract)
        return Restored(step, state, _decode_data_state(restored[DATA]),
                        dict(restored[META] or {}))

    def restore_params(self, step: int | None = None, key: str = "params") -> Any:
        """The ``key`` subtree of the stored state (default the trainable parameters) as host
        float32 numpy arrays, read alone (orbax partial restore: the optimizer state is never
        read). Raises CheckpointError naming the step when it is absent or holds a non-finite
        value (a damaged or diverged checkpoint)."""
        from goal_jax.weights import CheckpointError

        step = self._resolve_step(step)
        source = f"checkpoint {self.directory}/{step}"
        try:
            meta = self._manager.item_metadata(step)[STATE]
        except Exception as e:  # tensorstore / orbax raise many types for damaged files
            raise CheckpointError(f"cannot read the array metadata of {source}: {e}") from e
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict) or key not in tree or not tree[key]:
            raise CheckpointError(
                f"{source} holds no {key!r} tree; it holds "
                f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
        subtree = {key: tree[key]}
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), subtree)
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                os.path.join(self.directory, str(step), STATE),
                args=ocp.args.PyTreeRestore(item=subtree, restore_args=restore_args,
                                            partial_restore=True))[key]
        except Exception as e:  # tensorstore / orbax raise many types for damaged files
            raise CheckpointError(f"cannot read {key!r} of {source}: {e}") from e
        check_finite(restored, source)
        return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), restored)

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default latest) without reading any array."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))
        return dict(restored[META] or {})

    def restore_data_state(self, step: int | None = None) -> Any:
        """The data-iterator state of ``step`` (default latest) without reading any array."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{DATA: ocp.args.JsonRestore()}))
        return _decode_data_state(restored[DATA])

    def restore_arrays(self, step: int | None = None) -> Any:
        """The stored state tree as host numpy arrays, without a target (for tools such as
        scripts/convert.py and scripts/sample.py). PRNG keys come back as raw key data."""
        step = self._resolve_step(step)
        path = os.path.join(self.directory, str(step), STATE)
        checkpointer = ocp.PyTreeCheckpointer()
        meta = self._manager.item_metadata(step)[STATE]
        tree = getattr(meta, "tree", meta)
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
        )
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

    def resolve_step(self, step: int | None = None) -> int:
        """``step`` if saved (default: the latest); FileNotFoundError naming the directory."""
        return self._resolve_step(step)

    def _resolve_step(self, step):
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps present: "
                f"{sorted(steps)}"
            )
        return int(step)

    # -- lifecycle -------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until every started save is written; CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e) from e

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError when a background save has failed; returns at once (it
        never waits for a save still being written)."""
        try:
            self._manager.check_for_errors()
            if self._unchecked and not self._manager.is_saving_in_progress():
                self._unchecked = False
                self._manager.wait_until_finished()  # finished: returns, or raises its error
        except Exception as e:
            raise self._save_error(e) from e

    def delete(self, step: int) -> None:
        """Removes the checkpoint of ``step`` (after the pending saves finish)."""
        self.wait()
        self._manager.delete(int(step))

    def close(self) -> None:
        """Waits for the pending saves and releases orbax's threads. A failed save raises
        CheckpointSaveError after the manager is closed (nothing is left waiting)."""
        error = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            error = self._save_error(e)
        try:
            self._manager.close()
        except Exception as e:  # a failed save can resurface here
            error = error or self._save_error(e)
        if error is not None:
            raise error

    def _save_error(self, error: Exception) -> CheckpointSaveError:
        step = "" if self._last_save is None else f" step {self._last_save}"
        return CheckpointSaveError(
            f"saving checkpoint{step} in {self.directory} failed: "
            f"{type(error).__name__}: {error}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_writable(directory: str) -> None:
    """Creates ``directory`` and a probe file in it; CheckpointSaveError when that fails."""
    probe = os.path.join(directory, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointSaveError(f"checkpoint folder {directory} is not writable: {e}") from e


def check_finite(tree, source: str) -> None:
    """Raises weights.CheckpointError naming ``source`` and the first arrays holding NaN or
    infinite values (e.g. flipped bytes or a diverged run)."""
    from goal_jax.weights import CheckpointError

    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            bad.append(f"{_path_str(path)} ({int(np.size(x) - np.isfinite(x).sum())} of "
                       f"{np.size(x)} values)")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{source} holds non-finite parameters: {shown}")
