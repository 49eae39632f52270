"""Tiny random PyTorch models (diffusers / transformers) for parity tests, saved in the
checkpoint layouts goal_jax loads.

16x16 images; VAE with 2 levels (8x8x4 latents, scaling_factor 0.5); a one-level GLIGEN U-Net
(8x8: CrossAttnDownBlock2D, the cross-attention mid block, CrossAttnUpBlock2D; one level keeps
the XLA compile time of the full train step low on CPU), so MAAlign's "decoder at full latent
resolution" layers are ``up_blocks.0.attentions.{0,1}``; SD text encoder and DSAlign CLIP of
width 32 (CLIP vision: 16x16 input, 8x8 patches)."""

from __future__ import annotations

import json
import os

import torch

IMAGE = 16
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    attention_type="gated")
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4, norm_num_groups=8, sample_size=IMAGE, layers_per_block=1,
    scaling_factor=0.5)
MAA_LAYERS_TORCH = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")
MAA_LAYERS_FLAX = ("up_blocks_0/attentions_0", "up_blocks_0/attentions_1")


def text_config(tokenizer_dir: str) -> dict:
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])


def build(folder: str, tokenizer_dir: str, seed: int = 0):
    """Creates the torch models (float32, eval mode), saves them under ``folder``
    (unet/ vae/ text_encoder/ clip/) and returns the reference RefModels."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from tests.reference import goal_reference as ref

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    with torch.no_grad():  # GLIGEN gates open (they are 0 at init)
        for name, p in unet.named_parameters():
            if name.endswith("alpha_attn"):
                p.fill_(0.7)
            elif name.endswith("alpha_dense"):
                p.fill_(-0.4)
    vae = AutoencoderKL(**VAE_CONFIG)
    tc = text_config(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tc))
    clip = CLIPModel(CLIPConfig(
        text_config=dict(tc, intermediate_size=40),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                           num_attention_heads=2, image_size=IMAGE, patch_size=8),
        projection_dim=16))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    for m in (unet, vae, text_encoder, clip):
        m.eval()
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    clip.save_pretrained(os.path.join(folder, "clip"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    return ref.RefModels(unet, vae, text_encoder, clip, scheduler)


CAPTIONS = ("a red circle left of a blue square", "two green trees and a yellow star")
PHRASES = (("red circle", "blue square", "purple dog"), ("green trees", "yellow star"))
BOXES = (((0.05, 0.1, 0.5, 0.6), (0.5, 0.3, 0.95, 0.9), (0.2, 0.6, 0.45, 0.95)),
         ((0.1, 0.2, 0.55, 0.95), (0.6, 0.05, 0.9, 0.45)))


def make_batch(tokenizer_dir: str, max_boxes: int = 4, seed: int = 0,
               captions=CAPTIONS, phrases=PHRASES, boxes=BOXES) -> dict:
    """A batch dict of numpy arrays with the data pipeline's keys; "purple dog" is a layout
    phrase absent from its caption (no caption tokens); slots past the phrases are padding."""
    import numpy as np

    from goal_jax import text

    tok = text.load_tokenizer(tokenizer_dir)
    b = len(captions)
    rng = np.random.default_rng(seed)
    out = {
        "images": rng.uniform(-1, 1, (b, IMAGE, IMAGE, 3)).astype(np.float32),
        "input_ids": text.tokenize(tok, list(captions)),
        "phrase_input_ids": np.zeros((b, max_boxes, 77), np.int32),
        "boxes": np.zeros((b, max_boxes, 4), np.float32),
        "masks": np.zeros((b, max_boxes), np.float32),
        "phrase_token_masks": np.zeros((b, max_boxes, 77), np.float32),
    }
    empty = text.tokenize(tok, [""])[0]
    for i, (cap, phr, bx) in enumerate(zip(captions, phrases, boxes)):
        out["phrase_input_ids"][i, :] = empty
        out["phrase_input_ids"][i, :len(phr)] = text.tokenize(tok, list(phr))
        out["boxes"][i, :len(bx)] = np.asarray(bx, np.float32)
        out["masks"][i, :len(phr)] = 1.0
        spans = text.phrase_token_spans(tok, cap, list(phr))
        out["phrase_token_masks"][i] = text.phrase_token_mask(spans, max_boxes)
    return out


def load_jax(folder: str, tokenizer_dir: str, attention_maps=MAA_LAYERS_FLAX, **unet_options):
    """(GoalModels, params) from the folders written by :func:`build`."""
    import jax.numpy as jnp

    from goal_jax import schedule, text, train, weights

    unet, unet_p = weights.load_unet(os.path.join(folder, "unet"),
                                     attention_maps=attention_maps, **unet_options)
    vae, vae_p = weights.load_vae(os.path.join(folder, "vae"))
    te, te_p = weights.load_clip_text(os.path.join(folder, "text_encoder"))
    clip, clip_p = weights.load_clip(os.path.join(folder, "clip"))
    sched = schedule.DDPMSchedule.from_config(
        weights.read_config(os.path.join(folder, "scheduler"), "scheduler_config.json"))
    null = text.tokenize(text.load_tokenizer(tokenizer_dir), [""])[0]
    models = train.GoalModels(unet, vae, te, clip, sched, jnp.asarray(null))
    params = {"unet": unet_p, "vae": vae_p, "text_encoder": te_p, "clip": clip_p}
    return models, params
