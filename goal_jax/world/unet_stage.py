"""World stages 3 and 4: the text-conditioned U-Net (LDM pretraining), then its GLIGEN stage.

Both stages regress the noise of cached VAE latents (``latents.npy``: posterior means × the
scaling factor of every training item), with SD-1.4's DDPM schedule (scaled_linear, 1000 steps,
epsilon), uniform timesteps and the frozen world text encoder (the world CLIP's text tower):

* ``ldm``: every U-Net parameter except the GLIGEN ones (``fuser/`` and ``position_net/``) is
  trained; no grounding input (the fusers are skipped, as a plain SD U-Net); captions are
  replaced by the empty caption with probability ``caption_dropout`` (for classifier-free
  guidance).
* ``gligen``: only ``fuser/`` (gated self-attention) and ``position_net/`` are trained, the base
  is frozen (GLIGEN's recipe); the grounding input is each object's phrase embedding (the text
  encoder's pooled EOS feature) and box; with probability ``grounding_dropout`` an item's boxes
  are all masked (the position net's null features), and captions drop as above.

An exponential moving average of the trained parameters (``ema_decay``) is what is exported.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from goal_jax import schedule as schedule_lib, text as text_lib, weights
from goal_jax.models import unet as unet_lib
from goal_jax.world import models, stage
from goal_jax.world.data import WorldSplit, grounding_arrays

GLIGEN_PARAMS = re.compile(r"(^|/)(fuser|position_net)/")
PHRASE_TOKENS = 16  # phrases are <= 6 tokens; the pooled EOS feature is causal, so exact


def build(config, cross_attention_dim: int, dtype=jnp.float32):
    latent = config.data.resolution // 2 ** (len(config.model.vae.channels) - 1)
    d = models.unet_config(config.model.unet, latent, cross_attention_dim)
    return unet_lib.UNet2DConditionModel(
        config=unet_lib.UNet2DConditionConfig.from_dict(d), dtype=dtype)


def split_params(params, gligen: bool) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts: the GLIGEN parameters when ``gligen`` else the rest."""
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if bool(GLIGEN_PARAMS.search(k)) == gligen}
    frozen = {k: v for k, v in flat.items() if k not in train}
    return train, frozen


