"""GOAL fine-tuning: train state, optimizer with trainable-parameter selection, the jit step.

One training step (a single ``jax.jit`` function, :func:`train_step`):

1. z0: VAE encode of ``batch["images"]`` (posterior sample) times ``scaling_factor``, or
   ``batch["latents"]`` when the batch carries cached, already scaled latents [B, h, w, 4].
2. Text: SD's text encoder gives the caption context (``last_hidden_state`` [B, 77, D]) and the
   pooled phrase features for GLIGEN ([B, N, D]); the DSAlign CLIP gives projected caption
   ([B, P]) and phrase ([B, N, P]) embeddings.
3. t ~ U{0..T-1}, eps ~ N(0, I); z_t (eq. 1); U-Net with ``mutable=["intermediates"]``.
4. L = L_LDM + α L_DSA + β L_MAA (eq. 15, :mod:`goal_jax.objectives`); gradients of the
   trainable parameters only; optax update.

Caption dropout replaces the caption by the empty caption (``GoalModels.null_input_ids``) and
clears that item's phrase-token masks (its phrases are no longer in the caption) and its D_global
weight. Grounding dropout gives the U-Net the null grounding of GLIGEN (all box masks 0, so the
position net outputs its learnt null features); the alignment terms of that item are then
excluded (they use the layout the model was given).

Parameters stay float32; the compute dtype and remat are module options (:func:`load_models`).
The train state (:class:`TrainState`) holds what trains: step, trainable U-Net params, their
optimizer state and the PRNG key. The frozen parameters (the rest of the U-Net, VAE, text
encoder, CLIP; ``frozen = {"unet", "vae", "text_encoder", "clip"}``) live outside it: they have
no optimizer state, are never saved in training checkpoints, and are an explicit argument of the
jitted step (sharded like the params, never donated, never changed)::

    state, frozen = create_train_state(params, config, optimizer)
    step = make_train_step(models, config, optimizer, lr_schedule)
    state, metrics = step(state, frozen, batch)

Config: the ``train`` section of configs/goal.py (every field and its default documented
there); :func:`default_train_config` returns the paper's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from goal_jax import objectives
from goal_jax import schedule as schedule_lib
from goal_jax import sharding as sharding_lib

PAPER_TRAINABLE = (r"(^|/)fuser/", r"(^|/)attn1/", r"(^|/)attn2/")
POSITION_NET = r"^position_net/"
BATCH_KEYS = ("images", "input_ids", "phrase_input_ids", "boxes", "masks", "phrase_token_masks")


def default_train_config() -> ml_collections.ConfigDict:
    """The ``train`` section of configs/goal.py's paper preset, where every default lives (for
    code that builds a train step without a whole run config: tests, benchmarks)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "goal.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default_train_config reads {path}, which is missing (goal_jax "
                                "runs from its checkout: pip install -e .)")
    spec = importlib.util.spec_from_file_location("_goal_config_defaults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("paper").train


# ==============================================================================================
# Models.
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class GoalModels:
    """The Flax modules of one GOAL run (no parameters).

    unet: GLIGEN UNet2DConditionModel built with ``attention_maps`` = the MAAlign layers.
    vae: AutoencoderKL. text_encoder: SD's CLIPTextModel. clip: the DSAlign CLIPModel.
    schedule: the DDPM training schedule. null_input_ids: int32 [77] ids of the empty caption
    (needed for caption dropout).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    clip: Any
    schedule: schedule_lib.DDPMSchedule
    null_input_ids: Any = None

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def clip_image_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)


def compute_dtype(config) -> Any:
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if config.dtype not in names:
        raise ValueError(f"config.dtype must be one of {sorted(names)}, got {config.dtype!r}")
    return names[config.dtype]


def maa_layers(config, unet_config) -> tuple[str, ...]:
    """The MAAlign layer prefixes: ``config.maa_layers`` or, when empty, the cross-attention
    modules of ``config.maa_part`` at ``config.maa_resolution``."""
    if config.maa_layers:
        return tuple(config.maa_layers)
    from goal_jax.models import unet as unet_lib

    return unet_lib.cross_attention_layers(unet_config, config.maa_part, config.maa_resolution)


def load_models(config) -> tuple[GoalModels, dict]:
    """Loads ``config.model.pipeline`` and ``config.model.clip`` -> (GoalModels, params) with
    params = {"unet", "vae", "text_encoder", "clip"} (float32)."""
    import os

    from goal_jax import text as text_lib
    from goal_jax import weights
    from goal_jax.models import unet as unet_lib

    dtype = compute_dtype(config)
    unet_dir = os.path.join(config.model.pipeline, "unet")
    unet_config = unet_lib.UNet2DConditionConfig.from_dict(weights.read_config(unet_dir),
                                                           source=unet_dir)
    layers = maa_layers(config, unet_config) if config.beta else ()
    # Either form of model folder: diffusers safetensors, or orbax params from scripts/convert.py.
    pipe = weights.load_pipeline(config.model.pipeline, dtype=dtype, remat=config.remat,
                                 attention_maps=layers, require_grounding=True)
    clip, clip_params = weights.load_component(config.model.clip, "clip", dtype=dtype,
                                               remat=config.remat)
    null_ids = text_lib.tokenize(pipe.tokenizer, [""])[0]
    vae = pipe.vae.clone(remat=config.remat)  # DSAlign backpropagates through the decoder
    models = GoalModels(pipe.unet, vae, pipe.text_encoder, clip,
                        schedule_lib.DDPMSchedule.from_config(pipe.scheduler_config),
                        jnp.asarray(null_ids, jnp.int32))
    params = {"unet": pipe.unet_params, "vae": pipe.vae_params,
              "text_encoder": pipe.text_params, "clip": clip_params}
    return models, params


# ==============================================================================================
# Trainable / frozen split.
# ==============================================================================================


def trainable_patterns(config) -> tuple[str, ...]:
    patterns = tuple(config.trainable_patterns)
    if config.train_position_net:
        patterns += (POSITION_NET,)
    return patterns


def trainable_mask(unet_params: Mapping, patterns: Sequence[str]) -> dict:
    """{"/"-joined path: bool} for every U-Net parameter. Raises when nothing matches."""
    regs = [re.compile(p) for p in patterns]
    flat = traverse_util.flatten_dict(_plain(unet_params))
    mask = {"/".join(k): any(r.search("/".join(k)) for r in regs) for k in flat}
    if not any(mask.values()):
        raise ValueError(f"trainable_patterns {list(patterns)} match no U-Net parameter")
    return mask


def partition_params(unet_params: Mapping, patterns: Sequence[str]) -> tuple[dict, dict]:
    """Splits the U-Net params into (trainable, frozen) nested dicts with disjoint leaves."""
    mask = trainable_mask(unet_params, patterns)
    flat = traverse_util.flatten_dict(_plain(unet_params))
    train = {k: v for k, v in flat.items() if mask["/".join(k)]}
    frozen = {k: v for k, v in flat.items() if not mask["/".join(k)]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """Inverse of :func:`partition_params`."""
    flat = traverse_util.flatten_dict(_plain(frozen))
    flat.update(traverse_util.flatten_dict(_plain(trainable)))
    return traverse_util.unflatten_dict(flat)


def _plain(tree):
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)


# ==============================================================================================
# Optimizer and train state.
# ==============================================================================================


def learning_rate_schedule(opt_config) -> optax.Schedule:
    lr = float(opt_config.learning_rate)
    warmup = int(opt_config.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping and MultiSteps accumulation) and its lr schedule."""
    o = config.optimizer
    schedule = learning_rate_schedule(o)
    parts = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if int(o.grad_accum_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(o.grad_accum_steps))
    return tx, schedule


@flax.struct.dataclass
class TrainState:
    """What trains (and what a training checkpoint stores): step: int32 scalar (micro-steps
    done); params: the trainable U-Net parameters (nested dict); opt_state: optax state of
    ``params`` only; rng: PRNG key. The frozen parameters are not in it (see the module
    docstring)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(params: Mapping, config, optimizer: optax.GradientTransformation,
                       rng: jax.Array | None = None) -> tuple[TrainState, dict]:
    """params = {"unet", "vae", "text_encoder", "clip"} -> (TrainState, frozen): the U-Net split
    by :func:`trainable_patterns`; frozen = {"unet": the rest of the U-Net, "vae",
    "text_encoder", "clip"} in ``config.frozen_dtype``.

    No copy is made: the state's trainable arrays are the arrays of ``params["unet"]``, and the
    jitted step donates them, so after the first step those entries of ``params`` are deleted.
    Pass ``jax.tree_util.tree_map(jnp.copy, params)`` to keep using the originals."""
    missing = [k for k in ("unet", "vae", "text_encoder", "clip") if k not in params]
    if missing:
        raise ValueError(f"create_train_state: params lacks {missing}")
    trainable, frozen_unet = partition_params(params["unet"], trainable_patterns(config))
    frozen = {"unet": frozen_unet, "vae": params["vae"],
              "text_encoder": params["text_encoder"], "clip": params["clip"]}
    frozen = cast_frozen(frozen, config.get("frozen_dtype", "float32"))
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                       opt_state=optimizer.init(trainable), rng=rng)
    return state, frozen


def cast_frozen(frozen: Mapping, dtype_name: str) -> Any:
    """The floating leaves of ``frozen`` in ``dtype_name`` ("float32" or "bfloat16"; arrays or
    ShapeDtypeStructs); leaves already of that dtype are returned as they are (no copy)."""
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype_name not in names:
        raise ValueError(f"config.frozen_dtype must be one of {sorted(names)}, got "
                         f"{dtype_name!r}")
    dtype = names[dtype_name]

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map(cast, frozen)


# ==============================================================================================
# The loss.
# ==============================================================================================


def encoded_box_slots(config, num_slots: int) -> int:
    """K, the box slots whose phrases are encoded (``config.encoded_box_slots``; 0 = all N)."""
    k = int(config.get("encoded_box_slots", 0) or 0)
    if not 0 <= k <= num_slots:
        raise ValueError(f"config field encoded_box_slots={k} must be in [0, {num_slots}] (the "
                         f"batch has N={num_slots} box slots; 0 = all)")
    return k or num_slots


def check_box_slots(masks, k: int, item_names: Sequence[str] | None = None) -> None:
    """Raises ValueError when a real box (``masks`` [B, N] nonzero, host array) sits in a slot
    >= K, naming the items (``item_names`` or their batch indices) and their box counts."""
    masks = np.asarray(masks)
    if k >= masks.shape[1]:
        return
    bad = np.flatnonzero(np.any(masks[:, k:] != 0, axis=1))
    if bad.size:
        names = [item_names[i] if item_names is not None else f"item {i}" for i in bad[:10]]
        counts = [int(np.count_nonzero(masks[i])) for i in bad[:10]]
        raise ValueError(
            f"encoded_box_slots={k} but {bad.size} item(s) have a real box in slot >= {k}: "
            + ", ".join(f"{n} ({c} boxes)" for n, c in zip(names, counts))
            + f"; raise encoded_box_slots (max {masks.shape[1]}) or set it to 0 (all slots)")


def encoded_phrase_tokens(config, length: int) -> int:
    """L, the phrase tokens the encoders see (``config.encoded_phrase_tokens``; 0 = all)."""
    n = int(config.get("encoded_phrase_tokens", 0) or 0)
    if not 0 <= n <= length:
        raise ValueError(f"config field encoded_phrase_tokens={n} must be in [0, {length}] (the "
                         f"phrases have {length} tokens; 0 = all)")
    return n or length


def phrase_eos_token_ids(models: GoalModels) -> tuple[int, ...]:
    """EOS ids of the two phrase encoders (SD text encoder, DSAlign CLIP text tower)."""
    return (models.text_encoder.config.eos_token_id, models.clip.config.text_config.eos_token_id)


def check_phrase_tokens(phrase_input_ids, masks, length: int, eos_token_ids: Sequence[int],
                        item_names: Sequence[str] | None = None) -> None:
    """Raises ValueError when a real box's phrase (``masks`` [B, N] nonzero; ``phrase_input_ids``
    [B, N, T], host arrays) has its pooled EOS token at a position >= ``length`` for one of the
    encoders (transformers' rule, :func:`goal_jax.models.clip.eos_positions`), naming the items."""
    from goal_jax.models import clip as clip_lib

    ids = np.asarray(phrase_input_ids)
    if length >= ids.shape[-1]:
        return
    real = np.asarray(masks) != 0
    last = np.zeros(real.shape, np.int64)
    for eos in sorted(set(int(e) for e in eos_token_ids)):
        pos = np.asarray(clip_lib.eos_positions(ids.reshape(-1, ids.shape[-1]), eos))
        last = np.maximum(last, pos.reshape(real.shape))
    bad = np.flatnonzero(np.any(real & (last >= length), axis=1))
    if bad.size:
        names = [item_names[i] if item_names is not None else f"item {i}" for i in bad[:10]]
        longest = [int(np.max(np.where(real[i], last[i], 0))) + 1 for i in bad[:10]]
        raise ValueError(
            f"encoded_phrase_tokens={length} but {bad.size} item(s) have a phrase whose EOS "
            f"token is beyond it: " + ", ".join(f"{n} (needs {m})" for n, m in zip(names, longest))
            + f"; raise encoded_phrase_tokens (max {ids.shape[-1]}) or set it to 0 (all tokens)")


def encode_text(models: GoalModels, frozen: Mapping, input_ids, phrase_input_ids):
    """-> context [B,77,D], phrase features [B,N,D] (pooled, SD text encoder), caption CLIP
    embeds [B,P], phrase CLIP embeds [B,N,P] (projected, not normalised)."""
    b, n, length = phrase_input_ids.shape
    flat = phrase_input_ids.reshape(b * n, length)
    te = {"params": frozen["text_encoder"]}
    caption = models.text_encoder.apply(te, input_ids, method="encode_text")
    phrases = models.text_encoder.apply(te, flat, method="encode_text")
    cp = {"params": frozen["clip"]}
    cap_embeds = models.clip.apply(cp, input_ids, method="encode_text").embeds
    phr_embeds = models.clip.apply(cp, flat, method="encode_text").embeds
    out = (caption.last_hidden_state, phrases.pooled.reshape(b, n, -1), cap_embeds,
           phr_embeds.reshape(b, n, -1))
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def encode_latents(models: GoalModels, frozen: Mapping, images, posterior_noise):
    """z0 = (mean + std * posterior_noise) * scaling_factor; images [B,H,W,3] in [-1,1]."""
    post = models.vae.apply({"params": frozen["vae"]}, images, method="encode")
    z0 = (post.mean + jnp.exp(0.5 * post.logvar) * posterior_noise) * models.scaling_factor
    return jax.lax.stop_gradient(z0)


def compute_losses(models: GoalModels, config, trainable: Mapping, frozen: Mapping,
                   batch: Mapping, t, noise, z0, caption_keep=None, grounding_keep=None):
    """Eq. 1-15 for given t [B] (int32), eps [B,h,w,4] and scaled latents z0 [B,h,w,4].

    caption_keep / grounding_keep: optional [B] float 0/1 (dropout draws; None = keep all).
    Returns (total, metrics) with the objectives.goal_loss keys.
    """
    input_ids = batch["input_ids"]
    token_masks = batch["phrase_token_masks"].astype(jnp.float32)
    box_valid = batch["masks"].astype(jnp.float32)
    item_valid = None
    if caption_keep is not None:
        if models.null_input_ids is None:
            raise ValueError("caption dropout needs GoalModels.null_input_ids")
        keep = caption_keep.astype(bool)[:, None]
        input_ids = jnp.where(keep, input_ids, jnp.asarray(models.null_input_ids)[None, :])
        token_masks = token_masks * caption_keep[:, None, None]
        item_valid = caption_keep.astype(jnp.float32)
    if grounding_keep is not None:
        box_valid = box_valid * grounding_keep[:, None]
    n, length = batch["phrase_input_ids"].shape[1:]
    k = encoded_box_slots(config, n)
    tokens = encoded_phrase_tokens(config, length)
    context, phrase_feats, cap_embeds, phr_embeds = encode_text(
        models, frozen, input_ids, batch["phrase_input_ids"][:, :k, :tokens])
    if k < n:  # the slots >= K are padding: GLIGEN's position net replaces them by null features
        phrase_feats = jnp.pad(phrase_feats, ((0, 0), (0, n - k), (0, 0)))
    s = models.schedule
    z_t = schedule_lib.add_noise(s, z0, noise, t)  # eq. 1
    grounding = {"boxes": batch["boxes"], "phrase_embeds": phrase_feats, "masks": box_valid}
    unet_params = merge_params(trainable, frozen["unet"])
    pred, state = models.unet.apply({"params": unet_params}, z_t, t, context,
                                    grounding=grounding, gligen_scale=config.gligen_scale,
                                    mutable=["intermediates"])
    ldm = objectives.ldm_loss(pred, schedule_lib.training_target(s, z0, noise, t))  # eq. 2
    dsa = maa = None
    if config.alpha and (config.dsa_local or config.dsa_global):
        z0_hat = schedule_lib.predict_x0(s, z_t, pred, t)  # eq. 4
        dsa = objectives.dsalign_loss(
            models.vae, frozen["vae"], models.clip, frozen["clip"], z0_hat, cap_embeds,
            phr_embeds, batch["boxes"][:, :k], box_valid[:, :k], item_valid,
            scaling_factor=models.scaling_factor, image_size=models.clip_image_size,
            mean=tuple(config.clip_mean), std=tuple(config.clip_std),
            region_mode=config.dsa_region, local=config.dsa_local, global_=config.dsa_global)
    if config.beta:
        maa = objectives.maalign_loss(state["intermediates"], batch["boxes"], token_masks,
                                      box_valid, z_t.shape[1:3])
    return objectives.goal_loss(ldm, dsa, maa, config.alpha, config.beta)


def _check_batch(batch: Mapping) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch and not (k == "images" and "latents"
                                                                 in batch)]
    if missing:
        raise ValueError(f"train batch lacks {missing}; it needs {list(BATCH_KEYS)} "
                         "(or 'latents' instead of 'images')")


