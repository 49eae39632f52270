"""The GLIGEN pipeline (:class:`GLIGENPipeline`): caption + layout -> image, as one
jit-compiled program.

It follows diffusers' ``StableDiffusionGLIGENPipeline`` (text-box generation) step for step:

* the caption (and the negative caption, ``""`` by default) go through the CLIP text encoder
  (``last_hidden_state`` [B,77,D] is the U-Net context);
* each layout phrase goes through the same encoder; its ``pooled`` output (EOS token after the
  final layer norm) is the phrase embedding. Layouts are padded to ``max_boxes = 30`` slots
  (boxes zero, phrase embeddings zero, ``masks`` 0 in padded slots);
* classifier-free guidance (when ``guidance_scale > 1``): the unconditional half gets the
  negative caption and the *same* boxes and phrase embeddings with ``masks = 0`` (null
  grounding); ``eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)``;
* scheduled sampling: the gated self-attention layers are on for the first
  ``num_grounding_steps = int(beta * len(timesteps))`` model calls and off after (skipped, as
  diffusers' disabled fusers; two loops, so no step computes a fuser it does not use),
  ``beta = 0.3`` by default as GLIGEN;
* initial latents: standard normal noise [h, w, C] per item from ``jax.random.PRNGKey(seed)``
  (so an image depends on its own seed only, not on the batch it is in), times the scheduler's
  ``init_noise_sigma``;
* the final latents are divided by the VAE's ``scaling_factor`` and decoded; images are
  ``clip(x / 2 + 0.5, 0, 1)`` (float, NHWC) and ``round(255 * that)`` as uint8, like diffusers'
  image processor.

Text encoding, the whole denoising loop (``lax.fori_loop``) and the VAE decode run in one
jit-compiled program, compiled ahead of time once per (model architectures, scheduler, steps,
eta, guidance on/off, padded batch, latent height, latent width, devices) and cached for the
process; parameters, ``guidance_scale`` and ``beta`` are runtime inputs, so changing them does
not recompile. The batch axis is sharded over a 1-D
``("data",)`` mesh of the given devices (batches are padded to a multiple of the device count);
parameters are replicated. Single-process only (each process would need its own slice of the
batch on a multi-host mesh).

Outputs are checked: images with a NaN or infinite value (damaged or diverged weights) raise
:class:`NonFiniteSampleError` naming the items instead of becoming black PNGs, and captions or
phrases longer than CLIP's 77 tokens warn (:class:`TextTruncatedWarning`) with their token
count before they are cut, as diffusers' pipelines do.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from goal_jax import layout as layout_lib
from goal_jax import schedule as schedule_lib

MAX_BOXES = layout_lib.MAX_BOXES
TEXT_LENGTH = 77

# Compiled sampling programs of this process, keyed by the model architectures (module reprs),
# scheduler config, scheduler settings, padded batch, latent size and devices. Parameters are
# inputs, so pipelines with other weights of the same architecture share the programs.
_PROGRAMS: dict[tuple, Any] = {}
_TRACE_COUNT = [0]


class NonFiniteSampleError(ValueError):
    """The sampled images hold NaN or infinite values (the weights are damaged or diverged)."""


class TextTruncatedWarning(UserWarning):
    """A caption or phrase is longer than the text encoder's 77 tokens and is cut."""


def warn_long_texts(tokenizer, texts: Sequence[str], what: str,
                    max_length: int = TEXT_LENGTH) -> list[int]:
    """Warns (TextTruncatedWarning) for every text of more than ``max_length`` tokens (BOS and
    EOS included), naming it and its token count; returns the indices of those texts."""
    long = []
    if not texts:
        return long
    for i, ids in enumerate(tokenizer(list(texts))["input_ids"]):
        if len(ids) > max_length:
            long.append(i)
            warnings.warn(f"{what} {i} ({texts[i][:60]!r}...) has {len(ids)} tokens; the text "
                          f"encoder reads the first {max_length}, the rest is cut",
                          TextTruncatedWarning, stacklevel=3)
    return long


