"""GLIGEN position net: grounding tokens from boxes and phrase embeddings.

Mirrors diffusers' ``GLIGENTextBoundingboxProjection`` (``feature_type="text-only"``) and
``get_fourier_embeds_from_boundingbox``; parameter names are the diffusers state-dict names
(``position_net.linears.{0,2,4}``, ``null_positive_feature``, ``null_position_feature``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def fourier_box_embedding(boxes: jnp.ndarray, num_freqs: int = 8) -> jnp.ndarray:
    """Fourier features of boxes, ordered exactly as diffusers.

    Args:
      boxes: [B, N, 4] xyxy box coordinates (normalised to [0, 1]).
      num_freqs: number of frequencies F; frequency k is ``100 ** (k / F)``.

    Returns:
      [B, N, F * 2 * 4] features laid out as (frequency, sin/cos, coordinate), i.e. index
      ``(k * 2 + s) * 4 + c`` holds ``sin`` (s=0) or ``cos`` (s=1) of ``100**(k/F) * box[c]``.
    """
    batch, num_boxes = boxes.shape[:2]
    freqs = 100.0 ** (jnp.arange(num_freqs, dtype=jnp.float32) / num_freqs)  # [F]
    emb = freqs.astype(boxes.dtype)[None, None, None, :] * boxes[..., None]  # [B,N,4,F]
    emb = jnp.stack((jnp.sin(emb), jnp.cos(emb)), axis=-1)  # [B,N,4,F,2]
    emb = emb.transpose(0, 1, 3, 4, 2)  # [B,N,F,2,4]
    return emb.reshape(batch, num_boxes, num_freqs * 2 * 4)


class GLIGENTextBoundingboxProjection(nn.Module):
    """Text-only GLIGEN position net: (phrase embedding, box) -> grounding token.

    Attributes:
      positive_len: width P of the phrase embeddings (pooled CLIP text features).
      out_dim: width of the grounding tokens (the U-Net's cross_attention_dim).
      fourier_freqs: number of box Fourier frequencies (8 in GLIGEN).
      hidden_dim: width of the two hidden MLP layers (512 in GLIGEN).
      dtype: compute dtype (parameters stay float32).
    """

    positive_len: int
    out_dim: int
    fourier_freqs: int = 8
    hidden_dim: int = 512
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, boxes, masks, phrase_embeds):
        """Grounding tokens.

        Args:
          boxes: [B, N, 4] xyxy in [0, 1].
          masks: [B, N], 1 for a real box, 0 for a padded slot (replaced by learned null features).
          phrase_embeds: [B, N, positive_len].

        Returns:
          [B, N, out_dim] grounding tokens ("objs"), in ``dtype``.
        """
        position_dim = self.fourier_freqs * 2 * 4
        null_positive = self.param(
            "null_positive_feature", nn.initializers.zeros, (self.positive_len,), jnp.float32
        )
        null_position = self.param(
            "null_position_feature", nn.initializers.zeros, (position_dim,), jnp.float32
        )
        masks = masks.astype(jnp.float32)[..., None]  # [B,N,1]
        xyxy = fourier_box_embedding(boxes.astype(jnp.float32), self.fourier_freqs)
        xyxy = xyxy * masks + (1.0 - masks) * null_position[None, None, :]
        positive = phrase_embeds.astype(jnp.float32)
        positive = positive * masks + (1.0 - masks) * null_positive[None, None, :]
        h = jnp.concatenate([positive, xyxy], axis=-1).astype(self.dtype)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        h = nn.silu(dense(self.hidden_dim, "linears_0")(h))
        h = nn.silu(dense(self.hidden_dim, "linears_2")(h))
        return dense(self.out_dim, "linears_4")(h)
