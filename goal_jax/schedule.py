"""DDPM training schedule and the JAX sampling schedulers (DDIM, DPM-Solver++, PNDM/PLMS).

Everything reads a diffusers scheduler config dict (``scheduler/scheduler_config.json``) and
matches the numbers of diffusers' PyTorch schedulers.

Training (eq. 1 and eq. 4 of the design doc)::

    sched = DDPMSchedule.from_config(cfg)          # missing keys: SD-1.4 defaults
    z_t = add_noise(sched, z0, eps, t)             # sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    target = training_target(sched, z0, eps, t)    # eps, or v for "v_prediction"
    z0_hat = predict_x0(sched, z_t, model_output, t)

Sampling, inside one ``jax.jit`` with ``lax.fori_loop`` / ``lax.scan`` (``i`` may be traced)::

    scheduler = make_scheduler("ddim" | "dpm++2m" | "pndm", cfg, num_inference_steps, eta=0.0)
    latents = latents * scheduler.init_noise_sigma
    state = scheduler.init_state(latents)
    def body(i, carry):
        latents, state = carry
        t = jnp.asarray(scheduler.timesteps)[i]
        eps = model(latents, t)
        return scheduler.step(state, eps, i, latents)
    latents, state = jax.lax.fori_loop(0, scheduler.num_steps, body, (latents, state))

A scheduler is a plain Python object whose per-step coefficients are precomputed numpy tables
(constants of the compiled program); its ``step`` only indexes them with ``i``, so one compiled
loop serves every step. Missing scheduler config keys take the defaults of the corresponding
diffusers class (``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``PNDMScheduler``), so
``make_scheduler(name, cfg, n)`` and ``<DiffusersClass>.from_config(cfg)`` agree for any ``cfg``.
SD-1.x pipeline configs contain every key that matters.

Precision: the noise schedule is computed as diffusers does (float32 betas, cumulative product
accumulated in float64, stored float32); step coefficients are computed in float64 numpy from
those float32 values and stored float32; the updates run in float32 and return the dtype of
the latents.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULERS = ("ddim", "dpm++2m", "pndm")

# SD-1.4 training schedule (the defaults of DDPMSchedule.from_config).
SD14_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
# Defaults shared by diffusers' DDIM, DPM-Solver multistep and PNDM classes.
_DIFFUSERS_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


# ----------------------------------------------------------------------------------------------
# Config reading.
# ----------------------------------------------------------------------------------------------


class _Reader:
    """Reads typed values from a scheduler config dict; errors name ``source`` and the key."""

    def __init__(self, config: Mapping[str, Any], defaults: Mapping[str, Any], source: str):
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: scheduler config must be a dict, got {type(config).__name__}")
        self.config, self.defaults, self.source = config, defaults, source

    def _raw(self, key):
        value = self.config.get(key)
        return self.defaults[key] if value is None else value

    def error(self, key, message):
        return ValueError(f"{self.source}: `{key}` {message}")

    def choice(self, key, options):
        value = self._raw(key)
        if value not in options:
            raise self.error(key, f"must be one of {list(options)}, got {value!r}")
        return value

    def int(self, key, minimum):
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def float(self, key, low, high):
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            low < float(value) < high
        ):
            raise self.error(key, f"must be a number in ({low}, {high}), got {value!r}")
        return float(value)

    def bool(self, key):
        value = self._raw(key)
        if not isinstance(value, (bool, np.bool_)):
            raise self.error(key, f"must be true or false, got {value!r}")
        return bool(value)

    def unsupported(self, key, supported):
        """Raise unless the key is absent or has the single supported value."""
        value = self.config.get(key)
        if value is not None and value != supported:
            raise self.error(key, f"= {value!r} is not supported (only {supported!r})")


def _betas(reader: _Reader, num_train_timesteps: int) -> np.ndarray:
    """float32 betas [T] exactly as diffusers builds them (float64 math rounded to float32)."""
    trained = reader.config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.shape != (num_train_timesteps,) or not np.all((betas >= 0) & (betas < 1)):
            raise reader.error(
                "trained_betas",
                f"must be {num_train_timesteps} values in [0, 1), got shape {betas.shape}",
            )
        return betas.astype(np.float32)
    schedule = reader.choice("beta_schedule", BETA_SCHEDULES)
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(betas, dtype=np.float64).astype(np.float32)
    start = reader.float("beta_start", 0.0, 1.0)
    end = reader.float("beta_end", 0.0, 1.0)
    if schedule == "linear":
        betas = np.linspace(start, end, num_train_timesteps, dtype=np.float64)
    else:  # scaled_linear
        betas = np.linspace(start**0.5, end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return betas.astype(np.float32)


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar [T] float32: torch.cumprod of float32 (1 - beta), accumulated in float64."""
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def _read_schedule(config, defaults, source):
    reader = _Reader(config, defaults, source)
    reader.unsupported("rescale_betas_zero_snr", False)
    reader.unsupported("thresholding", False)
    n = reader.int("num_train_timesteps", 1)
    betas = _betas(reader, n)
    prediction_type = reader.choice("prediction_type", PREDICTION_TYPES)
    return reader, n, betas, _alphas_cumprod(betas), prediction_type


