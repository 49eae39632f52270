"""The GOAL objective (DESIGN.md "The method", eq. 1-15) as pure functions.

No state and no I/O: every function takes arrays (and, for the parts that run networks, the Flax
modules with their params) and returns arrays. Layout is NHWC; boxes are ``[B, N, 4]`` xyxy
normalised to [0, 1]; ``N`` is the padded number of box slots.

Conventions shared with the PyTorch reference (tests/reference/goal_reference.py):

* **Box masks.** A cell (r, c) of an h x w grid is inside box (x0, y0, x1, y1) when its centre
  ((c + 0.5) / w, (r + 0.5) / h) satisfies ``x0 <= cx < x1`` and ``y0 <= cy < y1``
  (:func:`box_masks`). The same rule gives the pixel masks M_i of DSAlign and the 16x16 (or other)
  attention-grid masks of MAAlign.
* **Valid boxes.** ``box_mask [B, N]`` is 1 for a real box, 0 for a padded slot. DSAlign uses the
  real boxes; MAAlign additionally needs the phrase to have at least one caption token.
* **Means.** D_local, L_MAA-in and L_MAA-out are means over *all valid boxes of the batch*
  (``sum / max(count, 1)``), so every box weighs the same whatever item it is in, and a batch (or
  item) without valid boxes contributes exactly 0 with finite (zero) gradients. D_global is the
  mean over batch items (optionally weighted by ``item_valid``). L_LDM is the mean squared error
  over all elements.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(sq, eps * eps))
    return x / norm


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / max(sum(weights), 1): 0 (not NaN) when all weights are 0."""
    values = values.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Box masks on a ``height x width`` grid.

    Args:
      boxes: [..., 4] xyxy in [0, 1].
    Returns:
      [..., height, width] float32, 1 where the cell centre is inside the half-open box
      ``[x0, x1) x [y0, y1)``.
    """
    boxes = boxes.astype(jnp.float32)
    cy = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    cx = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    inside_x = (cx >= x0) & (cx < x1)  # [..., W]
    inside_y = (cy >= y0) & (cy < y1)  # [..., H]
    return (inside_y[..., :, None] & inside_x[..., None, :]).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Eq. 2: L_LDM.
# ----------------------------------------------------------------------------------------------


def ldm_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Eq. 2: ||target - eps_theta||^2, averaged over all elements (batch, h, w, channels).

    Args:
      prediction: U-Net output [B, h, w, C] (any float dtype; computed in float32).
      target: eps (or v for v-prediction) [B, h, w, C].
    Returns:
      scalar float32.
    """
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


# ----------------------------------------------------------------------------------------------
# Eq. 7-10: DSAlign math on embeddings.
# ----------------------------------------------------------------------------------------------


