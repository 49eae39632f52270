"""World stage 1: a small AutoencoderKL trained on world images (reconstruction + tiny KL).

Loss per image: mean |x - x̂| + mean (x - x̂)² over pixels in [-1, 1], plus ``kl_weight`` × the
posterior's KL to N(0, I) (summed over latent elements, averaged over the batch), as SD's VAE
(without its perceptual and adversarial terms, which a 64 px flat-colour world does not need).
After training, the latent scaling factor is 1 / std of the posterior means over
``config.vae.scale_items`` training images (how SD's 0.18215 was chosen), and the diffusers
folder ``vae/`` is written with it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from goal_jax import weights
from goal_jax.models import vae as vae_lib
from goal_jax.world import models, stage
from goal_jax.world.data import WorldSplit


def build(config, scaling_factor: float = 1.0, dtype=jnp.float32):
    cfg = vae_lib.AutoencoderKLConfig.from_dict(
        models.vae_config(config.model.vae, config.data.resolution, scaling_factor))
    return vae_lib.AutoencoderKL(config=cfg, dtype=dtype)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train(config, workdir: str, train_split: WorldSplit, heldout: WorldSplit, log=print) -> dict:
    """Trains the VAE (resumable), writes ``<workdir>/vae/`` (diffusers folder) and returns
    {"steps", "seconds", "psnr_heldout", "scaling_factor", "params"}."""
    c = config.vae
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model = build(config, dtype=dtype)
    tx = stage.adamw(c.learning_rate, c.steps, warmup=c.warmup)
    state = stage.init_state(models.init_params(model, config.seed + 1), tx)

    def loss_fn(params, x, rng):
        post = model.apply({"params": params}, x, method=model.encode)
        rec = model.apply({"params": params}, post.sample(rng), method=model.decode)
        l1 = jnp.mean(jnp.abs(rec - x))
        l2 = jnp.mean((rec - x) ** 2)
        kl = jnp.mean(post.kl())  # [B] summed over latent elements
        return l1 + l2 + c.kl_weight * kl, {"l1": l1, "mse": l2, "kl": kl}

    @jax.jit
    def step(state, batch):
        x, rng = batch
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, rng)
        return stage.apply_gradients(state, grads, tx), dict(aux, loss=loss)

    n = len(train_split)

    def batch_fn(k):
        idx = np.random.default_rng([config.seed, 1, k]).integers(0, n, c.batch_size)
        return jnp.asarray(train_split.images_float(idx)), jax.random.PRNGKey(k)

    state, info = stage.run_stage("vae", os.path.join(workdir, "stages", "vae"), state, step,
                                  batch_fn, c.steps, c.log_every, c.save_every, log)
    params = state["params"]
    f32 = build(config)

    @jax.jit
    def encode_mean(x):
        return f32.apply({"params": params}, x, method=f32.encode).mean

    @jax.jit
    def reconstruct(x):
        return f32.apply({"params": params}, x)

    rng = np.random.default_rng([config.seed, 2])
    means = [np.asarray(encode_mean(jnp.asarray(train_split.images_float(
        rng.integers(0, n, 256))))) for _ in range(max(1, c.scale_items // 256))]
    scaling = float(1.0 / np.std(np.concatenate(means)))
    held = heldout.images_float(np.arange(min(512, len(heldout))))
    recon = np.concatenate([np.asarray(reconstruct(jnp.asarray(held[i:i + 128])))
                            for i in range(0, len(held), 128)])
    value = psnr(held, recon)
    out = build(config, scaling)
    weights.write_safetensors(os.path.join(workdir, "vae"), weights.to_state_dict(params),
                              out.config.to_dict(), "diffusion_pytorch_model")
    log(f"[vae] held-out PSNR {value:.2f} dB on {len(held)} images; latent scaling factor "
        f"{scaling:.4f}")
    return {"steps": c.steps, "seconds": info["seconds"], "psnr_heldout": value,
            "scaling_factor": scaling, "params": weights.count_params(params)}
