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

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
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
        match ``target``.
        """
        step = self._resolve_step(step)
        abstract = jax.tree_util.tree_map(_abstract, target)
        stored = self._manager.item_metadata(step)[STATE]
        stored = getattr(stored, "tree", stored)
        check_tree(stored, _abstract_keys_to_data(abstract),
                   f"checkpoint {self.directory}/{step}", "the train state")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(_abstract_keys_to_data(abstract)),
                        DATA: ocp.args.JsonRestore(),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match the train state: {e}"
            ) from e
        state = _data_to_keys(restored[STATE], abstract)
        return Restored(step, state, _decode_data_state(restored[DATA]),
                        dict(restored[META] or {}))

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
        """Blocks until every started save is written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Model folders with orbax params (fast start-up; written by scripts/convert.py).
# ----------------------------------------------------------------------------------------------
#
# A converted model folder mirrors the Hugging Face / diffusers one, with the safetensors
# replaced by an orbax checkpoint of the Flax params:
#
#     <component>/config.json        unchanged
#     <component>/params/            orbax StandardCheckpointer tree (Flax names, float32)
#
# A converted pipeline folder holds unet/ vae/ text_encoder/ in that form, plus tokenizer/,
# scheduler/ and model_index.json copied unchanged. load_component / load_pipeline read either
# form, so every path option (model.pretrained, model.clip) accepts both.

PARAMS_DIR = "params"

COMPONENT_KINDS = ("unet", "vae", "text_encoder", "clip")


def save_params(folder: str, params) -> None:
    """Writes a params tree as an orbax checkpoint at ``folder`` (must not exist)."""
    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists; remove it or choose another output")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(folder), params)
    checkpointer.wait_until_finished()


def load_params(folder: str, shapes, source: str | None = None):
    """Reads an orbax params checkpoint strictly against ``shapes`` (a tree of arrays or
    ShapeDtypeStructs): missing, unexpected and mis-shaped arrays raise CheckpointError."""
    from goal_jax.weights import CheckpointError

    folder = os.path.abspath(folder)
    source = source or folder
    if not os.path.isdir(folder):
        raise CheckpointError(f"orbax params folder not found: {folder}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(folder)
    except Exception as e:  # orbax raises several types for unreadable folders
        raise CheckpointError(f"cannot read orbax params in {folder}: {e}") from e
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    check_tree(tree, shapes, source, "the model")
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.float32), shapes)
    return checkpointer.restore(folder, target)


def _component_module(kind: str, path: str, dtype, **module_options):
    from goal_jax.weights import CheckpointError, read_config

    config = read_config(path)
    if kind == "unet":
        from goal_jax.models import unet as lib

        cfg = lib.UNet2DConditionConfig.from_dict(config, source=path)
        return lib.UNet2DConditionModel(config=cfg, dtype=dtype, **module_options)
    if kind == "vae":
        from goal_jax.models import vae as lib

        cfg = lib.AutoencoderKLConfig.from_dict(config, source=path)
        return lib.AutoencoderKL(config=cfg, dtype=dtype, **module_options)
    if kind == "text_encoder":
        from goal_jax.models import clip as lib

        return lib.CLIPTextModel(config=lib.CLIPTextConfig.from_dict(config, source=path),
                                 dtype=dtype, **module_options)
    if kind == "clip":
        from goal_jax.models import clip as lib

        return lib.CLIPModel(config=lib.CLIPConfig.from_dict(config, source=path), dtype=dtype,
                             **module_options)
    raise CheckpointError(f"unknown model kind {kind!r}; expected one of {COMPONENT_KINDS}")


def is_orbax_folder(path: str) -> bool:
    """True when ``path`` holds config.json + an orbax ``params/`` checkpoint."""
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


def load_component(path: str, kind: str, dtype=None, **module_options):
    """(module, params) of a model folder in either form (safetensors or orbax ``params/``).

    kind: "unet" | "vae" | "text_encoder" | "clip". ``module_options`` go to the module
    (U-Net: remat, attention_maps, and require_grounding as in weights.load_unet; VAE: remat).
    """
    import jax.numpy as jnp

    from goal_jax import weights

    dtype = jnp.float32 if dtype is None else dtype
    if not is_orbax_folder(path):
        return weights.load_component(path, kind, dtype, **module_options)
    require_grounding = module_options.pop("require_grounding", False)
    module = _component_module(kind, path, dtype, **module_options)
    if require_grounding:
        weights.check_grounding(module.config, path)
    shapes = weights.param_shapes(module, *module.dummy_inputs())
    return module, load_params(os.path.join(path, PARAMS_DIR), shapes, source=path)


def load_pipeline(path: str, dtype=None, **unet_options):
    """``weights.load_pipeline`` for a pipeline folder whose components may be in either form."""
    import jax.numpy as jnp

    from goal_jax import weights

    return weights.load_pipeline(path, jnp.float32 if dtype is None else dtype,
                                 component_loader=load_component, **unet_options)