def trace_count() -> int:
    """How many sampling programs this process has traced (each trace is one compile)."""
    return _TRACE_COUNT[0]


def clear_cache() -> None:
    """Drops the compiled sampling programs (frees their memory)."""
    _PROGRAMS.clear()


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Settings of one sampling call.

    Attributes:
      sampler: the scheduler, ``"ddim"``, ``"dpm++2m"`` or ``"pndm"``
        (``goal_jax.schedule.make_scheduler``).
      num_steps: number of inference steps.
      guidance_scale: classifier-free guidance weight w; guidance is on when ``w > 1``.
      beta: scheduled-sampling fraction in [0, 1]: grounding is on for the first
        ``int(beta * len(timesteps))`` model calls (1 = always, 0 = never).
      eta: DDIM stochasticity (0 = deterministic DDIM).
      height, width: image size in pixels (multiples of the VAE factor, 8 for SD); None = the
        U-Net's ``sample_size`` times the VAE factor.
      negative_caption: caption of the unconditional half.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 7.5
    beta: float = 0.3
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    negative_caption: str = ""

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) \
                or self.num_steps < 1:
            raise ValueError(f"SampleOptions: num_steps must be an integer >= 1, got "
                             f"{self.num_steps!r}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"SampleOptions: beta (scheduled sampling) must be in [0, 1], got "
                             f"{self.beta!r}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"SampleOptions: guidance_scale must be a finite number >= 0, got "
                             f"{self.guidance_scale!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"SampleOptions: eta must be in [0, 1], got {self.eta!r}")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"SampleOptions: {key} must be a positive integer or None, "
                                 f"got {value!r}")
        if not isinstance(self.negative_caption, str):
            raise ValueError("SampleOptions: negative_caption must be a string")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def num_grounding_steps(beta: float, num_timesteps: int) -> int:
    """Model calls with grounding on: ``int(beta * num_timesteps)``, exactly as diffusers."""
    return int(beta * num_timesteps)


@dataclasses.dataclass
class SampleOutput:
    """images: uint8 [B,H,W,3]; images_float: float32 [B,H,W,3] in [0,1] (before rounding);
    seeds: the seed of each image; compile_s: seconds spent compiling in this call (0 when the
    program was cached); run_s: seconds of the compiled program (including transfers)."""

    images: np.ndarray
    images_float: np.ndarray
    seeds: list[int]
    compile_s: float
    run_s: float


