"""Model sizes, random models and inputs shared by the benchmark entry points.

Three sizes, each a complete GOAL setting (GLIGEN U-Net, VAE, SD text encoder, DSAlign CLIP):

* ``tiny``: the test-suite configs (tests/reference/tiny.py): 16x16 images, 8x8 latents, widths
  8-32, one layer per block. Measures mostly Python/dispatch overhead.
* ``small``: SD-1.4's structure (4 U-Net levels with 2 layers per block, 8 heads, cross-attention
  in down 0-2 / mid / up 1-3; 4-level VAE with 2 layers per block; 30 grounding slots) with
  reduced widths: U-Net (64, 128, 256, 256), VAE (32, 64, 128, 128), text encoder and CLIP of
  width 256 with 4 layers, CLIP vision 112x112 with 14x14 patches; 128x128 images (16x16
  latents). MAAlign uses ``up_blocks_1`` like the paper (here its grid is 4x4).
* ``sd14``: the real configuration: SD-1.4 GLIGEN U-Net (tests/fixtures/), SD-1.4 VAE and text
  encoder, CLIP ViT-L/14 (benchmarks/configs/), 512x512 images, MAAlign on the 16x16 decoder.

Token ids come from a word-level CLIP BPE tokenizer (``goal_jax.text.write_word_vocab``), so no
tokenizer download is needed; for ``sd14`` the embedding tables keep the real 49,408 rows.

This module imports only numpy, json and goal_jax's numpy-level helpers at import time; torch /
diffusers / transformers are imported inside the torch builders only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "benchmarks", "configs")
SD14_UNET_CONFIG = os.path.join(ROOT, "tests", "fixtures", "sd14_gligen_unet_config.json")

WORDS = ("a an the of and to left right above below next on in with red green blue yellow "
         "purple orange white black circle square triangle star striped dotted solid photo cat "
         "dog car tree two three four small large wooden glass bowl apple table").split()

CAPTIONS = (
    "a photo of a red cat left of a blue dog",
    "two green trees and a yellow star above a car",
    "a striped square on a wooden table next to a glass bowl",
    "a small white circle below a large black triangle",
)
PHRASES = (
    ("red cat", "blue dog"),
    ("green trees", "yellow star", "car"),
    ("striped square", "wooden table", "glass bowl"),
    ("small white circle", "large black triangle"),
)
BOXES = (
    ((0.05, 0.1, 0.5, 0.9), (0.55, 0.2, 0.95, 0.7)),
    ((0.1, 0.2, 0.55, 0.95), (0.6, 0.05, 0.9, 0.45), (0.6, 0.5, 0.95, 0.95)),
    ((0.1, 0.1, 0.4, 0.4), (0.0, 0.5, 1.0, 1.0), (0.55, 0.1, 0.9, 0.5)),
    ((0.3, 0.55, 0.7, 0.95), (0.2, 0.05, 0.8, 0.5)),
)

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
    "attention_type": "gated", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_eps": 1e-5, "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
}
_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


@dataclasses.dataclass(frozen=True)
class Size:
    """One benchmark size. Config dicts are diffusers / transformers config.json dicts; the text
    configs get the tokenizer's vocabulary size and special ids at build time (``text`` holds the
    other fields)."""

    name: str
    image: int  # pixels per side
    max_boxes: int  # grounding slots N
    maa_resolution: int  # side of the MAAlign attention grid (decoder, "up" part)
    unet: dict
    vae: dict
    text: dict  # SD text encoder (CLIPTextModel) fields except vocabulary / special ids
    clip_text: dict  # DSAlign CLIP text tower fields (same exclusions)
    clip_vision: dict
    projection_dim: int

    @property
    def latent(self) -> int:
        return self.image // 2 ** (len(self.vae["block_out_channels"]) - 1)


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sizes() -> dict[str, Size]:
    tiny = Size(
        name="tiny", image=16, max_boxes=4, maa_resolution=8,
        unet=dict(_UNET_COMMON, sample_size=8, block_out_channels=[16, 32],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        vae=dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3,
                 block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                 sample_size=16, layers_per_block=1, scaling_factor=0.5),
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=77),
        clip_text=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77),
        clip_vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)
    small = Size(
        name="small", image=128, max_boxes=30, maa_resolution=4,
        unet=dict(_UNET_COMMON, sample_size=16, block_out_channels=[64, 128, 256, 256],
                  down_block_types=_SD_DOWN, up_block_types=_SD_UP, layers_per_block=2,
                  cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
        vae=dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3,
                 block_out_channels=[32, 64, 128, 128],
                 down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=32,
                 sample_size=128, layers_per_block=2, scaling_factor=0.18215),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77),
        clip_text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, max_position_embeddings=77),
        clip_vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, image_size=112, patch_size=14),
        projection_dim=256)
    unet = _read(SD14_UNET_CONFIG)
    clip = _read(os.path.join(CONFIG_DIR, "clip_vit_large_patch14_config.json"))
    text = _read(os.path.join(CONFIG_DIR, "sd14_text_encoder_config.json"))
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
            "pad_token_id")
    vision_keep = ("hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "image_size", "patch_size")
    sd14 = Size(
        name="sd14", image=512, max_boxes=30, maa_resolution=16, unet=unet,
        vae=_read(os.path.join(CONFIG_DIR, "sd14_vae_config.json")),
        text={k: text[k] for k in keep},
        clip_text={k: clip["text_config"][k] for k in keep},
        clip_vision={k: clip["vision_config"][k] for k in vision_keep},
        projection_dim=clip["projection_dim"])
    return {"tiny": tiny, "small": small, "sd14": sd14}


SIZES = _sizes()


# ----------------------------------------------------------------------------------------------
# Tokenizer and config dicts.
# ----------------------------------------------------------------------------------------------


def write_tokenizer(folder: str) -> str:
    """Word-level CLIP tokenizer over WORDS in ``folder`` (created); returns the folder."""
    from goal_jax import text

    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        text.write_word_vocab(folder, WORDS)
    return folder


def _vocab(tokenizer_dir: str) -> dict:
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        return json.load(f)


def text_config(size: Size, tokenizer_dir: str, fields: dict | None = None) -> dict:
    """CLIPTextModel config.json dict; ``vocab_size`` / special ids from the tokenizer unless
    the size fixes them (sd14 keeps 49,408 rows)."""
    vocab = _vocab(tokenizer_dir)
    d = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, vocab_size=len(vocab),
             bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
             pad_token_id=vocab["<|endoftext|>"])
    d.update(size.text if fields is None else fields)
    if d["vocab_size"] < len(vocab):
        raise ValueError(f"size {size.name}: vocab_size {d['vocab_size']} < tokenizer "
                         f"vocabulary {len(vocab)}")
    return d


def clip_config(size: Size, tokenizer_dir: str) -> dict:
    """CLIPModel config.json dict (text, vision, projection)."""
    return dict(model_type="clip", projection_dim=size.projection_dim,
                logit_scale_init_value=2.6592,
                text_config=dict(text_config(size, tokenizer_dir, size.clip_text),
                                 projection_dim=size.projection_dim),
                vision_config=dict(size.clip_vision, hidden_act="quick_gelu",
                                   layer_norm_eps=1e-5, num_channels=3,
                                   projection_dim=size.projection_dim))


def scheduler_config() -> dict:
    """SD-1.x DDIM scheduler config (also read by the DDPM training schedule)."""
    return _read(os.path.join(CONFIG_DIR, "sd14_scheduler_config.json"))


def maa_layers_flax(size: Size) -> tuple[str, ...]:
    """The MAAlign cross-attention modules: decoder ("up") layers at ``size.maa_resolution``."""
    from goal_jax.models import unet as unet_lib

    config = unet_lib.UNet2DConditionConfig.from_dict(size.unet, source=f"{size.name} unet")
    return tuple(unet_lib.cross_attention_layers(config, "up", size.maa_resolution))


def maa_layers_torch(size: Size) -> tuple[str, ...]:
    from goal_jax import weights

    # torch_name converts module components and maps the leaf: give it a dummy leaf.
    return tuple(weights.torch_name(p.split("/") + ["bias"])[:-len(".bias")]
                 for p in maa_layers_flax(size))


# ----------------------------------------------------------------------------------------------
# Inputs (numpy; identical for both frameworks).
# ----------------------------------------------------------------------------------------------


def train_batch(size: Size, tokenizer, batch: int, seed: int = 0) -> dict:
    """A training batch with the data pipeline's keys (numpy): images [B,H,W,3] in [-1,1],
    input_ids [B,77], phrase_input_ids [B,N,77], boxes [B,N,4], masks [B,N],
    phrase_token_masks [B,N,77]; captions / layouts cycle through CAPTIONS."""
    from goal_jax import text

    n = size.max_boxes
    rng = np.random.default_rng(seed)
    idx = [i % len(CAPTIONS) for i in range(batch)]
    out = {
        "images": rng.uniform(-1, 1, (batch, size.image, size.image, 3)).astype(np.float32),
        "input_ids": text.tokenize(tokenizer, [CAPTIONS[i] for i in idx]),
        "phrase_input_ids": np.zeros((batch, n, 77), np.int32),
        "boxes": np.zeros((batch, n, 4), np.float32),
        "masks": np.zeros((batch, n), np.float32),
        "phrase_token_masks": np.zeros((batch, n, 77), np.float32),
    }
    empty = text.tokenize(tokenizer, [""])[0]
    for row, i in enumerate(idx):
        phr = PHRASES[i][:n]
        out["phrase_input_ids"][row, :] = empty
        out["phrase_input_ids"][row, :len(phr)] = text.tokenize(tokenizer, list(phr))
        out["boxes"][row, :len(phr)] = np.asarray(BOXES[i][:n], np.float32)
        out["masks"][row, :len(phr)] = 1.0
        spans = text.phrase_token_spans(tokenizer, CAPTIONS[i], list(phr))
        out["phrase_token_masks"][row] = text.phrase_token_mask(spans, n)
    return out


def unet_inputs(size: Size, batch: int, seed: int = 0) -> dict:
    """U-Net forward inputs (numpy, NHWC latents): latents [B,h,w,4], t [B] int32,
    context [B,77,D], boxes [B,N,4], phrase_embeds [B,N,D], masks [B,N]."""
    rng = np.random.default_rng(seed)
    d = size.unet["cross_attention_dim"]
    n = size.max_boxes
    boxes = np.zeros((batch, n, 4), np.float32)
    masks = np.zeros((batch, n), np.float32)
    for row in range(batch):
        b = BOXES[row % len(BOXES)][:n]
        boxes[row, :len(b)] = b
        masks[row, :len(b)] = 1.0
    return {
        "latents": rng.standard_normal((batch, size.latent, size.latent, 4)).astype(np.float32),
        "t": rng.integers(0, 1000, (batch,)).astype(np.int32),
        "context": rng.standard_normal((batch, 77, d)).astype(np.float32),
        "boxes": boxes,
        "phrase_embeds": (rng.standard_normal((batch, n, d)) * masks[..., None]).astype(
            np.float32),
        "masks": masks,
    }


def sample_inputs(size: Size, batch: int, seed: int = 0):
    """(captions, layouts, noise [B,h,w,4] float32) for the samplers."""
    from goal_jax.layout import Layout

    idx = [i % len(CAPTIONS) for i in range(batch)]
    layouts = [Layout(list(PHRASES[i]), [list(b) for b in BOXES[i]]) for i in idx]
    noise = np.random.default_rng(seed).standard_normal(
        (batch, size.latent, size.latent, 4)).astype(np.float32)
    return [CAPTIONS[i] for i in idx], layouts, noise


# ----------------------------------------------------------------------------------------------
# PyTorch models (diffusers / transformers), random init.
# ----------------------------------------------------------------------------------------------


def torch_models(size: Size, tokenizer_dir: str, seed: int = 0, device: str = "cpu") -> dict:
    """Random-init torch models of ``size``: {"unet", "vae", "text_encoder", "clip",
    "tokenizer", "scheduler"} (float32, eval mode). The GLIGEN gates are opened (0.7 / -0.4)
    so the gated layers are not no-ops."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet_kwargs = {k: v for k, v in size.unet.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**unet_kwargs)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.endswith("alpha_attn"):
                    p.fill_(0.7)
                elif name.endswith("alpha_dense"):
                    p.fill_(-0.4)
        vae = AutoencoderKL(**{k: v for k, v in size.vae.items() if not k.startswith("_")})
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(size, tokenizer_dir)))
        clip = CLIPModel(CLIPConfig(**{k: v for k, v in clip_config(size, tokenizer_dir).items()
                                       if k != "model_type"}))
    for m in (unet, vae, text_encoder, clip):
        m.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "clip": clip,
            "tokenizer": CLIPTokenizer.from_pretrained(tokenizer_dir),
            "scheduler": DDIMScheduler.from_config(scheduler_config())}


