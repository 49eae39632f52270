"""The shapes-world recipe (``make world`` / ``python scripts/world.py``), big_vision style.

    python scripts/world.py --config configs/world.py --workdir runs/world --out assets/shapes_world
    python scripts/world.py --config configs/world.py:smoke --workdir /tmp/w --out /tmp/w/out

Presets: ``default`` (the shipped world) and ``smoke`` (tiny sizes, a few steps: CI).

Fields:
  seed            int, seeds every stage (data order, initialisation, noise).
  compute_dtype   "float32" | "bfloat16": compute dtype of every stage (params stay float32).
  data
    train_items   int, rendered training items (memory-mapped; ~12 KiB each at 64 px).
    heldout_items int, held-out items (evaluation: VAE PSNR, CLIP zero-shot, sampling).
    resolution    int, image side in pixels.
    max_boxes     int, grounding slots (the world has at most 4 objects).
  model.vae       channels (per level; downsampling 2^(levels-1)), layers_per_block,
                  latent_channels, norm_groups.
  model.clip      text.{width, layers, heads}, vision.{width, layers, heads, image_size,
                  patch_size}, projection_dim. The pipeline's text encoder is this text tower.
  model.unet      channels (per level), attention (per level: transformer blocks or not),
                  layers_per_block, head_dim, norm_groups, fuser_position_embedding
                  ("sinusoidal_2d" | "none": the GLIGEN fusers' fixed 2D position embedding).
  vae, clip, ldm, gligen (the four training stages)
    steps, batch_size, learning_rate (AdamW, warm-up then cosine to 10 %), warmup,
    log_every, save_every (orbax save of the stage state: resume point), and
    vae.kl_weight, vae.scale_items (items for the latent scaling factor),
    clip.text_tokens / phrase_tokens (caption / phrase tokens the CLIP encodes in training:
    an error names a text whose EOS does not fit), clip.vocabulary_weight
    (weight of the region-vs-all-216-phrases cross-entropy; 0 = plain CLIP pairs only),
    ldm/gligen.ema_decay, caption_dropout, gligen.grounding_dropout,
    ldm/gligen.timesteps ("uniform" | "cubic": t = (1 - u^3) T, noisy steps favoured),
    ldm/gligen.loss_weighting ("eps" | "x0_clipped": epsilon MSE x clip(1/SNR, 1, 10)),
    gligen.gate_init (start value of every gated self-attention gate; GLIGEN uses 0).
  eval
    layouts       int, held-out layouts sampled for the report (two-object ones).
    num_steps, guidance_scale, beta: sampler settings (DDIM).
"""

from __future__ import annotations

import ml_collections


def _stage(**kw) -> ml_collections.ConfigDict:
    base = dict(steps=1000, batch_size=32, learning_rate=1e-3, warmup=200, log_every=50,
                save_every=500)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = (arg or "default").strip()
    if preset not in ("default", "smoke"):
        raise ValueError(f"unknown world preset {preset!r}; expected 'default' or 'smoke'")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.compute_dtype = "float32"  # XLA:CPU convolutions are no faster in bf16 (measured)
    c.data = ml_collections.ConfigDict(dict(train_items=30_000, heldout_items=2_000,
                                            resolution=64, max_boxes=4))
    c.model = ml_collections.ConfigDict()
    c.model.vae = ml_collections.ConfigDict(dict(channels=(16, 32, 64), layers_per_block=1,
                                                 latent_channels=4, norm_groups=8))
    c.model.clip = ml_collections.ConfigDict(dict(
        text=dict(width=64, layers=3, heads=4),
        vision=dict(width=64, layers=3, heads=4, image_size=64, patch_size=8),
        projection_dim=32))
    # fuser_position_embedding "sinusoidal_2d": the GLIGEN fusers add a fixed 2D position
    # embedding to their visual tokens (a goal_jax extension; "none" = GLIGEN's fuser). This
    # 2-level U-Net cannot tell its tokens' places well enough for a fuser to learn to put a
    # phrase in its box: without it the boxes' places lower the held-out loss by 0.0 % and
    # samples ignore them (docs/world.md, "The fuser's position embedding").
    c.model.unet = ml_collections.ConfigDict(dict(channels=(64, 128), attention=(False, True),
                                                  layers_per_block=1, head_dim=16,
                                                  norm_groups=16,
                                                  fuser_position_embedding="sinusoidal_2d"))
    c.vae = _stage(steps=1200, batch_size=16, learning_rate=1e-3, kl_weight=1e-6,
                   scale_items=2048)
    # vocabulary_weight: each box region is also classified over the 216 full phrases
    # (clip_stage); without it the CLIP told shapes apart in 69.8 % of held-out regions.
    c.clip = _stage(steps=2400, batch_size=128, learning_rate=1e-3, text_tokens=24,
                    phrase_tokens=8, vocabulary_weight=1.0)
    c.ldm = _stage(steps=2000, batch_size=32, learning_rate=1e-3, ema_decay=0.998,
                   caption_dropout=0.1)
    # The GLIGEN stage: with GLIGEN's own settings (gates from 0, captions dropped 10 %,
    # uniform t, epsilon loss) 1000 steps left every gate below 0.06 and the held-out loss
    # with and without grounding equal to 4 digits; these settings make the boxes pay off
    # (docs/world.md, "Why the GLIGEN stage departs from GLIGEN's settings").
    c.gligen = _stage(steps=1200, batch_size=32, learning_rate=1e-3, ema_decay=0.998,
                      caption_dropout=0.5, grounding_dropout=0.1, gate_init=0.5,
                      timesteps="cubic", loss_weighting="x0_clipped")
    c.eval = ml_collections.ConfigDict(dict(layouts=96, num_steps=25, guidance_scale=5.0,
                                            beta=1.0))
    if preset == "smoke":
        c.data.train_items, c.data.heldout_items, c.data.resolution = 96, 48, 32
        c.model.vae.channels, c.model.vae.norm_groups = (8, 8, 16), 4
        c.model.clip.text.update(width=16, layers=1, heads=2)
        c.model.clip.vision.update(width=16, layers=1, heads=2, image_size=32)
        c.model.clip.projection_dim = 8
        c.model.unet.update(channels=(16, 32), attention=(False, True), head_dim=8,
                            norm_groups=8)
        for name in ("vae", "clip", "ldm", "gligen"):
            c[name].update(steps=4, batch_size=4, log_every=2, save_every=2, warmup=1)
        c.vae.scale_items = 256
        c.eval.update(layouts=4, num_steps=3)
    return c