# ----------------------------------------------------------------------------------------------
# Training schedule.
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class DDPMSchedule:
    """The DDPM forward process used for training.

    betas, alphas_cumprod: float32 [T]; num_train_timesteps: T (static);
    prediction_type: "epsilon" | "v_prediction" | "sample" (static): what the U-Net predicts.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | None = None,
                    source: str = "scheduler_config") -> "DDPMSchedule":
        """Build from a diffusers scheduler config dict. Missing keys take the SD-1.4 values
        (scaled_linear 0.00085..0.012, 1000 steps, epsilon); unknown keys are ignored; a bad
        value raises ValueError naming ``source`` and the key."""
        _, n, betas, abar, prediction_type = _read_schedule(
            scheduler_config or {}, SD14_SCHEDULE, source)
        return cls(jnp.asarray(betas), jnp.asarray(abar), n, prediction_type)


def _coefficients(schedule: DDPMSchedule, t, ndim: int):
    """sqrt(abar_t), sqrt(1 - abar_t) as float32 [B, 1, ..., 1] (``ndim`` dims) for int t [B]."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"timesteps t must be integers, got dtype {t.dtype}")
    abar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: DDPMSchedule, z0, noise, t):
    """Eq. 1: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps.

    z0, noise: [B, h, w, c]; t: int [B] in [0, T). Returns z_t [B, h, w, c] in z0's dtype."""
    a, s = _coefficients(schedule, t, jnp.ndim(z0))
    return (a * z0 + s * noise).astype(jnp.result_type(z0))


def training_target(schedule: DDPMSchedule, z0, noise, t):
    """What the model regresses: eps ("epsilon"), v = sqrt(abar) eps - sqrt(1-abar) z0
    ("v_prediction", diffusers' get_velocity) or z0 ("sample"). Shapes as in add_noise."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return z0
    a, s = _coefficients(schedule, t, jnp.ndim(z0))
    return (a * noise - s * z0).astype(jnp.result_type(z0))


def predict_x0(schedule: DDPMSchedule, z_t, model_output, t):
    """One-step prediction of z0 from z_t (eq. 4 for "epsilon": (z_t - sqrt(1-abar) eps)/sqrt(abar);
    sqrt(abar) z_t - sqrt(1-abar) v for "v_prediction"; the output itself for "sample").

    z_t, model_output: [B, h, w, c]; t: int [B]. Returns [B, h, w, c] in z_t's dtype."""
    if schedule.prediction_type == "sample":
        return model_output
    a, s = _coefficients(schedule, t, jnp.ndim(z_t))
    if schedule.prediction_type == "epsilon":
        x0 = (z_t - s * model_output) / a
    else:
        x0 = a * z_t - s * model_output
    return x0.astype(jnp.result_type(z_t))


# ----------------------------------------------------------------------------------------------
# Schedulers (sampling).
# ----------------------------------------------------------------------------------------------


