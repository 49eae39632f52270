"""The world's model configs (diffusers / transformers config.json dicts) and initialisation.

Sizes are set by ``configs/world.py`` (``model`` section); these functions turn them into the
config dicts the checkpoint folders carry, so the world's folders load exactly like the real
SD-1.4 / GLIGEN / CLIP ones (goal_jax.weights and diffusers / transformers).
"""

from __future__ import annotations

import zlib

import numpy as np

# Stable Diffusion 1.x's scheduler_config.json (PNDM, scaled_linear 0.00085 -> 0.012).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionGLIGENPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def vae_config(m, resolution: int, scaling_factor: float = 1.0) -> dict:
    """diffusers ``AutoencoderKL`` config.json; ``m`` = config.model.vae (channels, layers).
    Downsampling is 2^(len(channels) - 1)."""
    n = len(m.channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(m.channels),
        "layers_per_block": int(m.layers_per_block),
        "act_fn": "silu",
        "latent_channels": int(m.latent_channels),
        "norm_num_groups": int(m.norm_groups),
        "sample_size": int(resolution),
        "scaling_factor": float(scaling_factor),
    }


def _text_config(t, vocab_size: int, bos: int, eos: int, projection_dim: int) -> dict:
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": int(t.width),
        "intermediate_size": 4 * int(t.width),
        "num_hidden_layers": int(t.layers),
        "num_attention_heads": int(t.heads),
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": int(bos),
        "eos_token_id": int(eos),
        "pad_token_id": int(eos),
        "projection_dim": int(projection_dim),
    }


def clip_config(m, vocab_size: int, bos: int, eos: int) -> dict:
    """transformers ``CLIPModel`` config.json; ``m`` = config.model.clip."""
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": int(m.projection_dim),
        "logit_scale_init_value": 2.6592,
        "text_config": _text_config(m.text, vocab_size, bos, eos, m.projection_dim),
        "vision_config": {
            "hidden_size": int(m.vision.width),
            "intermediate_size": 4 * int(m.vision.width),
            "num_hidden_layers": int(m.vision.layers),
            "num_attention_heads": int(m.vision.heads),
            "num_channels": 3,
            "image_size": int(m.vision.image_size),
            "patch_size": int(m.vision.patch_size),
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": int(m.projection_dim),
        },
    }


def text_encoder_config(clip: dict) -> dict:
    """SD's ``text_encoder/`` config (transformers ``CLIPTextModel``) from a CLIPModel config:
    the pipeline's text encoder is the world CLIP's text tower, as SD's is CLIP ViT-L's."""
    return dict(clip["text_config"], model_type="clip_text_model",
                architectures=["CLIPTextModel"])


def unet_config(m, latent_size: int, cross_attention_dim: int) -> dict:
    """diffusers GLIGEN ``UNet2DConditionModel`` config.json; ``m`` = config.model.unet.

    ``m.attention`` says, per level (highest resolution first), whether its blocks have
    transformer blocks (self-attention, gated self-attention, cross-attention); the mid block
    always has one. On a CPU, attention over the 16x16 = 256 latent tokens costs more than the
    whole rest of the U-Net, so the world attends at 8x8 only. ``m.fuser_position_embedding``
    ("none" or "sinusoidal_2d") becomes the U-Net's ``fuser_position_embedding`` (a goal_jax
    extension: goal_jax.models.attention.GatedSelfAttentionDense)."""
    n = len(m.channels)
    if len(m.attention) != n:
        raise ValueError(f"config model.unet.attention has {len(m.attention)} entries for "
                         f"{n} levels (model.unet.channels)")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(latent_size),
        "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                             for a in m.attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(m.attention)],
        "block_out_channels": list(m.channels),
        "layers_per_block": int(m.layers_per_block),
        "attention_head_dim": int(m.head_dim),
        "cross_attention_dim": int(cross_attention_dim),
        "norm_num_groups": int(m.norm_groups),
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "use_linear_projection": False,
        "upcast_attention": False,
        "only_cross_attention": False,
        "attention_type": "gated",
        **({} if m.fuser_position_embedding == "none"
           else {"fuser_position_embedding": m.fuser_position_embedding}),
    }


def init_params(module, seed: int) -> dict:
    """Random parameters for ``module`` without running it (no compile: seconds, not minutes).

    Shapes come from ``jax.eval_shape``; values are drawn per parameter from a numpy generator
    seeded by (seed, parameter path): Dense/Conv ``kernel`` ~ N(0, 1/fan_in), ``embedding`` and
    other free tensors ~ N(0, 0.02^2), norm ``scale`` = 1, ``bias`` = 0, ``logit_scale`` =
    log(1/0.07) and the GLIGEN gates ``alpha_attn``/``alpha_dense`` = 0, as diffusers and
    transformers initialise them.
    """
    from flax import traverse_util

    from goal_jax import weights

    shapes = traverse_util.flatten_dict(weights.param_shapes(module, *module.dummy_inputs()))
    params = {}
    for path, spec in shapes.items():
        name = "/".join(path)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        leaf, shape = path[-1], tuple(spec.shape)
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        elif leaf == "scale":
            value = np.ones(shape)
        elif leaf == "bias" or leaf.startswith("alpha_"):
            value = np.zeros(shape)
        elif leaf == "logit_scale":
            value = np.full(shape, np.log(1 / 0.07))
        else:
            value = rng.normal(0.0, 0.02, shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)