def spherical_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Eq. 7, exactly as written: D_sp(a, b) = arcsin(||a - b||_2 / 2)^2 over the last axis.

    ``a`` and ``b`` are expected L2-normalised (then ||a - b|| <= 2). The norm is computed
    safely: at a == b the value is 0 and the gradient 0 (not NaN).

    Args:
      a, b: [..., P].
    Returns:
      [...] float32, in [0, (pi/2)^2].
    """
    sq = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return jnp.square(jnp.arcsin(jnp.minimum(norm, 2.0) / 2.0))


def dsalign_from_embeddings(
    image_embeds: jax.Array | None,
    caption_embeds: jax.Array | None,
    region_embeds: jax.Array | None,
    phrase_embeds: jax.Array | None,
    box_valid: jax.Array | None,
    item_valid: jax.Array | None = None,
    *,
    local: bool = True,
    global_: bool = True,
) -> dict:
    """Eq. 8-10 from (unnormalised or normalised) CLIP embeddings; all are L2-normalised here.

    Args:
      image_embeds: [B, P] CLIP image embeddings of x̂0 (whole image). Needed when ``global_``.
      caption_embeds: [B, P] CLIP text embeddings of the captions. Needed when ``global_``.
      region_embeds: [B, N, P] CLIP image embeddings of the region images. Needed when ``local``.
      phrase_embeds: [B, N, P] CLIP text embeddings of the phrases. Needed when ``local``.
      box_valid: [B, N] 1 for boxes that count in D_local, 0 otherwise.
      item_valid: optional [B] weights of the items in D_global (default all 1).
      local, global_: the Table 6 switches; a term switched off is exactly 0.
    Returns:
      {"dsa_local": D_local (eq. 8), "dsa_global": D_global (eq. 9),
       "dsa": D_local + D_global (eq. 10)}, float32 scalars.
    """
    zero = jnp.zeros((), jnp.float32)
    d_local = d_global = zero
    if local:
        d = spherical_distance(l2_normalize(phrase_embeds), l2_normalize(region_embeds))
        d_local = masked_mean(d, box_valid)  # eq. 8: mean over valid boxes
    if global_:
        d = spherical_distance(l2_normalize(caption_embeds), l2_normalize(image_embeds))
        if item_valid is None:
            d_global = jnp.mean(d)  # eq. 9
        else:
            d_global = masked_mean(d, item_valid)
    return {"dsa_local": d_local, "dsa_global": d_global, "dsa": d_local + d_global}  # eq. 10


# ----------------------------------------------------------------------------------------------
# DSAlign images: region images and CLIP pixels.
# ----------------------------------------------------------------------------------------------


def masked_regions(images: jax.Array, boxes: jax.Array) -> jax.Array:
    """The paper's region images x̂0 · M_i (pixels outside box i set to 0, i.e. mid-grey in
    [-1, 1]).

    Args:
      images: [B, H, W, 3] in [-1, 1].
      boxes: [B, N, 4] xyxy in [0, 1].
    Returns:
      [B, N, H, W, 3].
    """
    h, w = images.shape[1:3]
    m = box_masks(boxes, h, w).astype(images.dtype)  # [B, N, H, W]
    return images[:, None] * m[..., None]


def crop_and_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Differentiable crop of each box resized to ``size x size`` (option to masking).

    Output pixel (r, c) is the bilinear sample of the image at the normalised point
    (x0 + (c + .5)/size · (x1 - x0), y0 + (r + .5)/size · (y1 - y0)), pixel centres at
    (k + .5)/W, edge-clamped (``torch.nn.functional.grid_sample(align_corners=False,
    padding_mode="border")``). No antialiasing: boxes much larger than ``size`` alias.

    Args:
      images: [B, H, W, C].
      boxes: [B, N, 4] xyxy in [0, 1].
    Returns:
      [B, N, size, size, C].
    """
    b, h, w, _ = images.shape
    u = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    boxes = boxes.astype(jnp.float32)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    px = (x0 + u * (x1 - x0)) * w - 0.5  # [B, N, S] in pixel-index units
    py = (y0 + u * (y1 - y0)) * h - 0.5

    def axis(p, n):
        p = jnp.clip(p, 0.0, n - 1.0)
        lo = jnp.floor(p)
        frac = p - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n - 1)
        return lo, hi, frac

    xl, xh, fx = axis(px, w)
    yl, yh, fy = axis(py, h)

    def gather(img, yi, xi):  # img [H, W, C]; yi, xi [N, S]
        return img[yi[:, :, None], xi[:, None, :]]  # [N, S, S, C]

    def one(img, yl, yh, fy, xl, xh, fx):
        fy = fy[:, :, None, None].astype(img.dtype)
        fx = fx[:, None, :, None].astype(img.dtype)
        top = gather(img, yl, xl) * (1 - fx) + gather(img, yl, xh) * fx
        bottom = gather(img, yh, xl) * (1 - fx) + gather(img, yh, xh) * fx
        return top * (1 - fy) + bottom * fy

    return jax.vmap(one)(images, yl, yh, fy, xl, xh, fx)


