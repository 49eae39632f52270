"""The one loading API: model folders and training checkpoints -> Flax parameter trees.

* :func:`load_pipeline` (a GLIGEN pipeline folder), :func:`load_component` (one model folder
  of a given kind) and the per-model loaders (:func:`load_unet`, :func:`load_vae`,
  :func:`load_clip_text`, :func:`load_clip`) read both folder forms goal_jax writes;
* :func:`load_trained_unet` merges a GOAL training checkpoint's trained U-Net parameters over
  the base pipeline's U-Net (params only, never the optimizer state);
* :func:`save_unet`, :func:`save_params`: export to diffusers safetensors / orbax ``params/``.

Folder forms. A Hugging Face / diffusers folder holds ``config.json`` and the weights as
``model.safetensors`` (transformers), ``diffusion_pytorch_model.safetensors`` (diffusers), a
sharded ``*.safetensors.index.json``, an ``.fp16`` variant of any of these, or a legacy
``pytorch_model.bin`` / ``diffusion_pytorch_model.bin`` (read only when torch is importable).
An orbax folder (``scripts/convert.py to-orbax``: faster start-up) holds the same
``config.json`` and ``params/``, an orbax checkpoint of the Flax tree. A pipeline folder holds
``unet/ vae/ text_encoder/`` in either form plus ``tokenizer/ scheduler/``.

Conversion is a mechanical rename because our Flax modules mirror the PyTorch names:

* a path component ``name_<i>`` (Flax list / indexed submodule) is ``name.<i>`` in PyTorch,
  except the literal diffusers names in ``_LITERAL_COMPONENTS`` (``linear_1``, ``linear_2``);
* leaf ``kernel`` is ``weight``: Dense kernels are the transposed ``[out, in]`` matrix,
  Conv kernels ``[kh, kw, in, out]`` are PyTorch ``[out, in, kh, kw]``;
* leaf ``scale`` (LayerNorm / GroupNorm) and ``embedding`` (Embed) are ``weight``;
* any other leaf (``bias``, ``class_embedding``, ``alpha_attn`` ...) keeps its name and shape.

Loading is strict: every Flax parameter must be filled and every checkpoint tensor used or
explicitly ignored; otherwise one :class:`CheckpointError` lists missing keys, unexpected keys
and shape mismatches by name. Parameters are always float32 (compute dtype is a module option).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Mapping[str, Any]

_LITERAL_COMPONENTS = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.*)_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be read or does not match the model."""


# ----------------------------------------------------------------------------------------------
# Names and layouts.
# ----------------------------------------------------------------------------------------------


def torch_name(flax_path: Sequence[str]) -> str:
    """PyTorch state-dict key of the Flax parameter at ``flax_path`` (tuple of names)."""
    *modules, leaf = flax_path
    parts = []
    for component in modules:
        match = _INDEXED.match(component)
        if match and component not in _LITERAL_COMPONENTS:
            parts.extend(match.groups())
        else:
            parts.append(component)
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    param_shapes: Params,
    *,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict:
    """Fills a Flax tree shaped like ``param_shapes`` from a PyTorch-named ``state_dict``.

    Args:
      state_dict: key -> numpy array, PyTorch layouts.
      param_shapes: the Flax params tree (arrays or ``jax.ShapeDtypeStruct``), e.g. from
        ``jax.eval_shape(module.init, ...)["params"]``.
      ignore: regular expressions of checkpoint keys that are allowed to stay unused
        (buffers such as ``position_ids``).
      source: the path named in error messages.

    Returns:
      The nested params dict with float32 numpy arrays.

    Raises:
      CheckpointError: listing every missing key, unexpected key and shape mismatch.
    """
    ignore_res = [re.compile(p) for p in ignore]
    flat_shapes = traverse_util.flatten_dict(_unfreeze(param_shapes))
    used, missing, mismatched = set(), [], []
    flat = {}
    for path, spec in flat_shapes.items():
        key = torch_name(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax_layout(path[-1], np.asarray(state_dict[key]))
        if tuple(value.shape) != tuple(spec.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(np.asarray(state_dict[key]).shape)} "
                f"-> {tuple(value.shape)}, model expects {tuple(spec.shape)}"
            )
            continue
        flat[path] = value.astype(np.float32)
    unexpected = [
        k for k in state_dict if k not in used and not any(r.search(k) for r in ignore_res)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)))
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def to_state_dict(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params tree -> PyTorch-named, PyTorch-layout float32 numpy state dict."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {
        prefix + torch_name(path): np.array(  # not ascontiguousarray: it makes 0-d arrays 1-d
            _to_torch_layout(path[-1], np.asarray(value, dtype=np.float32)), order="C"
        )
        for path, value in flat.items()
    }


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


