"""The scale of every GOAL loss term at the base world (explains the choice of α and β).

For ``batches`` batches of the fine-tuning set and each third of the diffusion time range
(t in [0, T/3), [T/3, 2T/3), [2T/3, T)) the base world's losses are computed exactly as in
training (``goal_jax.train.compute_losses`` with α = β = 1, so every term is evaluated) and,
with one forward and three backward passes (``jax.vjp``), the global norm of the gradient of
L_LDM, L_DSA and L_MAA with respect to the trainable parameters (the paper's fusers + attn1 +
attn2). Reported per MAAlign part (``up``/``mid``/``down`` at 8x8): the mean value and
gradient norm of each term, per time third and overall, and the weights that would make
α |∇L_DSA| and β |∇L_MAA| equal |∇L_LDM| (``balance_alpha`` / ``balance_beta``), next to the
paper's α = 1e-2, β = 1e-3.
"""

from __future__ import annotations

import time

import numpy as np

TERMS = ("ldm", "dsa", "maa")
SUBTERMS = ("ldm", "dsa_local", "dsa_global", "dsa", "maa_in", "maa_out", "maa")


def _config(overrides: dict):
    from experiments.shapes_world import arms

    config = arms.load_goal_config("demo")
    arms.apply_overrides(config, overrides)
    config.train.alpha, config.train.beta = 1.0, 1.0
    config.train.dsa_local, config.train.dsa_global = True, True
    return config


def measure(overrides: dict, parts=("up",), batches: int = 8, seed: int = 0,
            log=print) -> dict:
    """Loss-term scales at the base world.

    Args:
      overrides: the goal arm's config overrides (``arms.run_overrides``: world folders, data
        source and dir, resolution, batch size).
      parts: MAAlign parts to measure (the 8x8 cross-attention of the decoder / mid / encoder).
      batches: batches of the fine-tuning set per part (each evaluated at the three time
        thirds).

    Returns:
      {"parts": {part: {"overall": {term: {"value", "grad_norm"}}, "by_t": [{"t_range",
      term: {...}}, ...], "balance_alpha", "balance_beta"}}, "batches", "batch_size",
      "paper": {"alpha", "beta"}, "wall_s"}.
    """
    import jax
    import jax.numpy as jnp

    from goal_jax import train as train_lib
    from goal_jax.data import pipeline as data_pipeline

    start = time.time()
    out = {"batches": batches, "paper": {"alpha": 1e-2, "beta": 1e-3}, "parts": {}}
    for part in parts:
        config = _config(dict(overrides, **{"train.maa_part": part}))
        t, d = config.train, config.data
        out["batch_size"] = t.per_device_batch_size
        models, params = train_lib.load_models(t)
        trainable, frozen_unet = train_lib.partition_params(params["unet"],
                                                            train_lib.trainable_patterns(t))
        frozen = {"unet": frozen_unet, "vae": params["vae"],
                  "text_encoder": params["text_encoder"], "clip": params["clip"]}
        num_t = models.schedule.num_train_timesteps

        terms = _terms_fn(models, t)

        it = data_pipeline.make_train_iterator(
            d.data_dir, f"{t.model.pipeline}/tokenizer", batch_size=t.per_device_batch_size,
            resolution=d.resolution, max_boxes=d.max_boxes, seed=seed, flip=False,
            random_crop=False, source_dir=d.source)
        rng = np.random.default_rng([seed, 16])
        thirds = [(0, num_t // 3), (num_t // 3, 2 * num_t // 3), (2 * num_t // 3, num_t)]
        rows = {b: [] for b in range(3)}
        try:
            for k in range(batches):
                batch = {key: jnp.asarray(v) for key, v in next(it).items()}
                b = batch["images"].shape[0]
                for bin_i, (lo, hi) in enumerate(thirds):
                    latent = train_lib.latent_shape(models, batch)
                    ts = jnp.asarray(rng.integers(lo, hi, b), jnp.int32)
                    noise = jnp.asarray(rng.standard_normal(latent), jnp.float32)
                    post = jnp.asarray(rng.standard_normal(latent), jnp.float32)
                    metrics, norms = jax.device_get(terms(trainable, frozen, batch, ts, noise,
                                                          post))
                    rows[bin_i].append({**{f"{m}": float(metrics[m]) for m in SUBTERMS},
                                        **{f"grad_{m}": float(norms[m]) for m in TERMS}})
                log(f"[scales] part {part}: batch {k + 1}/{batches} "
                    f"({time.time() - start:.0f} s)")
        finally:
            it.close()
        by_t = []
        for bin_i, (lo, hi) in enumerate(thirds):
            by_t.append({"t_range": [lo, hi], **_summarize(rows[bin_i])})
        overall = _summarize([r for b in rows.values() for r in b])
        g = {k: overall[k]["grad_norm"] for k in TERMS}
        out["parts"][part] = {
            "overall": overall, "by_t": by_t,
            "balance_alpha": g["ldm"] / g["dsa"] if g["dsa"] else None,
            "balance_beta": g["ldm"] / g["maa"] if g["maa"] else None}
    out["wall_s"] = round(time.time() - start, 1)
    return out


def _terms_fn(models, config):
    """jit: (trainable, frozen, batch, t [B], eps, posterior noise) -> (metrics, {term:
    |grad of the term w.r.t. trainable|}), one forward and one backward per term (jax.vjp)."""
    import jax
    import jax.numpy as jnp

    from goal_jax import train as train_lib

    @jax.jit
    def terms(trainable, frozen, batch, t_steps, noise, post_noise):
        z0 = train_lib.encode_latents(models, frozen, batch["images"], post_noise)

        def f(p):
            _, metrics = train_lib.compute_losses(models, config, p, frozen, batch, t_steps,
                                                  noise, z0)
            return tuple(metrics[k] for k in TERMS), metrics

        values, vjp_fn, metrics = jax.vjp(f, trainable, has_aux=True)
        norms = {}
        for i, k in enumerate(TERMS):
            cot = tuple(jnp.ones_like(v) if j == i else jnp.zeros_like(v)
                        for j, v in enumerate(values))
            (g,) = vjp_fn(cot)
            norms[k] = jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2)
                                    for x in jax.tree_util.tree_leaves(g)))
        return metrics, norms

    return terms


def _summarize(rows: list[dict]) -> dict:
    out = {}
    for m in SUBTERMS:
        out[m] = {"value": float(np.mean([r[m] for r in rows]))}
        if m in TERMS:
            out[m]["grad_norm"] = float(np.mean([r[f"grad_{m}"] for r in rows]))
    return out