def clip_pixels(images: jax.Array, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
    """Images in [-1, 1] -> CLIP-normalised pixels, differentiable.

    (x + 1) / 2, bilinear antialiased resize to ``size x size`` when the size differs
    (``jax.image.resize``), then (x - mean) / std per channel.

    Args:
      images: [..., H, W, 3] in [-1, 1].
    Returns:
      [..., size, size, 3] float32.
    """
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[-3:-1] != (size, size):
        x = jax.image.resize(x, x.shape[:-3] + (size, size, x.shape[-1]), method="bilinear",
                             antialias=True)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def dsalign_loss(
    vae: Any,
    vae_params: Any,
    clip: Any,
    clip_params: Any,
    z0_hat: jax.Array,
    caption_embeds: jax.Array,
    phrase_embeds: jax.Array,
    boxes: jax.Array,
    box_valid: jax.Array,
    item_valid: jax.Array | None = None,
    *,
    scaling_factor: float,
    image_size: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    region_mode: str = "mask",
    local: bool = True,
    global_: bool = True,
) -> dict:
    """DSAlign (§3.2, eq. 4-10) from the one-step prediction ẑ0.

    x̂0 = D(ẑ0 / scaling_factor) with the (frozen) VAE decoder; the CLIP image tower embeds x̂0
    (global) and the region images (local: ``region_mode="mask"`` is x̂0 · M_i as in the paper,
    ``"crop"`` crops the box and resizes it to ``image_size``). Gradients flow through the VAE and
    CLIP into ẑ0.

    Args:
      vae, vae_params: goal_jax AutoencoderKL and its params.
      clip, clip_params: goal_jax CLIPModel (``encode_image`` -> ``.embeds``) and its params.
      z0_hat: [B, h, w, C] predicted scaled latents (eq. 4).
      caption_embeds: [B, P] CLIP text embeddings of the captions.
      phrase_embeds: [B, N, P] CLIP text embeddings of the phrases.
      boxes: [B, N, 4] xyxy in [0, 1]; box_valid: [B, N]; item_valid: optional [B].
      scaling_factor: the VAE latent scale; image_size: the CLIP vision input size (pixels).
    Returns:
      the dict of :func:`dsalign_from_embeddings`.
    """
    if region_mode not in ("mask", "crop"):
        raise ValueError(f"region_mode must be 'mask' or 'crop', got {region_mode!r}")
    zero = jnp.zeros((), jnp.float32)
    if not (local or global_):
        return {"dsa_local": zero, "dsa_global": zero, "dsa": zero}
    x0_hat = vae.apply({"params": vae_params}, z0_hat / scaling_factor, method="decode")

    def embed(pixels):  # [M, S, S, 3] -> [M, P]
        return clip.apply({"params": clip_params}, pixels, method="encode_image").embeds

    image_embeds = region_embeds = None
    if global_:
        image_embeds = embed(clip_pixels(x0_hat, image_size, mean, std))
    if local:
        b, n = boxes.shape[:2]
        if region_mode == "mask":
            regions = masked_regions(x0_hat, boxes)
        else:
            regions = crop_and_resize(x0_hat, boxes, image_size)
        pixels = clip_pixels(regions, image_size, mean, std)
        region_embeds = embed(pixels.reshape((b * n,) + pixels.shape[2:])).reshape(b, n, -1)
    return dsalign_from_embeddings(image_embeds, caption_embeds, region_embeds, phrase_embeds,
                                   box_valid, item_valid, local=local, global_=global_)


# ----------------------------------------------------------------------------------------------
# Eq. 11-14: MAAlign.
# ----------------------------------------------------------------------------------------------


def collect_attention_probs(intermediates: Mapping) -> list[jax.Array]:
    """The sowed cross-attention probabilities, in sorted path order.

    Args:
      intermediates: ``state["intermediates"]`` of the U-Net apply; every leaf path ending in
        ``attention_probs`` holds a tuple of arrays [B, heads, h*w, T] (eq. 11).
    Returns:
      list of [B, heads, h*w, T] arrays.
    Raises:
      ValueError: when there is none (the U-Net was built without ``attention_maps``).
    """
    flat = traverse_util.flatten_dict(dict(intermediates), keep_empty_nodes=False)
    probs = []
    for path in sorted(flat):
        if any(str(p) == "attention_probs" for p in path):
            value = flat[path]
            probs.extend(value if isinstance(value, (tuple, list)) else (value,))
    if not probs:
        raise ValueError(
            "MAAlign found no 'attention_probs' in the U-Net intermediates: build the U-Net with "
            "attention_maps=<layer prefixes> and apply it with mutable=['intermediates']"
        )
    return probs


def mean_attention_map(probs: list[jax.Array]) -> jax.Array:
    """Average of the selected layers' probabilities over heads and layers.

    Args:
      probs: list of [B, heads, h*w, T], all with the same h*w.
    Returns:
      [B, h*w, T] float32.
    """
    cells = {p.shape[2] for p in probs}
    if len(cells) != 1:
        raise ValueError(
            f"MAAlign layers must share one resolution, got h*w in {sorted(cells)}; select "
            "layers of a single resolution (e.g. the decoder 16x16 ones)"
        )
    return jnp.mean(jnp.stack([jnp.mean(p.astype(jnp.float32), axis=1) for p in probs]), axis=0)


def grid_shape(cells: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention grid with ``cells`` = h*w positions for latents of ``latent_hw``
    (the grid is the latent downsampled by a power of two)."""
    lh, lw = latent_hw
    f = 1
    while (lh // f) * (lw // f) > cells and f <= max(lh, lw):
        f *= 2
    if (lh // f) * (lw // f) != cells or lh % f or lw % f:
        raise ValueError(f"cannot place {cells} attention cells on latents of size {lh}x{lw}")
    return lh // f, lw // f


def phrase_attention_maps(attention: jax.Array, token_masks: jax.Array) -> jax.Array:
    """A for each box: the mean of the maps of its phrase's caption tokens.

    Args:
      attention: [B, h*w, T] head/layer-averaged probabilities.
      token_masks: [B, N, T] 1 where caption token t belongs to phrase i.
    Returns:
      [B, N, h*w]; an all-zero map for a phrase without caption tokens.
    """
    token_masks = token_masks.astype(jnp.float32)
    count = jnp.sum(token_masks, axis=-1)
    summed = jnp.einsum("bqt,bnt->bnq", attention.astype(jnp.float32), token_masks)
    return summed / jnp.maximum(count, 1.0)[..., None]


def maalign_from_maps(maps: jax.Array, masks: jax.Array, valid: jax.Array) -> dict:
    """Eq. 12-14 on per-box attention maps.

    Args:
      maps: [B, N, h, w] attention map A of box i.
      masks: [B, N, h, w] box masks M_i on the same grid.
      valid: [B, N] 1 for boxes that count.
    Returns:
      {"maa_in": mean_i (1 - max(A·M_i)) (eq. 12), "maa_out": mean_i max(A·(1 - M_i)) (eq. 13),
       "maa": their sum (eq. 14)}; means over the valid boxes of the batch.
    """
    b, n = maps.shape[:2]
    maps = maps.astype(jnp.float32).reshape(b, n, -1)
    masks = masks.astype(jnp.float32).reshape(b, n, -1)
    a_in = jnp.max(maps * masks, axis=-1)
    a_out = jnp.max(maps * (1.0 - masks), axis=-1)
    maa_in = masked_mean(1.0 - a_in, valid)  # eq. 12
    maa_out = masked_mean(a_out, valid)  # eq. 13
    return {"maa_in": maa_in, "maa_out": maa_out, "maa": maa_in + maa_out}  # eq. 14


def maalign_loss(
    intermediates: Mapping,
    boxes: jax.Array,
    token_masks: jax.Array,
    box_valid: jax.Array,
    latent_hw: tuple[int, int],
) -> dict:
    """MAAlign (§3.3) from the U-Net's sowed cross-attention probabilities.

    Args:
      intermediates: ``state["intermediates"]`` (see :func:`collect_attention_probs`).
      boxes: [B, N, 4] xyxy in [0, 1].
      token_masks: [B, N, T] caption tokens of each phrase (``phrase_token_masks``).
      box_valid: [B, N] real boxes (1) vs padded slots (0).
      latent_hw: (h, w) of the U-Net input latents, to place the h*w cells on a grid.
    Returns:
      the dict of :func:`maalign_from_maps`. A box counts when it is real and its phrase has at
      least one caption token.
    """
    attention = mean_attention_map(collect_attention_probs(intermediates))
    h, w = grid_shape(attention.shape[1], latent_hw)
    maps = phrase_attention_maps(attention, token_masks).reshape(boxes.shape[:2] + (h, w))
    has_tokens = (jnp.sum(token_masks.astype(jnp.float32), axis=-1) > 0).astype(jnp.float32)
    valid = box_valid.astype(jnp.float32) * has_tokens
    return maalign_from_maps(maps, box_masks(boxes, h, w), valid)


# ----------------------------------------------------------------------------------------------
# Eq. 15: the GOAL loss.
# ----------------------------------------------------------------------------------------------


def goal_loss(ldm: jax.Array, dsa: Mapping | None, maa: Mapping | None,
              alpha: float = 1e-2, beta: float = 1e-3) -> tuple[jax.Array, dict]:
    """Eq. 15: L = L_LDM + α L_DSA + β L_MAA.

    Args:
      ldm: scalar L_LDM.
      dsa: dict from :func:`dsalign_loss` / :func:`dsalign_from_embeddings`, or None (all 0).
      maa: dict from :func:`maalign_loss` / :func:`maalign_from_maps`, or None (all 0).
    Returns:
      (total, metrics) with metrics keys ldm, dsa_local, dsa_global, dsa, maa_in, maa_out, maa,
      total (float32 scalars). With α = β = 0 the total is exactly ``ldm``.
    """
    zero = jnp.zeros((), jnp.float32)
    dsa = dsa or {"dsa_local": zero, "dsa_global": zero, "dsa": zero}
    maa = maa or {"maa_in": zero, "maa_out": zero, "maa": zero}
    total = ldm.astype(jnp.float32)
    if alpha:
        total = total + alpha * dsa["dsa"]
    if beta:
        total = total + beta * maa["maa"]
    metrics = {"ldm": ldm.astype(jnp.float32), **dsa, **maa, "total": total}
    return total, metrics