class GLIGENPipeline:
    """diffusers' ``StableDiffusionGLIGENPipeline`` in JAX: samples images from captions and
    layouts (:meth:`sample`) with the components of a loaded GLIGEN pipeline folder.

    Args:
      components: a ``goal_jax.weights.GLIGENComponents`` (``weights.load_pipeline``).
      unet_params: U-Net parameters to use instead of ``components.unet_params`` (e.g. a GOAL
        fine-tune restored from a training checkpoint).
      devices: devices of the data mesh (default ``jax.devices()``).
      max_boxes: grounding slots (30 in GLIGEN).
    """

    def __init__(self, components, unet_params=None, devices: Sequence[Any] | None = None,
                 max_boxes: int = MAX_BOXES):
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler_config = dict(components.scheduler_config)
        self.max_boxes = int(max_boxes)
        self.grounded = bool(getattr(self.unet.config, "is_gligen", True))
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(
            {"unet": components.unet_params if unet_params is None else unet_params,
             "vae": components.vae_params, "text": components.text_params},
            self._replicated)
        self.vae_factor = int(self.vae.config.downsample_factor)
        self.latent_channels = int(self.unet.config.in_channels)
        self._noise_fn = jax.jit(_initial_noise, static_argnums=(1,))

    # -- parameters and sizes --------------------------------------------------------------

    def set_unet_params(self, unet_params) -> None:
        """Swaps the U-Net weights (same shapes: the compiled programs are reused)."""
        self.params = dict(self.params, unet=jax.device_put(unet_params, self._replicated))

    def image_size(self, options: SampleOptions) -> tuple[int, int]:
        """(height, width) in pixels; checked to be multiples of the VAE factor."""
        sample = self.unet.config.sample_size
        if sample is None and (options.height is None or options.width is None):
            raise ValueError("the U-Net config has no sample_size: give height and width")
        if sample is not None:
            sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        height = options.height or sample[0] * self.vae_factor
        width = options.width or sample[1] * self.vae_factor
        for key, value in (("height", height), ("width", width)):
            if value % self.vae_factor:
                raise ValueError(f"{key} {value} is not a multiple of the VAE factor "
                                 f"{self.vae_factor}")
        return height, width

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
        """float32 [B, height/f, width/f, C]: standard normal noise, one PRNGKey(seed) per item
        (before ``init_noise_sigma``)."""
        seeds = _check_seeds(seeds)
        shape = (height // self.vae_factor, width // self.vae_factor, self.latent_channels)
        return np.asarray(self._noise_fn(jnp.asarray(np.uint32(seeds)), shape))

    # -- the public call -------------------------------------------------------------------

    def sample(self, captions: Sequence[str], layouts: Sequence[layout_lib.Layout],
               seeds: Sequence[int], options: SampleOptions = SampleOptions(),
               noise: np.ndarray | None = None) -> SampleOutput:
        """Images for a batch of (caption, layout, seed).

        Args:
          captions: B strings.
          layouts: B :class:`goal_jax.layout.Layout` (at most ``max_boxes`` boxes each).
          seeds: B integers in [0, 2**32): initial noise (and DDIM eta noise) per item.
          options: steps, guidance, beta, sampler, size, negative caption.
          noise: optional float32 [B, h, w, C] initial noise replacing the seeded one (before
            ``init_noise_sigma``), e.g. to compare with another implementation.

        Returns:
          :class:`SampleOutput`.
        """
        from goal_jax import text as text_lib  # numpy-only at import; tokenizer is the caller's

        captions, layouts, seeds = list(captions), list(layouts), _check_seeds(seeds)
        if not len(captions) == len(layouts) == len(seeds) or not captions:
            raise ValueError(f"sample: need the same non-zero number of captions, layouts and "
                             f"seeds, got {len(captions)}, {len(layouts)}, {len(seeds)}")
        for i, (caption, layout) in enumerate(zip(captions, layouts)):
            if not isinstance(caption, str):
                raise ValueError(f"sample: caption {i} must be a string, got {caption!r}")
            if not isinstance(layout, layout_lib.Layout):
                raise ValueError(f"sample: layout {i} must be a goal_jax.layout.Layout, got "
                                 f"{type(layout).__name__}")
            if len(layout) > self.max_boxes:
                raise ValueError(f"sample: layout {i} has {len(layout)} boxes, at most "
                                 f"{self.max_boxes} are supported")
            if len(layout) and not self.grounded:
                raise ValueError(f"sample: layout {i} has boxes but the U-Net has no GLIGEN "
                                 "position net (not a grounded checkpoint)")
        height, width = self.image_size(options)
        batch = len(captions)
        if noise is None:
            noise = self.initial_noise(seeds, height, width)
        noise = np.asarray(noise, np.float32)
        expected = (batch, height // self.vae_factor, width // self.vae_factor,
                    self.latent_channels)
        if noise.shape != expected:
            raise ValueError(f"sample: noise must have shape {expected}, got {noise.shape}")

        warn_long_texts(self.tokenizer, captions, "caption")
        warn_long_texts(self.tokenizer, [p for x in layouts for p in x.phrases], "phrase")
        slots = self.max_boxes if self.grounded else 0  # no phrase encoding without GLIGEN
        boxes, masks, phrases = layout_lib.pad_layouts(layouts, slots)
        caption_ids = text_lib.tokenize(self.tokenizer, captions, TEXT_LENGTH)
        negative_ids = text_lib.tokenize(self.tokenizer, [options.negative_caption] * batch,
                                         TEXT_LENGTH)
        phrase_ids = np.zeros((batch, slots, TEXT_LENGTH), np.int32)
        if slots:
            phrase_ids = text_lib.tokenize(
                self.tokenizer, [p for row in phrases for p in row], TEXT_LENGTH
            ).reshape(batch, slots, TEXT_LENGTH)
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(s))) for s in seeds])

        # Pad the batch to a multiple of the mesh size with copies of the last item.
        n_dev = self.mesh.size
        padded = -(-batch // n_dev) * n_dev
        batch_inputs = [caption_ids, negative_ids, phrase_ids, boxes, masks, noise, keys]
        batch_inputs = [_pad_batch(x, padded) for x in batch_inputs]
        batch_inputs = [jax.device_put(x, self._batch_sharding) for x in batch_inputs]

        scheduler = schedule_lib.make_scheduler(options.sampler, self.scheduler_config,
                                                options.num_steps, eta=options.eta)
        n_ground = num_grounding_steps(options.beta, len(scheduler.timesteps))
        scalars = [jax.device_put(np.float32(options.guidance_scale), self._replicated),
                   jax.device_put(np.int32(n_ground), self._replicated)]
        args = (self.params, *batch_inputs, *scalars)

        key = (repr(self.unet), repr(self.vae), repr(self.text_encoder),
               json.dumps(self.scheduler_config, sort_keys=True, default=str), self.grounded,
               options.sampler, options.num_steps, float(options.eta), options.use_cfg,
               self.max_boxes, padded, noise.shape[1], noise.shape[2],
               tuple(d.id for d in self.mesh.devices.flat))
        compile_s = 0.0
        if key not in _PROGRAMS:
            start = time.perf_counter()
            program = jax.jit(self._program(scheduler, options.use_cfg))
            _PROGRAMS[key] = program.lower(*args).compile()
            compile_s = time.perf_counter() - start
        start = time.perf_counter()
        images_float, images = _PROGRAMS[key](*args)
        images_float = np.asarray(images_float)[:batch]
        images = np.asarray(images)[:batch]
        run_s = time.perf_counter() - start
        bad = [i for i in range(batch) if not np.all(np.isfinite(images_float[i]))]
        if bad:
            raise NonFiniteSampleError(
                f"sample: {len(bad)} of {batch} images hold NaN or infinite values (items "
                f"{bad[:10]}, captions {[captions[i][:40] for i in bad[:3]]}): the U-Net, VAE "
                "or text-encoder weights are damaged or diverged")
        return SampleOutput(images, images_float, seeds, compile_s, run_s)

    # -- the compiled program --------------------------------------------------------------

    def _program(self, scheduler, use_cfg: bool):
        """The jit-able function (params, caption_ids, negative_ids, phrase_ids, boxes, masks,
        noise, keys, guidance_scale, n_ground) -> (images float [B,H,W,3], images uint8)."""
        unet, vae, text_encoder = self.unet, self.vae, self.text_encoder
        grounded = self.grounded
        timesteps = jnp.asarray(np.asarray(scheduler.timesteps), jnp.int32)
        num_calls = int(len(scheduler.timesteps))
        scaling = float(self.vae.config.scaling_factor)
        init_sigma = float(scheduler.init_noise_sigma)
        batch_sharding = self._batch_sharding
        stochastic = float(getattr(scheduler, "eta", 0.0)) > 0

        def encode(params, ids):
            return text_encoder.apply({"params": params}, ids, method="encode_text")

        def program(params, caption_ids, negative_ids, phrase_ids, boxes, masks, noise, keys,
                    guidance_scale, n_ground):
            _TRACE_COUNT[0] += 1  # runs at trace time only
            batch, max_boxes = masks.shape
            length = caption_ids.shape[-1]
            # One text-encoder call for captions, negative captions and phrases, grouped per
            # item ([B, 2 + N, T] -> [B * (2 + N), T]) so each item stays on its device.
            ids = jnp.concatenate([caption_ids[:, None], negative_ids[:, None], phrase_ids], 1)
            out = encode(params["text"], ids.reshape(-1, length))
            hidden = out.last_hidden_state.reshape(batch, 2 + max_boxes, length, -1)
            context, uncond = hidden[:, 0], hidden[:, 1]
            grounding = None
            if grounded:
                phrase_embeds = out.pooled.reshape(batch, 2 + max_boxes, -1)[:, 2:]
                phrase_embeds = phrase_embeds * masks[..., None].astype(phrase_embeds.dtype)
                grounding = {"boxes": boxes, "phrase_embeds": phrase_embeds, "masks": masks}
            if use_cfg:
                context = _interleave(uncond, context)
                if grounded:
                    grounding = {
                        "boxes": _interleave(boxes, boxes),
                        "phrase_embeds": _interleave(phrase_embeds, phrase_embeds),
                        "masks": _interleave(jnp.zeros_like(masks), masks),
                    }

            latents = noise * init_sigma
            state = scheduler.init_state(latents)

            def body(i, carry, grounding_on: bool):
                latents, state = carry
                t = timesteps[i]
                model_input = _interleave(latents, latents) if use_cfg else latents
                model_input = jax.lax.with_sharding_constraint(model_input, batch_sharding)
                t_batch = jnp.full((model_input.shape[0],), t, jnp.int32)
                # Grounding off = diffusers' disabled fusers: the gated self-attention layers
                # (and the position net) are skipped, not multiplied by 0.
                kwargs = {"grounding": grounding if grounding_on else None}
                eps = unet.apply({"params": params["unet"]}, model_input, t_batch, context,
                                 **kwargs)
                eps = jnp.asarray(eps, jnp.float32)
                if use_cfg:
                    eps = eps.reshape((batch, 2) + eps.shape[1:])
                    eps_uncond, eps_text = eps[:, 0], eps[:, 1]
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                step_noise = None
                if stochastic:  # DDIM eta > 0: per-item, per-step noise from the item's seed
                    step_noise = jax.vmap(lambda k: jax.random.normal(
                        jax.random.fold_in(k, i), latents.shape[1:], jnp.float32))(keys)
                latents, state = scheduler.step(state, eps, i, latents, noise=step_noise)
                return latents, state

            carry = (latents, state)
            if grounded:  # model calls [0, n_ground) with grounding, then without
                n_on = jnp.clip(n_ground, 0, num_calls)
                carry = jax.lax.fori_loop(0, n_on, lambda i, c: body(i, c, True), carry)
                carry = jax.lax.fori_loop(n_on, num_calls, lambda i, c: body(i, c, False), carry)
            else:
                carry = jax.lax.fori_loop(0, num_calls, lambda i, c: body(i, c, False), carry)
            latents, _ = carry
            image = vae.apply({"params": params["vae"]}, latents / scaling, method="decode")
            image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
            return image, jnp.round(image * 255).astype(jnp.uint8)

        return program


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def _initial_noise(seeds: jax.Array, shape: tuple) -> jax.Array:
    """uint32 seeds [B] -> float32 [B, *shape] standard normal noise, one key per seed."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def _interleave(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """[B, ...] x 2 -> [2B, ...] as (u0, c0, u1, c1, ...): each item's halves stay on the device
    that holds the item when the batch axis is sharded."""
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + uncond.shape[1:])


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    out = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed {i} must be an integer in [0, 2**32), got {seed!r}")
        out.append(int(seed))
    return out