def read_config(folder: str, name: str = "config.json") -> dict:
    """Reads ``folder/name`` as JSON; errors name the path."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {name} in checkpoint folder {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e


def read_state_dict(folder: str, stems: Sequence[str], variant: str | None = None) -> dict:
    """Reads all weights of a model folder into key -> numpy array.

    Looks, in order, for ``{stem}[.variant].safetensors``, a sharded
    ``{stem}.safetensors.index[.variant].json``, then ``{stem}.bin`` (needs torch), for each of
    ``stems`` (e.g. ``("model", "pytorch_model")`` or ``("diffusion_pytorch_model",)``).
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        for stem in stems:
            suffix = f".{var}" if var else ""
            single = os.path.join(folder, f"{stem}{suffix}.safetensors")
            if os.path.isfile(single):
                return _read_safetensors(single)
            for index_name in (
                f"{stem}.safetensors.index{suffix}.json",
                f"{stem}{suffix}.safetensors.index.json",
            ):
                index = os.path.join(folder, index_name)
                if os.path.isfile(index):
                    return _read_sharded(folder, index)
    for stem in stems:
        for name in (f"{stem}.bin", "pytorch_model.bin"):
            legacy = os.path.join(folder, name)
            if os.path.isfile(legacy):
                return _read_torch_bin(legacy)
    present = sorted(os.listdir(folder))
    raise CheckpointError(
        f"no weights in {folder}: expected one of "
        + ", ".join(f"{s}.safetensors / {s}.safetensors.index.json" for s in stems)
        + f"; the folder holds {present}"
    )


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    except TypeError as e:  # bfloat16 tensors have no numpy dtype
        return _read_safetensors_flax(path, e)


def _read_safetensors_flax(path: str, first_error: Exception) -> dict:
    try:
        from safetensors.flax import load_file as load_flax

        return {k: np.asarray(v, dtype=np.float32) for k, v in load_flax(path).items()}
    except Exception as e:  # pragma: no cover - both readers failed
        raise CheckpointError(f"cannot read safetensors file {path}: {first_error}; {e}") from e


def _read_sharded(folder: str, index_path: str) -> dict:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse shard index {index_path}: {e!r}") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"shard {shard_path} listed in {index_path} is missing")
        state.update(_read_safetensors(shard_path))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise CheckpointError(f"{index_path} lists keys that no shard holds: {absent}")
    return state