def _spaced_timesteps(spacing, n_train, steps, offset):
    """DDIM/PNDM base timesteps, descending for DDIM (diffusers' set_timesteps)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + offset
    ratio = n_train / steps
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1


def _x0_eps(prediction_type, sample, model_output, sqrt_a, sqrt_1ma):
    """(x0, eps) from a model output, all float32 arrays broadcastable to sample."""
    if prediction_type == "epsilon":
        return (sample - sqrt_1ma * model_output) / sqrt_a, model_output
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * sample
    return model_output, (sample - sqrt_a * model_output) / sqrt_1ma


def _f32(x):
    return jnp.asarray(x, jnp.float32)


class Scheduler:
    """Base class. Attributes: ``name``; ``timesteps`` np.int32 [S] (model-call timesteps in
    order); ``num_steps`` = S; ``init_noise_sigma`` (float); ``prediction_type``;
    ``alphas_cumprod`` np.float32 [T]. ``init_state(latents)`` gives the pytree of history
    buffers; ``step(state, model_output, i, latents)`` -> (latents, state) for the model call
    ``i`` (an int or traced int32 scalar in [0, S)) at timestep ``timesteps[i]``. Every scheduler's
    ``step`` accepts ``rng=None, noise=None``; only DDIM with eta > 0 uses them."""

    name = ""
    init_noise_sigma = 1.0

    def __init__(self, timesteps, tables, prediction_type, alphas_cumprod):
        self.timesteps = np.asarray(timesteps, np.int32)
        self.num_steps = int(self.timesteps.shape[0])
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod
        # float32 numpy [S] per-step coefficients, indexed with i inside step().
        self.tables = {k: np.asarray(v, np.float64).astype(np.float32) for k, v in tables.items()}

    def _at(self, name, i):
        return jnp.asarray(self.tables[name])[i]

    def init_state(self, latents) -> dict:
        return {}

    def __repr__(self):
        return f"{type(self).__name__}(num_steps={self.num_steps}, timesteps={self.timesteps.tolist()})"


class DDIMScheduler(Scheduler):
    """diffusers' DDIMScheduler.step (eta, clip_sample, set_alpha_to_one, steps_offset,
    timestep_spacing). With eta > 0, ``step`` adds std_t * noise, where ``noise`` [B,h,w,c]
    (standard normal, as diffusers' ``variance_noise``) is passed by the caller, or drawn
    from ``rng`` with jax.random.normal when ``noise`` is None."""

    name = "ddim"

    def __init__(self, scheduler_config, num_inference_steps, eta=0.0, source="scheduler_config"):
        reader, n, _, abar, prediction_type = _read_schedule(
            scheduler_config, _DIFFUSERS_SCHEDULE | {
                "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                "steps_offset": 0, "timestep_spacing": "leading"}, source)
        steps = _check_steps(num_inference_steps, n)
        self.clip_sample = reader.bool("clip_sample")
        self.clip_sample_range = reader.float("clip_sample_range", 0.0, math.inf)
        final = 1.0 if reader.bool("set_alpha_to_one") else float(abar[0])
        spacing = reader.choice("timestep_spacing", TIMESTEP_SPACINGS)
        offset = reader.int("steps_offset", 0)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        self.eta = float(eta)
        timesteps = _spaced_timesteps(spacing, n, steps, offset)
        abar64 = abar.astype(np.float64)
        if timesteps.max() >= n or timesteps.min() < 0:
            raise reader.error("steps_offset", f"= {offset} puts timesteps outside [0, {n})")
        prev = timesteps - n // steps
        a_t = abar64[timesteps]
        a_prev = np.where(prev >= 0, abar64[np.clip(prev, 0, n - 1)], final)
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        super().__init__(timesteps, {
            "sqrt_a": a_t**0.5, "sqrt_1ma": (1 - a_t) ** 0.5, "sqrt_a_prev": a_prev**0.5,
            "dir": np.sqrt(1 - a_prev - std**2), "std": std}, prediction_type, abar)

    def step(self, state, model_output, i, latents, rng=None, noise=None):
        """One DDIM update from timesteps[i] to timesteps[i] - T // S.

        model_output, latents: [B,h,w,c]; noise: optional [B,h,w,c]; rng: optional PRNG key.
        Returns (latents [B,h,w,c] in latents' dtype, state)."""
        sample = _f32(latents)
        x0, eps = _x0_eps(self.prediction_type, sample, _f32(model_output),
                          self._at("sqrt_a", i), self._at("sqrt_1ma", i))
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = self._at("sqrt_a_prev", i) * x0 + self._at("dir", i) * eps
        if self.eta > 0:
            if noise is None:
                if rng is None:
                    raise ValueError("DDIM with eta > 0 needs `noise` or `rng` in step()")
                noise = jax.random.normal(rng, sample.shape, jnp.float32)
            prev = prev + self._at("std", i) * _f32(noise)
        return prev.astype(jnp.result_type(latents)), state


class DPMSolverMultistepScheduler(Scheduler):
    """diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" (deterministic):
    solver_order 1-3, solver_type midpoint | heun, lower_order_final, euler_at_final,
    final_sigmas_type zero | sigma_min, lambda_min_clipped, timestep_spacing, steps_offset.
    Model call i uses sigma index i (diffusers' step index when sampling starts at the first
    timestep). Each update is latents' = A_i latents + sum_k B_ik m_k, with m_0 the current data
    prediction x0 and m_1, m_2 the previous ones (kept in ``state["history"]``)."""

    name = "dpm++2m"

    def __init__(self, scheduler_config, num_inference_steps, source="scheduler_config"):
        reader, n, _, abar, prediction_type = _read_schedule(
            scheduler_config, _DIFFUSERS_SCHEDULE | {
                "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -math.inf, "timestep_spacing": "linspace",
                "steps_offset": 0}, source)
        steps = _check_steps(num_inference_steps, n)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            reader.unsupported(key, False)
        reader.unsupported("variance_type", None)
        reader.choice("algorithm_type", ("dpmsolver++",))
        order = reader.choice("solver_order", (1, 2, 3))
        solver_type = reader.choice("solver_type", ("midpoint", "heun"))
        lower_order_final = reader.bool("lower_order_final")
        euler_at_final = reader.bool("euler_at_final")
        final_sigmas_type = reader.choice("final_sigmas_type", ("zero", "sigma_min"))
        lambda_min = reader._raw("lambda_min_clipped")
        if isinstance(lambda_min, bool) or not isinstance(lambda_min, (int, float)):
            raise reader.error("lambda_min_clipped", f"must be a number, got {lambda_min!r}")
        spacing = reader.choice("timestep_spacing", TIMESTEP_SPACINGS)
        offset = reader.int("steps_offset", 0)
        self.order = order

        # Timesteps (set_timesteps).
        with np.errstate(divide="ignore"):
            lambda_t = (np.log(np.sqrt(abar)) - np.log(np.sqrt(np.float32(1) - abar))).astype(np.float32)
        clipped_idx = int(np.searchsorted(lambda_t[::-1], lambda_min, side="left"))
        last = n - clipped_idx
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += offset
        else:
            ratio = n / steps
            timesteps = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
        if timesteps.max() >= n or timesteps.min() < 0:
            raise reader.error("steps_offset", f"= {offset} puts timesteps outside [0, {n})")
        all_sigmas = (((1 - abar) / abar) ** 0.5).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
        last_sigma = all_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32).astype(np.float64)

        # Per-step coefficients.
        alpha = 1 / np.sqrt(sigmas**2 + 1)
        sigma = sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf where sigma = 0
        S = len(timesteps)
        A, B = np.zeros(S), np.zeros((S, 3))
        for i in range(S):
            final = i == S - 1 and (euler_at_final or (lower_order_final and S < 15)
                                    or final_sigmas_type == "zero")
            second = i == S - 2 and lower_order_final and S < 15
            h = lam[i + 1] - lam[i]
            em1 = math.expm1(-h) if np.isfinite(h) else -1.0  # exp(-h) - 1
            A[i] = sigma[i + 1] / sigma[i]
            c = -alpha[i + 1] * em1
            d0 = np.array([1.0, 0.0, 0.0])
            if order == 1 or i < 1 or final:
                B[i] = c * d0
                continue
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            if order == 2 or i < 2 or second:
                if solver_type == "midpoint":
                    B[i] = c * d0 + 0.5 * c * d1_0
                else:
                    B[i] = c * d0 + alpha[i + 1] * (em1 / h + 1.0) * d1_0
                continue
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            B[i] = (c * d0 + alpha[i + 1] * (em1 / h + 1.0) * d1
                    - alpha[i + 1] * ((em1 + h) / h**2 - 0.5) * d2)
        super().__init__(timesteps, {
            "alpha_s": alpha[:-1], "sigma_s": sigma[:-1], "A": A,
            "B0": B[:, 0], "B1": B[:, 1], "B2": B[:, 2]}, prediction_type, abar)
        self.sigmas = sigmas.astype(np.float32)

    def init_state(self, latents):
        """{"history": float32 [2, *latents.shape]}: previous data predictions, newest first."""
        return {"history": jnp.zeros((2,) + tuple(jnp.shape(latents)), jnp.float32)}

    def step(self, state, model_output, i, latents, rng=None, noise=None):
        """One multistep DPM-Solver++ update from sigmas[i] to sigmas[i + 1].

        model_output, latents: [B,h,w,c]. Returns (latents in latents' dtype, new state)."""
        sample = _f32(latents)
        alpha_s, sigma_s = self._at("alpha_s", i), self._at("sigma_s", i)
        m0, _ = _x0_eps(self.prediction_type, sample, _f32(model_output), alpha_s, sigma_s)
        hist = state["history"]
        prev = (self._at("A", i) * sample + self._at("B0", i) * m0
                + self._at("B1", i) * hist[0] + self._at("B2", i) * hist[1])
        new_hist = jnp.stack([m0, hist[0]])
        return prev.astype(jnp.result_type(latents)), {"history": new_hist}


class PNDMScheduler(Scheduler):
    """diffusers' PNDMScheduler: PLMS with skip_prk_steps=True (SD-1.x) or Runge-Kutta warm-up
    (12 PRK calls) then PLMS when False; set_alpha_to_one, steps_offset, timestep_spacing.
    The combined noise estimate of call i is a fixed linear mix of the current model output,
    the PRK accumulator and the last three stored outputs (state["ets"], newest first)."""

    name = "pndm"

    def __init__(self, scheduler_config, num_inference_steps, source="scheduler_config"):
        reader, n, _, abar, prediction_type = _read_schedule(
            scheduler_config, _DIFFUSERS_SCHEDULE | {
                "skip_prk_steps": False, "set_alpha_to_one": False, "steps_offset": 0,
                "timestep_spacing": "leading"}, source)
        if prediction_type == "sample":
            raise reader.error("prediction_type", "must be 'epsilon' or 'v_prediction' for PNDM")
        steps = _check_steps(num_inference_steps, n)
        skip_prk = reader.bool("skip_prk_steps")
        final = 1.0 if reader.bool("set_alpha_to_one") else float(abar[0])
        spacing = reader.choice("timestep_spacing", TIMESTEP_SPACINGS)
        offset = reader.int("steps_offset", 0)
        base = _spaced_timesteps(spacing, n, steps, offset)[::-1].astype(np.int64)  # ascending
        if base.max() >= n or base.min() < 0:
            raise reader.error("steps_offset", f"= {offset} puts timesteps outside [0, {n})")
        ratio = n // steps
        if skip_prk:
            prk = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if steps < 4:
                raise ValueError(f"PNDM with skip_prk_steps=False needs num_inference_steps >= 4, got {steps}")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            prk = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            plms = base[:-3][::-1].copy()
        timesteps = np.concatenate([prk, plms]).astype(np.int64)

        # Replay diffusers' counter logic once to tabulate every call.
        # Mix weights: w_mo (current output), w_acc (PRK accumulator), w_e0..w_e2 (stored outputs).
        rows = []
        n_ets = 0
        for c, t in enumerate(timesteps):
            t = int(t)
            row = dict(w_mo=0.0, w_acc=0.0, w_e0=0.0, w_e1=0.0, w_e2=0.0, acc_mo=0.0, acc_acc=0.0,
                       push=0.0, use_cur=0.0, set_cur=0.0)
            if c < len(prk):  # step_prk
                prev_t = t - (0 if c % 2 else ratio // 2)
                t = int(prk[c // 4 * 4])
                k = c % 4
                row.update(w_mo=1.0, use_cur=1.0)
                if k == 0:
                    row.update(acc_mo=1 / 6, push=1.0, set_cur=1.0)
                elif k in (1, 2):
                    row.update(acc_mo=1 / 3, acc_acc=1.0)
                else:
                    row.update(w_mo=1 / 6, w_acc=1.0)
                n_ets += row["push"] > 0
            else:  # step_plms
                prev_t = t - ratio
                if c != 1:
                    row["push"] = 1.0
                    n_ets = min(n_ets, 3) + 1
                else:
                    prev_t, t = t, t + ratio
                if n_ets == 1 and c == 0:
                    row.update(w_mo=1.0, set_cur=1.0)
                elif n_ets == 1 and c == 1:
                    row.update(w_mo=0.5, w_e0=0.5, use_cur=1.0)
                elif n_ets == 2:
                    row.update(w_mo=1.5, w_e0=-0.5)
                elif n_ets == 3:
                    row.update(w_mo=23 / 12, w_e0=-16 / 12, w_e1=5 / 12)
                else:
                    row.update(w_mo=55 / 24, w_e0=-59 / 24, w_e1=37 / 24, w_e2=-9 / 24)
            a_t = float(abar[t])
            a_prev = float(abar[prev_t]) if prev_t >= 0 else final
            denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
            row.update(sqrt_a=a_t**0.5, sqrt_1ma=(1 - a_t) ** 0.5,
                       sample_coeff=(a_prev / a_t) ** 0.5, eps_coeff=(a_prev - a_t) / denom)
            rows.append(row)
        tables = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        super().__init__(timesteps, tables, prediction_type, abar)

    def init_state(self, latents):
        """{"ets": float32 [3, *shape] stored outputs (newest first), "acc": PRK accumulator,
        "cur_sample": the sample saved at the start of a multi-call step}."""
        shape = tuple(jnp.shape(latents))
        return {"ets": jnp.zeros((3,) + shape, jnp.float32),
                "acc": jnp.zeros(shape, jnp.float32),
                "cur_sample": jnp.zeros(shape, jnp.float32)}

    def step(self, state, model_output, i, latents, rng=None, noise=None):
        """One PNDM call (PRK or PLMS as diffusers' counter i decides).

        model_output, latents: [B,h,w,c]. Returns (latents in latents' dtype, new state)."""
        at = lambda name: self._at(name, i)  # noqa: E731
        mo, x = _f32(model_output), _f32(latents)
        ets, acc = state["ets"], state["acc"]
        cur = jnp.where(at("set_cur") > 0, x, state["cur_sample"])
        sample = jnp.where(at("use_cur") > 0, cur, x)
        e = (at("w_mo") * mo + at("w_acc") * acc + at("w_e0") * ets[0] + at("w_e1") * ets[1]
             + at("w_e2") * ets[2])
        if self.prediction_type == "v_prediction":
            e = at("sqrt_a") * e + at("sqrt_1ma") * sample
        prev = at("sample_coeff") * sample - at("eps_coeff") * e
        new_state = {
            "ets": jnp.where(at("push") > 0, jnp.concatenate([mo[None], ets[:-1]]), ets),
            "acc": at("acc_mo") * mo + at("acc_acc") * acc,
            "cur_sample": cur,
        }
        return prev.astype(jnp.result_type(latents)), new_state


def _check_steps(num_inference_steps, num_train_timesteps):
    if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
            or not 1 <= num_inference_steps <= num_train_timesteps):
        raise ValueError(f"num_inference_steps must be an integer in [1, {num_train_timesteps}] "
                         f"(num_train_timesteps), got {num_inference_steps!r}")
    return int(num_inference_steps)


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int,
                   eta: float = 0.0, source: str = "scheduler_config") -> Scheduler:
    """A scheduler: "ddim" (DDIMScheduler, ``eta``), "dpm++2m" (DPMSolverMultistepScheduler,
    dpmsolver++ order 2 by default) or "pndm" (PNDMScheduler), configured from the diffusers
    scheduler config dict (missing keys: that diffusers class's defaults)."""
    if name not in SCHEDULERS:
        raise ValueError(f"sampler name must be one of {list(SCHEDULERS)}, got {name!r}")
    if name == "ddim":
        return DDIMScheduler(scheduler_config, num_inference_steps, eta, source)
    if eta != 0:
        raise ValueError(f"eta is a DDIM option; sampler {name!r} needs eta=0, got {eta!r}")
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler(scheduler_config, num_inference_steps, source)
    return PNDMScheduler(scheduler_config, num_inference_steps, source)