def merge(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")


def set_gates(params, value: float):
    """U-Net params with every gated self-attention gate (``fuser/alpha_attn`` and
    ``fuser/alpha_dense``, scalars; the fuser adds tanh(alpha) x its output) set to ``value``.
    GLIGEN starts them at 0 (the base is untouched at first); a non-zero start makes the
    fuser's output reach the loss from the first step."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for k in flat:
        if k.endswith("fuser/alpha_attn") or k.endswith("fuser/alpha_dense"):
            flat[k] = jnp.full_like(flat[k], value)
    return traverse_util.unflatten_dict(flat, sep="/")


def fresh_gligen(base_params, init_params):
    """``base_params`` with its GLIGEN layers (fuser/, position_net/) taken from
    ``init_params`` (the untrained initialisation): the input of a GLIGEN stage."""
    _, base = split_params(base_params, gligen=True)
    gligen, _ = split_params(init_params, gligen=True)
    return merge(gligen, base)


TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(rng: np.random.Generator, batch: int, num_train_timesteps: int,
                     kind: str = "uniform") -> np.ndarray:
    """int [batch] training timesteps in [0, num_train_timesteps).

    ``uniform``: every step equally likely. ``cubic``: t = (1 - u^3) T with u ~ U[0, 1), the
    non-uniform sampling T2I-Adapter uses for spatial conditions: the density grows as
    (1 - t/T)^(-2/3), so noisy steps (where the layout of an image is decided) are drawn far
    more often than under ``uniform`` (P(t >= T/2) = 0.79 instead of 0.5).
    """
    if kind == "uniform":
        return rng.integers(0, num_train_timesteps, batch)
    if kind == "cubic":
        u = rng.random(batch)
        return np.minimum((1.0 - u ** 3) * num_train_timesteps, num_train_timesteps - 1).astype(np.int64)
    raise ValueError(f"unknown timestep sampling {kind!r}; expected one of {TIMESTEP_SAMPLING}")


LOSS_WEIGHTING = ("eps", "x0_clipped")


def loss_weight(alphas_cumprod: jax.Array, t: jax.Array, kind: str = "eps",
                max_weight: float = 10.0) -> jax.Array:
    """float32 [B] weights of the per-item epsilon MSE.

    ``eps``: 1 (the LDM loss). ``x0_clipped``: (1 - abar_t) / abar_t = 1 / SNR(t) clipped to
    [1, ``max_weight``]; the epsilon error times 1/SNR is the error of the implied x0, so this
    weighs each step by how wrong its picture of the clean latent is, where the layout is
    decided (noisy steps), instead of by its noise residual (which the quiet steps dominate).
    """
    if kind == "eps":
        return jnp.ones(t.shape, jnp.float32)
    if kind == "x0_clipped":
        abar = alphas_cumprod[t]
        return jnp.clip((1.0 - abar) / abar, 1.0, max_weight)
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {LOSS_WEIGHTING}")


def latent_means(vae, vae_params, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> the VAE posterior means × its scaling factor
    [B, H/f, W/f, C]: the latents the U-Net is trained on (f = the VAE's downsampling)."""
    scaling = float(vae.config.scaling_factor)
    return vae.apply({"params": vae_params}, images, method=vae.encode).mean * scaling


def phrase_grounding(text_encoder, text_params, phrase_ids: jax.Array, boxes: jax.Array,
                     masks: jax.Array) -> dict:
    """The U-Net's grounding input: phrase token ids [B, N, L] int32, boxes [B, N, 4] (xyxy in
    [0, 1]), masks [B, N] float (1 = a box) -> {"boxes", "masks", "phrase_embeds" [B, N, D]}:
    each phrase's pooled (EOS) text feature, zero where the slot is masked."""
    b, n, length = phrase_ids.shape
    pooled = text_encoder.apply({"params": text_params},
                                phrase_ids.reshape(b * n, length)).pooled
    return {"boxes": boxes, "masks": masks,
            "phrase_embeds": pooled.reshape(b, n, -1) * masks[..., None]}


def encode_latents(vae, vae_params, split: WorldSplit, path: str, log=print) -> np.ndarray:
    """Posterior means × scaling factor of every item of ``split``, cached in ``path``
    (float32 [N, h, w, 4]); reused when complete."""
    if os.path.isfile(path):
        cached = np.load(path, mmap_mode="r")
        if cached.shape[0] == len(split):
            return np.asarray(cached)

    @jax.jit
    def enc(x):
        return latent_means(vae, vae_params, x)

    out = []
    for start in range(0, len(split), 256):
        out.append(np.asarray(enc(jnp.asarray(split.images_float(
            np.arange(start, min(start + 256, len(split))))))))
        if (start // 256) % 20 == 0:
            log(f"[latents] {start + len(out[-1])}/{len(split)} items encoded")
    latents = np.concatenate(out)
    np.save(path + ".tmp.npy", latents)
    os.replace(path + ".tmp.npy", path)
    return latents


class TextCache:
    """Token ids of every training caption [N, 77] and phrase [N, max_boxes, 16], the empty
    caption's ids, and the boxes / masks of every item."""

    def __init__(self, tokenizer, split: WorldSplit, max_boxes: int):
        self.captions = text_lib.tokenize(tokenizer, [r["caption"] for r in split.records])
        self.boxes, self.masks, phrases = grounding_arrays(split.records, max_boxes)
        flat = [p for row in phrases for p in row]
        self.phrases = text_lib.tokenize(tokenizer, flat)[:, :PHRASE_TOKENS].reshape(
            len(split), max_boxes, PHRASE_TOKENS)
        self.null = text_lib.tokenize(tokenizer, [""])[0]


def train(config, workdir: str, which: str, unet_params, text_encoder, text_params, latents,
          cache: TextCache, log=print):
    """Runs stage ``which`` ("ldm" or "gligen") from ``unet_params`` (resumable) and returns
    ({"steps", "seconds", "trained_params", "last": metrics}, EMA-merged U-Net params)."""
    if which not in ("ldm", "gligen"):
        raise ValueError(f"unknown U-Net stage {which!r}")
    c = config[which]
    gligen = which == "gligen"
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    unet = build(config, text_encoder.config.hidden_size, dtype)
    sched = schedule_lib.DDPMSchedule.from_config(models.SCHEDULER_CONFIG)
    trainable, frozen = split_params(unet_params, gligen)
    tx = stage.adamw(c.learning_rate, c.steps, warmup=c.warmup)
    state = stage.init_state(trainable, tx, ema=True)
    frozen = jax.tree_util.tree_map(jnp.asarray, frozen)
    null = jnp.asarray(cache.null)

    def loss_fn(train_params, batch):
        z0, ids, phrase_ids, boxes, masks, t, noise, drop_caption, drop_ground = batch
        ids = jnp.where(drop_caption[:, None], null[None], ids)
        context = text_encoder.apply({"params": text_params}, ids).last_hidden_state
        grounding = None
        if gligen:
            masks = masks * (1.0 - drop_ground[:, None])
            grounding = phrase_grounding(text_encoder, text_params, phrase_ids, boxes, masks)
        context = jax.lax.stop_gradient(context)
        z_t = schedule_lib.add_noise(sched, z0, noise, t)
        eps = unet.apply({"params": merge(train_params, frozen)}, z_t, t, context, grounding)
        per_item = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
        return jnp.mean(per_item * loss_weight(sched.alphas_cumprod, t,
                                               c.get("loss_weighting", "eps")))

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        return stage.apply_gradients(state, grads, tx, c.ema_decay), {"loss": loss}

    n = len(latents)

    def batch_fn(k):
        rng = np.random.default_rng([config.seed, 4 if gligen else 5, k])
        idx = rng.integers(0, n, c.batch_size)
        b = c.batch_size
        return (jnp.asarray(latents[idx]), jnp.asarray(cache.captions[idx]),
                jnp.asarray(cache.phrases[idx]), jnp.asarray(cache.boxes[idx]),
                jnp.asarray(cache.masks[idx]),
                jnp.asarray(sample_timesteps(rng, b, sched.num_train_timesteps,
                                             c.get("timesteps", "uniform")), jnp.int32),
                jnp.asarray(rng.standard_normal((b,) + latents.shape[1:]),
                            jnp.float32),
                jnp.asarray(rng.random(b) < c.caption_dropout),
                jnp.asarray((rng.random(b) < c.get("grounding_dropout", 0.0)).astype(np.float32)))

    state, info = stage.run_stage(which, os.path.join(workdir, "stages", which), state, step,
                                  batch_fn, c.steps, c.log_every, c.save_every, log)
    ema = jax.tree_util.tree_map(np.asarray, state["ema"])
    merged = merge(ema, jax.tree_util.tree_map(np.asarray, frozen))
    return ({"steps": c.steps, "seconds": info["seconds"],
             "trained_params": weights.count_params(ema), "last": info.get("metrics", {})},
            merged)
