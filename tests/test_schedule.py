"""goal_jax.schedule against diffusers' DDPM / DDIM / DPM-Solver++ / PNDM schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from goal_jax import schedule

# SD-1.4's scheduler/scheduler_config.json.
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
TORCH_CLASSES = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}


# ----------------------------------------------------------------------------------------------
# Training schedule.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    {},  # SD-1.4 defaults
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
    {"trained_betas": list(np.linspace(1e-4, 0.03, 100)), "num_train_timesteps": 100},
])
def test_alphas_cumprod_match_diffusers(config):
    ours = schedule.DDPMSchedule.from_config(config)
    ref = DDPMScheduler.from_config(schedule.SD14_SCHEDULE | config)
    diff_abar = np.abs(np.asarray(ours.alphas_cumprod) - ref.alphas_cumprod.numpy()).max()
    diff_beta = np.abs(np.asarray(ours.betas) - ref.betas.numpy()).max()
    print(f"alphas_cumprod max abs diff {diff_abar:.3g}, betas {diff_beta:.3g}")
    assert ours.alphas_cumprod.dtype == jnp.float32
    assert ours.alphas_cumprod.shape == (ref.config.num_train_timesteps,)
    assert diff_abar <= 1e-7 and diff_beta <= 1e-8


def test_sd14_defaults():
    ours = schedule.DDPMSchedule.from_config({"_class_name": "PNDMScheduler"})
    assert ours.num_train_timesteps == 1000 and ours.prediction_type == "epsilon"
    assert abs(float(ours.betas[0]) - 0.00085) < 1e-9 and abs(float(ours.betas[-1]) - 0.012) < 1e-9


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_target_and_x0(prediction_type):
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    ours = schedule.DDPMSchedule.from_config(config)
    ref = DDPMScheduler.from_config(config)
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 517, 999], np.int32)

    z_t = np.asarray(jax.jit(schedule.add_noise)(ours, z0, eps, t))
    z_t_ref = ref.add_noise(torch.from_numpy(z0), torch.from_numpy(eps), torch.from_numpy(t).long()).numpy()
    d_noise = np.abs(z_t - z_t_ref).max()

    target = np.asarray(schedule.training_target(ours, z0, eps, t))
    if prediction_type == "epsilon":
        assert np.array_equal(target, eps)
        d_target = 0.0
    else:
        v_ref = ref.get_velocity(torch.from_numpy(z0), torch.from_numpy(eps), torch.from_numpy(t).long()).numpy()
        d_target = np.abs(target - v_ref).max()

    x0 = np.asarray(schedule.predict_x0(ours, z_t, target, t))
    # eps at t=999 divides by sqrt(abar)=0.068, so float32 rounding of z_t is amplified ~15x.
    d_x0 = np.abs(x0 - z0).max()
    print(f"{prediction_type}: add_noise {d_noise:.3g}, target {d_target:.3g}, x0 round trip {d_x0:.3g}")
    assert d_noise <= 1e-6 and d_target <= 1e-6 and d_x0 <= 2e-5


def test_timesteps_must_be_integers():
    ours = schedule.DDPMSchedule.from_config({})
    with pytest.raises(ValueError, match="timesteps t must be integers"):
        schedule.add_noise(ours, jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)), jnp.array([1.0]))


# ----------------------------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------------------------

SAMPLER_CASES = [
    ("ddim", {}, 10, 0.0),
    ("ddim", {"timestep_spacing": "trailing", "steps_offset": 0}, 25, 0.0),
    ("ddim", {}, 10, 1.0),  # stochastic, same injected noise
    ("ddim", {"prediction_type": "v_prediction", "clip_sample": True, "timestep_spacing": "linspace",
              "set_alpha_to_one": True}, 7, 0.0),
    ("dpm++2m", {}, 10, 0.0),  # diffusers default spacing: linspace
    ("dpm++2m", {"timestep_spacing": "leading"}, 25, 0.0),
    ("dpm++2m", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min",
                 "solver_type": "heun"}, 20, 0.0),
    ("dpm++2m", {"solver_order": 3, "prediction_type": "v_prediction"}, 12, 0.0),
    ("dpm++2m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 15, 0.0),
    ("pndm", {}, 10, 0.0),  # SD-1.x: PLMS, skip_prk_steps
    ("pndm", {"timestep_spacing": "trailing", "steps_offset": 0}, 25, 0.0),
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "linspace"}, 10, 0.0),
    ("pndm", {"prediction_type": "v_prediction", "set_alpha_to_one": True}, 8, 0.0),
]


def _fake_model(x, t, fixed, xp):
    """A smooth deterministic 'U-Net': 0.1 x cos(t/100) + fixed sin(t/300)."""
    t = float(t) if xp is np else t.astype(jnp.float32)
    return 0.1 * x * xp.cos(t / 100.0) + fixed * xp.sin(t / 300.0)


def _diffusers_trajectory(name, config, steps, eta, x, fixed, noises):
    sched = TORCH_CLASSES[name].from_config(config)
    sched.set_timesteps(steps)
    x, fixed = torch.from_numpy(x), torch.from_numpy(fixed)
    for i, t in enumerate(sched.timesteps):
        eps = 0.1 * x * np.cos(int(t) / 100.0) + fixed * np.sin(int(t) / 300.0)
        kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noises[i])} if name == "ddim" else {}
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return sched.timesteps.numpy(), x.numpy()


@pytest.mark.parametrize("name,overrides,steps,eta", SAMPLER_CASES)
def test_sampler_matches_diffusers(name, overrides, steps, eta):
    config = SD_CONFIG | overrides
    sampler = schedule.make_scheduler(name, config, steps, eta=eta)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW for torch
    fixed = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noises = rng.standard_normal((sampler.num_steps, 2, 4, 8, 8)).astype(np.float32)
    ref_timesteps, ref = _diffusers_trajectory(name, config, steps, eta, x, fixed, noises)

    assert sampler.timesteps.dtype == np.int32 and sampler.num_steps == len(sampler.timesteps)
    assert np.array_equal(sampler.timesteps, ref_timesteps), (sampler.timesteps, ref_timesteps)
    assert sampler.init_noise_sigma == 1.0

    nhwc = lambda a: np.moveaxis(a, -3, -1)  # noqa: E731

    @jax.jit
    def run(latents, fixed, noises):
        state = sampler.init_state(latents)
        timesteps = jnp.asarray(sampler.timesteps)

        def body(i, carry):
            latents, state = carry
            eps = _fake_model(latents, timesteps[i], fixed, jnp)
            return sampler.step(state, eps, i, latents, noise=noises[i] if eta > 0 else None)

        return jax.lax.fori_loop(0, sampler.num_steps, body, (latents, state))[0]

    ours = np.asarray(run(nhwc(x), nhwc(fixed), nhwc(noises)))
    diff = np.abs(ours - nhwc(ref)).max()
    print(f"{name} {overrides} steps={steps} eta={eta}: final latents max abs diff {diff:.3g} "
          f"(|ref| max {np.abs(ref).max():.3g})")
    # float32 keeps ~7 digits: 1e-4 absolute, or 2e-6 of the largest value when latents exceed 50
    # (the cosine case: x0 = (x - sigma eps) / alpha with alpha ~ 6e-3 at lambda = -5.1).
    assert np.isfinite(ours).all() and diff <= max(1e-4, 2e-6 * np.abs(ref).max())


def test_sd_pndm_has_one_extra_call():
    sampler = schedule.make_scheduler("pndm", SD_CONFIG, 50)
    assert sampler.num_steps == 51
    assert sampler.timesteps[:4].tolist() == [981, 961, 961, 941] and sampler.timesteps[-1] == 1


def test_ddim_rng_noise_and_missing_noise():
    sampler = schedule.make_scheduler("ddim", SD_CONFIG, 10, eta=1.0)
    latents = jnp.ones((1, 4, 4, 4))
    eps = jnp.zeros_like(latents)
    key = jax.random.PRNGKey(3)
    a, _ = sampler.step({}, eps, 0, latents, rng=key)
    b, _ = sampler.step({}, eps, 0, latents, noise=jax.random.normal(key, latents.shape))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="needs `noise` or `rng`"):
        sampler.step({}, eps, 0, latents)


def test_jitted_loop_compiles_once():
    sampler = schedule.make_scheduler("dpm++2m", SD_CONFIG, 10)
    traces = []

    @jax.jit
    def run(latents, fixed):
        traces.append(1)
        timesteps = jnp.asarray(sampler.timesteps)

        def body(i, carry):
            latents, state = carry
            return sampler.step(state, _fake_model(latents, timesteps[i], fixed, jnp), i, latents)

        return jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents)))[0]

    outs = [run(jnp.full((1, 8, 8, 4), v), jnp.full((1, 8, 8, 4), 0.5)) for v in (0.1, 0.2, 0.3)]
    assert len(traces) == 1
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))


@pytest.mark.parametrize("maker,message", [
    (lambda: schedule.DDPMSchedule.from_config({"beta_schedule": "cosine"}), "`beta_schedule` must be one of"),
    (lambda: schedule.DDPMSchedule.from_config({"prediction_type": "x0"}), "`prediction_type` must be one of"),
    (lambda: schedule.DDPMSchedule.from_config({"num_train_timesteps": 0}), "`num_train_timesteps` must be an integer"),
    (lambda: schedule.DDPMSchedule.from_config({"beta_start": "small"}), "`beta_start` must be a number"),
    (lambda: schedule.DDPMSchedule.from_config({"trained_betas": [0.1, 0.2]}), "`trained_betas` must be 1000 values"),
    (lambda: schedule.DDPMSchedule.from_config({"rescale_betas_zero_snr": True}), "`rescale_betas_zero_snr` = True is not supported"),
    (lambda: schedule.make_scheduler("euler", SD_CONFIG, 10), "sampler name must be one of"),
    (lambda: schedule.make_scheduler("ddim", SD_CONFIG | {"timestep_spacing": "even"}, 10), "`timestep_spacing` must be one of"),
    (lambda: schedule.make_scheduler("ddim", SD_CONFIG, 0), "num_inference_steps must be an integer in [1, 1000]"),
    (lambda: schedule.make_scheduler("ddim", SD_CONFIG | {"clip_sample": "no"}, 10), "`clip_sample` must be true or false"),
    (lambda: schedule.make_scheduler("ddim", SD_CONFIG | {"steps_offset": 1000}, 10), "`steps_offset` = 1000 puts timesteps outside"),
    (lambda: schedule.make_scheduler("dpm++2m", SD_CONFIG | {"algorithm_type": "sde-dpmsolver++"}, 10), "`algorithm_type` must be one of ['dpmsolver++']"),
    (lambda: schedule.make_scheduler("dpm++2m", SD_CONFIG | {"use_karras_sigmas": True}, 10), "`use_karras_sigmas` = True is not supported"),
    (lambda: schedule.make_scheduler("dpm++2m", SD_CONFIG | {"solver_order": 4}, 10), "`solver_order` must be one of"),
    (lambda: schedule.make_scheduler("pndm", SD_CONFIG, 10, eta=0.5), "eta is a DDIM option"),
    (lambda: schedule.make_scheduler("pndm", SD_CONFIG | {"prediction_type": "sample"}, 10), "`prediction_type` must be 'epsilon' or 'v_prediction' for PNDM"),
    (lambda: schedule.make_scheduler("pndm", SD_CONFIG | {"skip_prk_steps": 1}, 10), "`skip_prk_steps` must be true or false"),
])
def test_bad_config_errors(maker, message):
    with pytest.raises(ValueError) as info:
        maker()
    assert message in str(info.value), str(info.value)
    assert "scheduler_config" in str(info.value) or "sampler name" in str(info.value) or \
        "num_inference_steps" in str(info.value) or "eta" in str(info.value)