def _read_torch_bin(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch pickle and torch is not installed. Convert it once on a machine "
            "with torch: `model = <Class>.from_pretrained(folder); "
            "model.save_pretrained(folder, safe_serialization=True)`, or pip install torch."
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    return {k: v.detach().float().numpy() for k, v in state.items()}


def write_safetensors(folder: str, state_dict: Mapping[str, np.ndarray], config: dict,
                      stem: str) -> None:
    """Writes ``config.json`` and ``{stem}.safetensors`` into ``folder`` (created if needed)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(dict(state_dict), os.path.join(folder, f"{stem}.safetensors"),
              metadata={"format": "pt"})


def param_shapes(module, *inputs, method: str | Callable | None = None) -> dict:
    """Parameter shapes of ``module`` from ``jax.eval_shape`` (no compute, no memory)."""
    kwargs = {} if method is None else {"method": method}
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), *inputs, **kwargs)
    )
    return variables["params"]


def count_params(params: Params) -> int:
    """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def to_device(params: Params) -> Any:
    """numpy params tree -> jax arrays (float32)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


# ----------------------------------------------------------------------------------------------
# Model loaders (the public API of DESIGN.md).
# ----------------------------------------------------------------------------------------------

_TRANSFORMERS_STEMS = ("model", "pytorch_model")
_DIFFUSERS_STEMS = ("diffusion_pytorch_model",)


def _load(path, module, stems, *, ignore=(), rename=None, variant=None):
    """Builds params for ``module`` from the weights in ``path``, either form (strict)."""
    shapes = param_shapes(module, *module.dummy_inputs())
    if is_orbax_folder(path):
        return to_device(load_params(os.path.join(path, PARAMS_DIR), shapes, source=path))
    state = read_state_dict(path, stems, variant=variant)
    if rename is not None:
        state = rename(state)
    params = convert_state_dict(state, shapes, ignore=ignore, source=path)
    return to_device(params)


def load_clip(path: str, dtype=jnp.float32, variant: str | None = None, remat: bool = False):
    """Hugging Face ``CLIPModel`` folder (or its orbax form) -> (goal_jax CLIPModel, params)."""
    from goal_jax.models import clip as clip_lib

    config = clip_lib.CLIPConfig.from_dict(read_config(path), source=path)
    model = clip_lib.CLIPModel(config=config, dtype=dtype, remat=remat)
    return model, _load(path, model, _TRANSFORMERS_STEMS, ignore=clip_lib.IGNORED_KEYS,
                        variant=variant)


def load_clip_text(path: str, dtype=jnp.float32, variant: str | None = None, remat: bool = False):
    """Hugging Face ``CLIPTextModel`` folder (SD's ``text_encoder/``) -> (module, params)."""
    from goal_jax.models import clip as clip_lib

    config = clip_lib.CLIPTextConfig.from_dict(read_config(path), source=path)
    model = clip_lib.CLIPTextModel(config=config, dtype=dtype, remat=remat)
    return model, _load(path, model, _TRANSFORMERS_STEMS, ignore=clip_lib.IGNORED_KEYS,
                        rename=clip_lib.rename_text_keys, variant=variant)


def load_vae(path: str, dtype=jnp.float32, variant: str | None = None, remat: bool = False):
    """diffusers ``AutoencoderKL`` folder -> (goal_jax AutoencoderKL, params)."""
    from goal_jax.models import vae as vae_lib

    config = vae_lib.AutoencoderKLConfig.from_dict(read_config(path), source=path)
    model = vae_lib.AutoencoderKL(config=config, dtype=dtype, remat=remat)
    return model, _load(path, model, _DIFFUSERS_STEMS, rename=vae_lib.rename_legacy_keys,
                        variant=variant)


def load_unet(path: str, dtype=jnp.float32, variant: str | None = None,
              require_grounding: bool = False, **module_options):
    """diffusers ``UNet2DConditionModel`` folder -> (goal_jax UNet2DConditionModel, params).

    ``module_options`` go to the module (e.g. ``remat=True``, ``attention_maps=("up_blocks_1",)``).
    ``require_grounding=True`` fails unless the checkpoint is a GLIGEN U-Net with a position net.
    """
    from goal_jax.models import unet as unet_lib

    config = unet_lib.UNet2DConditionConfig.from_dict(read_config(path), source=path)
    if require_grounding:
        check_grounding(config, path)
    model = unet_lib.UNet2DConditionModel(config=config, dtype=dtype, **module_options)
    return model, _load(path, model, _DIFFUSERS_STEMS, variant=variant)


def check_grounding(unet_config, path: str) -> None:
    """Raises unless ``unet_config`` (a UNet2DConditionConfig) is a GLIGEN U-Net."""
    if not unet_config.is_gligen:
        raise CheckpointError(
            f"{path} is not a GLIGEN U-Net: the checkpoint has no position net "
            f"(attention_type={unet_config.attention_type!r}), so it cannot take grounding inputs"
        )


COMPONENT_KINDS = ("unet", "vae", "text_encoder", "clip")


def load_component(path: str, kind: str, dtype=jnp.float32, **module_options):
    """(module, params) of one model folder in either form; kind: unet | vae | text_encoder |
    clip. ``module_options`` go to the loader (U-Net: remat, attention_maps,
    require_grounding; others: remat; all: variant)."""
    loaders = {"unet": load_unet, "vae": load_vae, "text_encoder": load_clip_text,
               "clip": load_clip}
    if kind not in loaders:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {COMPONENT_KINDS}")
    return loaders[kind](path, dtype=dtype, **module_options)


def save_unet(folder: str, unet, params: Params) -> None:
    """Exports a U-Net to a diffusers folder (config.json + diffusion_pytorch_model.safetensors)
    that ``diffusers.UNet2DConditionModel.from_pretrained`` loads."""
    write_safetensors(folder, to_state_dict(params), unet.config.to_dict(),
                      _DIFFUSERS_STEMS[0])


@dataclasses.dataclass
class GLIGENComponents:
    """The components of a diffusers GLIGEN (text-box) pipeline folder (what
    :func:`load_pipeline` returns; ``goal_jax.sampling.GLIGENPipeline`` samples with them)."""

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    scheduler_config: dict
    path: str


def load_pipeline(path: str, dtype=jnp.float32, variant: str | None = None,
                  component_loader: Callable | None = None, **unet_options) -> GLIGENComponents:
    """diffusers ``StableDiffusionGLIGENPipeline`` folder (``unet/ vae/ text_encoder/ tokenizer/
    scheduler/``) -> :class:`GLIGENComponents`.

    Each model folder may be in either form (safetensors or orbax ``params/``).
    ``component_loader(path, kind, dtype, **options) -> (module, params)`` replaces
    :func:`load_component`. ``unet_options`` go to the U-Net loader.
    """
    from goal_jax import text as text_lib

    check_pipeline_folder(path)
    if component_loader is None:
        component_loader = functools.partial(load_component, variant=variant)
    unet, unet_params = component_loader(os.path.join(path, "unet"), "unet", dtype,
                                         **unet_options)  # each loader reads either form
    vae, vae_params = component_loader(os.path.join(path, "vae"), "vae", dtype)
    text_encoder, text_params = component_loader(os.path.join(path, "text_encoder"),
                                                 "text_encoder", dtype)
    tokenizer = text_lib.load_tokenizer(os.path.join(path, "tokenizer"))
    scheduler_config = read_config(os.path.join(path, "scheduler"), "scheduler_config.json")
    return GLIGENComponents(unet, unet_params, vae, vae_params, text_encoder, text_params,
                          tokenizer, scheduler_config, path)


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: str) -> None:
    """Raises CheckpointError unless ``path`` is a folder with every pipeline subfolder."""
    if not os.path.isdir(path):
        raise CheckpointError(f"pipeline folder not found: {path}")
    missing = [sub for sub in PIPELINE_PARTS if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise CheckpointError(f"pipeline folder {path} has no {'/, '.join(missing)}/ "
                              f"subfolder{'s' if len(missing) > 1 else ''} (a diffusers GLIGEN "
                              f"pipeline has {', '.join(p + '/' for p in PIPELINE_PARTS)})")


# ----------------------------------------------------------------------------------------------
# Orbax model folders (scripts/convert.py to-orbax): <model>/config.json + <model>/params/.
# ----------------------------------------------------------------------------------------------

PARAMS_DIR = "params"


def is_orbax_folder(path: str) -> bool:
    """True when ``path`` holds an orbax ``params/`` checkpoint (next to its config.json)."""
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_params(folder: str, params) -> None:
    """Writes a params tree as an orbax checkpoint at ``folder`` (must not exist)."""
    import orbax.checkpoint as ocp

    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists; remove it or choose another output")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(folder), params)
    checkpointer.wait_until_finished()


def load_params(folder: str, shapes, source: str | None = None):
    """Reads an orbax params checkpoint strictly against ``shapes`` (a tree of arrays or
    ShapeDtypeStructs): missing, unexpected and mis-shaped arrays raise CheckpointError, and
    so do non-finite values."""
    import orbax.checkpoint as ocp

    from goal_jax import checkpoints

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
    checkpoints.check_tree(tree, shapes, source, "the model")
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes)
    try:
        params = checkpointer.restore(folder, target)
    except Exception as e:  # damaged files
        raise CheckpointError(f"cannot read orbax params in {folder}: {e}") from e
    checkpoints.check_finite(params, source)
    return params


# ----------------------------------------------------------------------------------------------
# Training checkpoints (goal_jax.checkpoints): the trained U-Net over its base.
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_checkpoint(checkpoint: str):
    """A goal_jax.checkpoints.CheckpointManager over an existing training checkpoint folder,
    closed on exit; a missing folder, or a missing step asked of it (FileNotFoundError), is a
    CheckpointError."""
    from goal_jax import checkpoints

    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint folder not found: {checkpoint}")
    manager = checkpoints.CheckpointManager(checkpoint, async_save=False)
    try:
        yield manager
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    finally:
        manager.close()


def load_trained_unet(checkpoint: str, base_params, step: int | None = None):
    """U-Net parameters of a GOAL training checkpoint, merged over the base U-Net's.

    Args:
      checkpoint: a training checkpoint directory (``<workdir>/checkpoints``).
      base_params: the base pipeline's U-Net params (``load_pipeline(...).unet_params``).
      step: the checkpoint step (default: the latest).

    Reads ``<checkpoint>/<step>/state``'s ``params`` (the trainable U-Net leaves of
    ``goal_jax.train.TrainState``) alone: the optimizer state is never read. Every leaf must
    name a base U-Net parameter of the same shape and be finite.

    Returns:
      (params, info): the merged tree (float32 jax arrays) and {"step", "replaced" (trained
      leaf count), "total" (U-Net leaf count), "metadata" (the checkpoint's JSON metadata)}.

    Raises:
      CheckpointError: no such folder or step, names or shapes that differ, non-finite values.
    """
    with _open_checkpoint(checkpoint) as manager:
        step = manager.resolve_step(step)
        trained = manager.restore_params(step)
        metadata = manager.restore_metadata(step)
    base = traverse_util.flatten_dict(_unfreeze(base_params))
    flat = traverse_util.flatten_dict(_unfreeze(trained))
    unknown = sorted("/".join(k) for k in flat if k not in base)
    shapes = sorted(f"{'/'.join(k)}: checkpoint {tuple(np.shape(v))}, U-Net "
                    f"{tuple(base[k].shape)}" for k, v in flat.items()
                    if k in base and tuple(np.shape(v)) != tuple(base[k].shape))
    if unknown or shapes:
        raise CheckpointError(
            f"checkpoint {checkpoint}/{step} does not match the base U-Net: {len(unknown)} "
            f"unknown parameters {unknown[:5]}, {len(shapes)} shape mismatches {shapes[:5]}")
    merged = dict(base)
    merged.update({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
    info = {"step": int(step), "replaced": len(flat), "total": len(base), "metadata": metadata}
    return traverse_util.unflatten_dict(merged), info


def base_pipeline_of(checkpoint: str, step: int | None = None) -> str:
    """The base pipeline folder a training checkpoint was trained from: its metadata's
    ``pipeline_relative`` path taken from the checkpoint folder (right for a moved or copied
    workdir, e.g. the demo models inside it), else its absolute ``pipeline`` path. Raises
    CheckpointError when neither exists."""
    with _open_checkpoint(checkpoint) as manager:
        meta = manager.restore_metadata(step)
    candidates = []
    if meta.get("pipeline_relative"):
        candidates.append(os.path.normpath(os.path.join(os.path.abspath(checkpoint),
                                                        meta["pipeline_relative"])))
    if meta.get("pipeline"):
        candidates.append(meta["pipeline"])
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise CheckpointError(f"checkpoint {checkpoint} names its base pipeline as "
                          f"{candidates or 'nothing'}, which does not exist here; give the base "
                          "pipeline folder explicitly")
