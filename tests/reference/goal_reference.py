"""Plain PyTorch reference of the GOAL objective (DESIGN.md eq. 1-15) and one training step.

Built only on the original libraries: diffusers ``UNet2DConditionModel(attention_type="gated")``,
``AutoencoderKL`` and ``DDPMScheduler``; transformers ``CLIPTextModel`` (SD's text encoder) and
``CLIPModel`` (the DSAlign CLIP). It is the parity oracle of ``goal_jax.objectives`` /
``goal_jax.train`` and the speed baseline of the benchmarks, so every convention below is the
same as in the JAX code:

* tensors: images NCHW in [-1, 1]; boxes ``[B, N, 4]`` xyxy in [0, 1]; ``masks [B, N]`` (1 = real
  box, 0 = padded slot); ``phrase_token_masks [B, N, 77]`` (1 where a caption token belongs to
  phrase i).
* z0 = (posterior.mean + exp(logvar / 2) * posterior_noise) * scaling_factor.
* a cell / pixel is inside box (x0, y0, x1, y1) when its centre ((c + .5) / w, (r + .5) / h)
  satisfies x0 <= cx < x1 and y0 <= cy < y1.
* L_LDM: mean squared error over all elements (eq. 2).
* D_sp(a, b) = arcsin(||a - b|| / 2)^2 on L2-normalised embeddings (eq. 7).
* D_local, L_MAA-in, L_MAA-out: mean over all valid boxes of the whole batch (sum / max(count, 1));
  D_global: mean over batch items.
* MAAlign maps: softmax probabilities of the selected ``attn2`` layers, averaged over heads and
  layers; for box i the map is the mean over its phrase's caption tokens. A box is valid for
  MAAlign when ``masks > 0`` and its phrase has at least one caption token; for DSAlign when
  ``masks > 0``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TRAINABLE = (r"(^|\.)fuser\.", r"(^|\.)attn1\.", r"(^|\.)attn2\.")


@dataclasses.dataclass
class RefConfig:
    alpha: float = 1e-2
    beta: float = 1e-3
    dsa_local: bool = True
    dsa_global: bool = True
    region_mode: str = "mask"  # "mask" (x0 * M_i, the paper) or "crop" (crop-and-resize the box)
    attention_layers: Sequence[str] = ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                                       "up_blocks.1.attentions.2")
    clip_mean: Sequence[float] = CLIP_MEAN
    clip_std: Sequence[float] = CLIP_STD
    gligen_scale: float = 1.0


@dataclasses.dataclass
class RefModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    clip: torch.nn.Module  # transformers CLIPModel
    scheduler: object  # diffusers DDPMScheduler


# --------------------------------------------------------------------------------------------
# Cross-attention probabilities.
# --------------------------------------------------------------------------------------------


class ProbsAttnProcessor(AttnProcessor):
    """diffusers' classic AttnProcessor that also stores softmax(QK^T/sqrt(d)) (eq. 11) as
    ``store[name] = [B, heads, h*w, T]``."""

    def __init__(self, store: dict, name: str):
        super().__init__()
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        batch_size = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.store[self.name] = probs.view(batch_size, attn.heads, *probs.shape[1:])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def capture_cross_attention(unet, layer_prefixes: Sequence[str]) -> dict:
    """Installs processors on ``unet``: the ``attn2`` of every layer under one of
    ``layer_prefixes`` (dotted torch names) records its probabilities into the returned dict;
    all other layers use the plain AttnProcessor (same math)."""
    store: dict = {}
    processors = {}
    for name in unet.attn_processors:
        module = name[: -len(".processor")]
        if module.endswith("attn2") and any(module.startswith(p + ".") for p in layer_prefixes):
            processors[name] = ProbsAttnProcessor(store, module)
        else:
            processors[name] = AttnProcessor()
    n = sum(isinstance(p, ProbsAttnProcessor) for p in processors.values())
    if n == 0:
        raise ValueError(f"no attn2 layer under {list(layer_prefixes)}")
    unet.set_attn_processor(processors)
    return store


# --------------------------------------------------------------------------------------------
# Pure loss math.
# --------------------------------------------------------------------------------------------


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N, 4] xyxy in [0,1] -> [B, N, height, width] float (cell centre inside box)."""
    cy = (torch.arange(height, dtype=boxes.dtype) + 0.5) / height
    cx = (torch.arange(width, dtype=boxes.dtype) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    inside_x = (cx >= x0) & (cx < x1)  # [B, N, W]
    inside_y = (cy >= y0) & (cy < y1)  # [B, N, H]
    return (inside_y[..., :, None] & inside_x[..., None, :]).to(boxes.dtype)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 7: arcsin(||a - b|| / 2)^2 over the last axis."""
    return torch.arcsin((a - b).norm(dim=-1).clamp(max=2.0) / 2) ** 2


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def clip_pixels(images: torch.Tensor, cfg: RefConfig, size: int) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] -> CLIP-normalised pixels at size x size (bilinear, antialias)."""
    x = (images + 1) / 2
    if x.shape[-2:] != (size, size):
        lead = x.shape[:-3]
        x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True).reshape(*lead, 3, size, size)
    mean = torch.tensor(cfg.clip_mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(cfg.clip_std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W], [B, N, 4] -> [B, N, 3, size, size]: bilinear samples of each box at the
    centres of a size x size grid (grid_sample, align_corners=False, border padding)."""
    b, n = boxes.shape[:2]
    u = (torch.arange(size, dtype=images.dtype) + 0.5) / size
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    gx = (x0 + u * (x1 - x0)) * 2 - 1  # [B, N, S]
    gy = (y0 + u * (y1 - y0)) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)
    src = images[:, None].expand(b, n, *images.shape[1:]).reshape(b * n, *images.shape[1:])
    out = F.grid_sample(src, grid.reshape(b * n, size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.reshape(b, n, 3, size, size)


def maalign_from_maps(maps, masks, valid):
    """Eq. 12-14. maps, masks [B, N, h, w]; valid [B, N] -> (in, out)."""
    a_in = (maps * masks).flatten(2).amax(-1)
    a_out = (maps * (1 - masks)).flatten(2).amax(-1)
    return masked_mean(1 - a_in, valid), masked_mean(a_out, valid)


# --------------------------------------------------------------------------------------------
# The objective.
# --------------------------------------------------------------------------------------------


def _normalize(x):
    return F.normalize(x, dim=-1)


def encode_text(models: RefModels, input_ids, phrase_input_ids):
    """SD text encoder: caption context [B,77,D] and pooled phrase features [B,N,D];
    DSAlign CLIP: projected caption [B,P] and phrase [B,N,P] embeddings (not normalised)."""
    b, n, length = phrase_input_ids.shape
    flat = phrase_input_ids.reshape(b * n, length)
    with torch.no_grad():
        context = models.text_encoder(input_ids=input_ids).last_hidden_state
        phrase_pooled = models.text_encoder(input_ids=flat).pooler_output.reshape(b, n, -1)
        clip = models.clip
        cap = clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output)
        phr = clip.text_projection(clip.text_model(input_ids=flat).pooler_output)
    return context, phrase_pooled, cap, phr.reshape(b, n, -1)


def clip_image_embeds(models: RefModels, pixels):
    clip = models.clip
    return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)


def goal_losses(models: RefModels, batch: dict, t, noise, posterior_noise, cfg: RefConfig,
                store: dict | None = None, caption_keep=None, grounding_keep=None,
                null_input_ids=None):
    """All loss terms for one batch with given t [B] (int64), noise and posterior noise
    (NCHW like the latents). ``batch`` holds NHWC/row-major torch tensors with the keys of the
    data pipeline ("images" [B,H,W,3] ...). ``store`` is the dict from capture_cross_attention.
    caption_keep / grounding_keep: optional [B] 0/1 floats (dropout draws): a dropped caption
    becomes ``null_input_ids`` [77], its phrase-token masks and D_global weight are zeroed; a
    dropped grounding gives the U-Net all-zero box masks and removes the item's boxes from
    D_local and MAAlign.
    Returns a dict of scalar tensors: ldm, dsa_local, dsa_global, dsa, maa_in, maa_out, maa,
    total."""
    unet, vae, sched = models.unet, models.vae, models.scheduler
    images = batch["images"].permute(0, 3, 1, 2)
    boxes, box_mask = batch["boxes"], batch["masks"]
    token_masks = batch["phrase_token_masks"]
    input_ids = batch["input_ids"]
    item_weight = torch.ones(boxes.shape[0])
    if caption_keep is not None:
        keep = caption_keep.bool()[:, None]
        input_ids = torch.where(keep, input_ids, null_input_ids[None, :].to(input_ids.dtype))
        token_masks = token_masks * caption_keep[:, None, None]
        item_weight = caption_keep.float()
    context, phrase_pooled, cap_emb, phr_emb = encode_text(models, input_ids,
                                                            batch["phrase_input_ids"])
    sf = vae.config.scaling_factor
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        z0 = (dist.mean + dist.std * posterior_noise) * sf
    acp = sched.alphas_cumprod.to(z0.dtype)[t].view(-1, 1, 1, 1)
    z_t = acp.sqrt() * z0 + (1 - acp).sqrt() * noise  # eq. 1
    g_mask = box_mask if grounding_keep is None else box_mask * grounding_keep[:, None]
    gligen = {"boxes": boxes, "positive_embeddings": phrase_pooled, "masks": g_mask}
    if store is not None:
        store.clear()
    eps = unet(z_t, t, encoder_hidden_states=context,
               cross_attention_kwargs={"gligen": gligen}).sample
    ldm = F.mse_loss(eps, noise)  # eq. 2
    zero = eps.sum() * 0
    out = {"ldm": ldm}

    # DSAlign (eq. 4-10).
    dsa_valid = box_mask if grounding_keep is None else box_mask * grounding_keep[:, None]
    dsa_local = dsa_global = zero
    if cfg.alpha != 0 and (cfg.dsa_local or cfg.dsa_global):
        z0_hat = (z_t - (1 - acp).sqrt() * eps) / acp.sqrt()  # eq. 4
        x0_hat = vae.decode(z0_hat / sf).sample  # [B,3,H,W]
        size = models.clip.config.vision_config.image_size
        if cfg.dsa_global:
            img = _normalize(clip_image_embeds(models, clip_pixels(x0_hat, cfg, size)))
            d = spherical_distance(_normalize(cap_emb), img)
            dsa_global = masked_mean(d, item_weight)  # eq. 9
        if cfg.dsa_local:
            b, n = boxes.shape[:2]
            if cfg.region_mode == "mask":
                m = box_masks(boxes, *x0_hat.shape[-2:])  # [B,N,H,W]
                regions = x0_hat[:, None] * m[:, :, None]
            else:
                regions = crop_and_resize(x0_hat, boxes, size)
            pix = clip_pixels(regions, cfg, size).reshape(b * n, 3, size, size)
            reg = _normalize(clip_image_embeds(models, pix)).reshape(b, n, -1)
            d = spherical_distance(_normalize(phr_emb), reg)
            dsa_local = masked_mean(d, dsa_valid)  # eq. 8
    out["dsa_local"], out["dsa_global"] = dsa_local, dsa_global
    out["dsa"] = dsa_local + dsa_global  # eq. 10

    # MAAlign (eq. 11-14).
    maa_in = maa_out = zero
    if cfg.beta != 0:
        if store is None or not store:
            raise ValueError("MAAlign needs the store of capture_cross_attention")
        probs = torch.stack([p.mean(1) for p in store.values()]).mean(0)  # [B, hw, T]
        hw = probs.shape[1]
        lh, lw = z0.shape[-2:]
        f = int(round((lh * lw / hw) ** 0.5))
        h, w = lh // f, lw // f
        count = token_masks.sum(-1)
        maps = torch.einsum("bqt,bnt->bnq", probs, token_masks) / count.clamp(min=1)[..., None]
        valid = dsa_valid * (count > 0).to(probs.dtype)
        maa_in, maa_out = maalign_from_maps(maps.reshape(*maps.shape[:2], h, w),
                                            box_masks(boxes, h, w), valid)
    out["maa_in"], out["maa_out"] = maa_in, maa_out
    out["maa"] = maa_in + maa_out  # eq. 14
    out["total"] = ldm + cfg.alpha * out["dsa"] + cfg.beta * out["maa"]  # eq. 15
    return out


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def trainable_parameters(unet, patterns: Sequence[str] = DEFAULT_TRAINABLE):
    """(name, parameter) of the U-Net parameters matching one of ``patterns`` (re.search on
    the dotted torch name); every other parameter of every model gets requires_grad=False."""
    regs = [re.compile(p) for p in patterns]
    chosen = []
    for name, p in unet.named_parameters():
        keep = any(r.search(name) for r in regs)
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    return chosen


def freeze(*modules):
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def make_optimizer(params, lr=5e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def train_step(models: RefModels, optimizer, batch, cfg: RefConfig, generator: torch.Generator,
               store: dict | None = None, grad_clip_norm: float = 0.0):
    """One optimisation step: samples t, eps and the posterior noise, backprop of the total,
    optional gradient clipping, AdamW update. Returns the float metrics (+ grad_norm)."""
    b = batch["images"].shape[0]
    h, w = batch["images"].shape[1:3]
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    c = models.vae.config.latent_channels
    t = torch.randint(0, models.scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(b, c, h // f, w // f, generator=generator)
    post = torch.randn(b, c, h // f, w // f, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out = goal_losses(models, batch, t, noise, post, cfg, store=store)
    out["total"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    optimizer.step()
    metrics = {k: float(v.detach()) for k, v in out.items()}
    metrics["grad_norm"] = float(gnorm)
    return metrics