def latent_shape(models: GoalModels, batch: Mapping) -> tuple[int, ...]:
    if "latents" in batch:
        return tuple(batch["latents"].shape)
    b, h, w, _ = batch["images"].shape
    f = models.vae.config.downsample_factor
    return (b, h // f, w // f, models.vae.config.latent_channels)


def train_step(models: GoalModels, config, optimizer: optax.GradientTransformation,
               lr_schedule: optax.Schedule, state: TrainState, frozen: Mapping,
               batch: Mapping) -> tuple[TrainState, dict]:
    """One GOAL step (pure; wrap with :func:`make_train_step`): ``state`` updated with the
    gradients of the loss at ``frozen`` (:func:`create_train_state`), and the step metrics."""
    _check_batch(batch)
    rng, k_t, k_noise, k_post, k_cap, k_grd = jax.random.split(state.rng, 6)
    shape = latent_shape(models, batch)
    b = shape[0]
    t = jax.random.randint(k_t, (b,), 0, models.schedule.num_train_timesteps, jnp.int32)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    if "latents" in batch:
        z0 = batch["latents"].astype(jnp.float32)
    else:
        z0 = encode_latents(models, frozen, batch["images"],
                            jax.random.normal(k_post, shape, jnp.float32))
    caption_keep = grounding_keep = None
    if config.caption_dropout > 0:
        caption_keep = jax.random.bernoulli(k_cap, 1.0 - config.caption_dropout, (b,))
        caption_keep = caption_keep.astype(jnp.float32)
    if config.grounding_dropout > 0:
        grounding_keep = jax.random.bernoulli(k_grd, 1.0 - config.grounding_dropout, (b,))
        grounding_keep = grounding_keep.astype(jnp.float32)

    def loss_fn(trainable):
        return compute_losses(models, config, trainable, frozen, batch, t, noise, z0,
                              caption_keep, grounding_keep)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accum = max(int(config.optimizer.grad_accum_steps), 1)
    metrics = dict(metrics, grad_norm=_global_norm(grads),
                   lr=jnp.asarray(lr_schedule(state.step // accum), jnp.float32))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


# ==============================================================================================
# jit / sharding.
# ==============================================================================================


def state_shardings(state: TrainState, mesh, mode: str = "replicated",
                    min_size: int = 2 ** 14) -> TrainState:
    """NamedShardings for a TrainState under :mod:`goal_jax.sharding`: step and rng replicated,
    params and optimizer state per ``mode``."""
    rep = sharding_lib.replicated(mesh)
    return TrainState(
        step=rep, rng=rep,
        params=sharding_lib.param_shardings(state.params, mesh, mode, min_size),
        opt_state=sharding_lib.param_shardings(state.opt_state, mesh, mode, min_size))


def frozen_shardings(frozen: Mapping, mesh, mode: str = "replicated",
                     min_size: int = 2 ** 14) -> Any:
    """NamedShardings for the frozen params: per ``mode``, as the trainable params."""
    return sharding_lib.param_shardings(frozen, mesh, mode, min_size)


def shard_state(state: TrainState, frozen: Mapping, mesh, mode: str = "replicated",
                min_size: int = 2 ** 14) -> tuple[TrainState, Any]:
    """Places the train state and the frozen params on ``mesh`` -> (state, frozen)."""
    return (sharding_lib.shard_tree(state, state_shardings(state, mesh, mode, min_size)),
            sharding_lib.shard_tree(frozen, frozen_shardings(frozen, mesh, mode, min_size)))


def make_train_step(models: GoalModels, config, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, mesh=None,
                    example_state: TrainState | None = None, example_frozen: Any = None,
                    batch_keys: Sequence[str] | None = None) -> Callable:
    """Returns ``step(state, frozen, batch) -> (state, metrics)``: one jit-compiled function
    whose train state (step, params, opt_state, rng) is donated; ``frozen`` is read, never
    donated and never returned.

    With ``mesh`` (and ``example_state`` / ``example_frozen`` to read shapes from: arrays or
    ShapeDtypeStructs), the jit gets explicit in/out shardings: batch over ('data', 'fsdp'),
    params, optimizer state and frozen params replicated or fsdp-sharded per
    ``config.sharding``. The batch must then be placed with :func:`goal_jax.sharding.put_batch`.
    """

    def fn(state, frozen, batch):
        return train_step(models, config, optimizer, lr_schedule, state, frozen, batch)

    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=(0,))
    else:
        if example_state is None or example_frozen is None:
            raise ValueError("make_train_step with a mesh needs example_state and "
                             "example_frozen (for shapes)")
        mode = config.sharding.params
        min_size = config.sharding.fsdp_min_size
        state_sh = state_shardings(example_state, mesh, mode, min_size)
        frozen_sh = frozen_shardings(example_frozen, mesh, mode, min_size)
        keys = tuple(batch_keys) if batch_keys is not None else BATCH_KEYS
        batch_sh = {k: sharding_lib.batch_sharding(mesh) for k in keys}
        rep = sharding_lib.replicated(mesh)
        jitted = sharding_lib.jit_sharded(fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                                          out_shardings=(state_sh, rep), donate_argnums=(0,))

    def step(state: TrainState, frozen: Mapping, batch: Mapping) -> tuple[TrainState, dict]:
        masks, phrase_ids = batch.get("masks"), batch.get("phrase_input_ids")
        if isinstance(masks, np.ndarray):  # host batch: check the slots without a device copy
            check_box_slots(masks, encoded_box_slots(config, masks.shape[1]))
            if isinstance(phrase_ids, np.ndarray):
                check_phrase_tokens(phrase_ids, masks,
                                    encoded_phrase_tokens(config, phrase_ids.shape[-1]),
                                    phrase_eos_token_ids(models))
        # The mesh context lets the fused (Pallas) attention kernels run under shard_map.
        with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            return jitted(state, frozen, dict(batch))

    step.jitted = jitted
    return step


def parameter_counts(unet_params: Mapping, config) -> tuple[int, int]:
    """(trainable, frozen) scalar counts of a U-Net params tree (arrays or ShapeDtypeStructs)."""
    mask = trainable_mask(unet_params, trainable_patterns(config))
    flat = traverse_util.flatten_dict(_plain(unet_params))
    n_train = sum(int(np.prod(v.shape)) for k, v in flat.items() if mask["/".join(k)])
    n_all = sum(int(np.prod(v.shape)) for v in flat.values())
    return n_train, n_all - n_train


def _global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of all leaves (optax.tree.norm where available)."""
    tree_ns = getattr(optax, "tree", None)
    if tree_ns is not None and hasattr(tree_ns, "norm"):
        return tree_ns.norm(tree)
    return optax.global_norm(tree)
