"""Tiny randomly initialised models for the ``demo`` preset (no download, seconds on a CPU).

:func:`write_demo_models` builds, from the small configs below, a complete diffusers-format
GLIGEN pipeline folder and a Hugging Face ``CLIPModel`` folder, exactly as the real checkpoints
are laid out, so the demo exercises the same loading code (``weights.load_pipeline`` /
``weights.load_clip``) as the paper preset::

    <folder>/pipeline/   model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/
    <folder>/clip/       config.json + model.safetensors (the DSAlign CLIP)
    <folder>/demo_models.json   what was written (seed, configs), checked on reuse

The tokenizer is ``text.write_word_vocab`` over the shapes dataset's ``VOCABULARY`` (every word
of the demo captions is one token). Sizes, for 64x64 images: VAE downsamples 4x (16x16
latents, 3 levels of 16/32/32 channels); the U-Net has 2 levels (32/64 channels, 16x16 and 8x8)
with cross-attention in ``down_blocks_0``, the mid block (8x8) and ``up_blocks_1`` (16x16, the
"decoder 16x16" layers MAAlign uses by default); text encoder and CLIP have width 32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Sequence

import numpy as np

from goal_jax.world import models as world_models

DEMO_RESOLUTION = 64

# SD-1.x's scheduler config and the GLIGEN pipeline's model_index.json (shared with the world).
SCHEDULER_CONFIG = world_models.SCHEDULER_CONFIG
MODEL_INDEX = world_models.MODEL_INDEX


def unet_config_dict(sample_size: int = DEMO_RESOLUTION // 4) -> dict:
    """diffusers ``UNet2DConditionModel`` config.json of the demo GLIGEN U-Net: 32/64 channels,
    cross-attention in the first (16x16) level and the mid block (world_models.unet_config)."""
    size = types.SimpleNamespace(channels=(32, 64), attention=(True, False), layers_per_block=1,
                                 head_dim=8, norm_groups=8, fuser_position_embedding="none")
    return world_models.unet_config(size, sample_size, cross_attention_dim=32)


def vae_config_dict(sample_size: int = DEMO_RESOLUTION) -> dict:
    """diffusers ``AutoencoderKL`` config.json of the demo VAE (4x downsampling)."""
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def _text_config(vocab_size: int, bos: int, eos: int, layers: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "projection_dim": 32,
    }


def text_encoder_config_dict(vocab_size: int, bos: int, eos: int) -> dict:
    """transformers ``CLIPTextModel`` config.json of the demo SD text encoder (width 32)."""
    return dict(_text_config(vocab_size, bos, eos, 2), model_type="clip_text_model",
                architectures=["CLIPTextModel"])


def clip_config_dict(vocab_size: int, bos: int, eos: int) -> dict:
    """transformers ``CLIPModel`` config.json of the demo DSAlign CLIP (32x32 images)."""
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": dict(_text_config(vocab_size, bos, eos, 1), projection_dim=16),
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_channels": 3,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 16,
        },
    }


@dataclasses.dataclass(frozen=True)
class DemoModels:
    """Paths of the written demo models."""

    pipeline: str  # diffusers GLIGEN pipeline folder
    clip: str  # Hugging Face CLIPModel folder


def demo_vocabulary() -> tuple[str, ...]:
    """The words of the shapes dataset (each becomes one token of the demo tokenizer)."""
    from goal_jax.data.shapes import VOCABULARY

    return tuple(VOCABULARY)


def _init_params(module, seed: int) -> dict:
    """Random parameters without running the module: goal_jax.world.models.init_params."""
    return world_models.init_params(module, seed)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def write_demo_models(folder: str, seed: int = 0, words: Sequence[str] | None = None,
                      resolution: int = DEMO_RESOLUTION) -> DemoModels:
    """Writes (or reuses, when already written with the same settings) the demo models.

    Args:
      folder: output folder (created).
      seed: PRNG seed of the random initialisation (same seed -> identical files).
      words: tokenizer words (default: the shapes dataset's vocabulary).
      resolution: training image side in pixels (sets the VAE / U-Net ``sample_size``); must
        be a multiple of 8 (VAE 4x times the U-Net's 2x).

    Returns:
      DemoModels with the pipeline and CLIP folder paths.
    """
    from goal_jax import text as text_lib
    from goal_jax import weights
    from goal_jax.models import clip as clip_lib
    from goal_jax.models import unet as unet_lib
    from goal_jax.models import vae as vae_lib

    if resolution % 8:
        raise ValueError(f"demo resolution must be a multiple of 8, got {resolution}")
    words = tuple(demo_vocabulary() if words is None else words)
    paths = DemoModels(os.path.join(folder, "pipeline"), os.path.join(folder, "clip"))
    marker = os.path.join(folder, "demo_models.json")
    settings = {"seed": int(seed), "resolution": int(resolution), "words": list(words)}
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == settings:
                return paths

    tokenizer_dir = os.path.join(paths.pipeline, "tokenizer")
    text_lib.write_word_vocab(tokenizer_dir, words)
    tokenizer = text_lib.load_tokenizer(tokenizer_dir)
    vocab_size = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    keys = np.random.SeedSequence(seed).generate_state(4)
    components = [
        ("unet", unet_lib.UNet2DConditionConfig.from_dict(unet_config_dict(resolution // 4)),
         unet_lib.UNet2DConditionModel, "diffusion_pytorch_model", paths.pipeline),
        ("vae", vae_lib.AutoencoderKLConfig.from_dict(vae_config_dict(resolution)),
         vae_lib.AutoencoderKL, "diffusion_pytorch_model", paths.pipeline),
        ("text_encoder", clip_lib.CLIPTextConfig.from_dict(
            text_encoder_config_dict(vocab_size, bos, eos)),
         clip_lib.CLIPTextModel, "model", paths.pipeline),
        ("", clip_lib.CLIPConfig.from_dict(clip_config_dict(vocab_size, bos, eos)),
         clip_lib.CLIPModel, "model", paths.clip),
    ]
    for (sub, config, cls, stem, root), key in zip(components, keys):
        module = cls(config=config)
        params = _init_params(module, int(key) % (2**31))
        weights.write_safetensors(os.path.join(root, sub) if sub else root,
                                  weights.to_state_dict(params), config.to_dict(), stem)
    os.makedirs(os.path.join(paths.pipeline, "scheduler"), exist_ok=True)
    _write_json(os.path.join(paths.pipeline, "scheduler", "scheduler_config.json"),
                SCHEDULER_CONFIG)
    _write_json(os.path.join(paths.pipeline, "model_index.json"), MODEL_INDEX)
    _write_json(marker, settings)
    return paths