def write_folder(size: Size, folder: str, seed: int = 0) -> dict:
    """Writes ``folder/pipeline`` (a diffusers StableDiffusionGLIGENPipeline: unet/ vae/
    text_encoder/ tokenizer/ scheduler/) and ``folder/clip`` (transformers CLIPModel) with the
    same random weights for both frameworks; returns {"pipeline", "clip", "tokenizer"} paths."""
    from diffusers import StableDiffusionGLIGENPipeline

    tok_dir = write_tokenizer(os.path.join(folder, "tokenizer_src"))
    m = torch_models(size, tok_dir, seed)
    pipe = StableDiffusionGLIGENPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], unet=m["unet"],
        scheduler=m["scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "pipeline"))
    m["clip"].save_pretrained(os.path.join(folder, "clip"))
    return {"pipeline": os.path.join(folder, "pipeline"), "clip": os.path.join(folder, "clip"),
            "tokenizer": os.path.join(folder, "pipeline", "tokenizer")}


# ----------------------------------------------------------------------------------------------
# JAX models (goal_jax), random init without any checkpoint (GPU script, memory analysis).
# ----------------------------------------------------------------------------------------------


def jax_modules(size: Size, tokenizer_dir: str, dtype: Any = None, remat: bool = False,
                attention_maps: tuple = ()) -> dict:
    """goal_jax modules of ``size`` (no parameters): {"unet", "vae", "text_encoder", "clip"}."""
    import jax.numpy as jnp

    from goal_jax.models import clip as clip_lib
    from goal_jax.models import unet as unet_lib
    from goal_jax.models import vae as vae_lib

    dtype = jnp.float32 if dtype is None else dtype
    unet_cfg = unet_lib.UNet2DConditionConfig.from_dict(size.unet, source=f"{size.name} unet")
    vae_cfg = vae_lib.AutoencoderKLConfig.from_dict(size.vae, source=f"{size.name} vae")
    text_cfg = clip_lib.CLIPTextConfig.from_dict(text_config(size, tokenizer_dir),
                                                 source=f"{size.name} text_encoder")
    clip_cfg = clip_lib.CLIPConfig.from_dict(clip_config(size, tokenizer_dir),
                                             source=f"{size.name} clip")
    return {
        "unet": unet_lib.UNet2DConditionModel(config=unet_cfg, dtype=dtype, remat=remat,
                                              attention_maps=tuple(attention_maps)),
        "vae": vae_lib.AutoencoderKL(config=vae_cfg, dtype=dtype, remat=remat),
        "text_encoder": clip_lib.CLIPTextModel(config=text_cfg, dtype=dtype, remat=remat),
        "clip": clip_lib.CLIPModel(config=clip_cfg, dtype=dtype, remat=remat),
    }


def with_attention(modules: dict, attention: str | None) -> dict:
    """``modules`` with their attention kernel set to ``attention`` ("auto" | "einsum" | ...)
    where a module has one; None leaves them as built."""
    if attention is None:
        return modules
    return {k: (m.clone(attention=attention) if hasattr(m, "attention") else m)
            for k, m in modules.items()}


def goal_models(size: Size, tokenizer_dir: str, cfg, attention: str | None = None):
    """The GOAL train step's models at ``size`` for train config ``cfg`` (its compute dtype and
    remat; ``cfg.maa_resolution`` is set to the size's). -> (goal_jax.train.GoalModels, the
    modules dict, the MAAlign layer names)."""
    import jax.numpy as jnp

    from goal_jax import schedule, text, train

    cfg.maa_resolution = size.maa_resolution
    layers = maa_layers_flax(size)
    modules = with_attention(jax_modules(size, tokenizer_dir, dtype=train.compute_dtype(cfg),
                                         remat=cfg.remat, attention_maps=layers), attention)
    tok = text.load_tokenizer(tokenizer_dir)
    models = train.GoalModels(modules["unet"], modules["vae"], modules["text_encoder"],
                              modules["clip"],
                              schedule.DDPMSchedule.from_config(scheduler_config()),
                              jnp.asarray(text.tokenize(tok, [""])[0], jnp.int32))
    return models, modules, layers


def train_batch_shapes(size: Size, batch: int, sharding: Any = None) -> dict:
    """ShapeDtypeStructs of a train batch of ``batch`` items at ``size`` (the fields and dtypes
    of :func:`train_batch`), each with ``sharding`` (None: unsharded)."""
    import jax
    import jax.numpy as jnp

    n, img = size.max_boxes, size.image
    f32, i32 = jnp.float32, jnp.int32
    shapes = {"images": ((batch, img, img, 3), f32), "input_ids": ((batch, 77), i32),
              "phrase_input_ids": ((batch, n, 77), i32), "boxes": ((batch, n, 4), f32),
              "masks": ((batch, n), f32), "phrase_token_masks": ((batch, n, 77), f32)}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def jax_init(modules: dict, seed: int = 0, abstract: bool = False) -> dict:
    """Random float32 params of each module (``module.init`` on its ``dummy_inputs``), jit-compiled
    so the initialisation runs on the accelerator; ``abstract=True`` gives ShapeDtypeStructs
    (``jax.eval_shape``) and allocates nothing."""
    import jax

    out = {}
    for k, (name, module) in enumerate(sorted(modules.items())):
        def init(rng, module=module):
            return module.init(rng, *module.dummy_inputs())["params"]

        rng = jax.random.PRNGKey(seed + k)
        out[name] = jax.eval_shape(init, rng) if abstract else jax.jit(init)(rng)
    return out
