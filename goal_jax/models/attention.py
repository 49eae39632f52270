"""Attention building blocks of the (GLIGEN) U-Net, mirroring diffusers' torch modules.

``Attention`` (attention_processor.Attention with the default processor), ``FeedForward`` with
``GEGLU``, ``GatedSelfAttentionDense`` (the GLIGEN fuser), ``BasicTransformerBlock`` and the
continuous-input ``Transformer2DModel``. Parameter names are the diffusers state-dict names.
Layout: tokens [B, T, C]; feature maps NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goal_jax.models import ops
from goal_jax.models.layers import GroupNorm

Dtype = Any


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(x: jnp.ndarray, name: str, eps: float = 1e-5) -> jnp.ndarray:
    """LayerNorm with float32 statistics and output cast back to ``x.dtype``. Must be called
    inside a compact method (creates the submodule ``name`` with ``scale``/``bias``)."""
    y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                     use_fast_variance=False, name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


def group_norm(x: jnp.ndarray, groups: int, eps: float, name: str) -> jnp.ndarray:
    """GroupNorm over the channel (last) axis of NHWC ``x`` with float32 statistics."""
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=x.dtype, param_dtype=jnp.float32,
                     name=name)(x)


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out_0``.

    Attributes:
      heads: number of heads.
      dim_head: width of each head; softmax scale is ``dim_head ** -0.5``.
      out_dim: output width (= query width).
      upcast: compute the attention in float32 (diffusers' ``upcast_attention``).
      record_probs: materialise ``softmax(QK^T / sqrt(d))`` in float32 and sow it as
        ``intermediates/attention_probs`` with shape [B, heads, T, S] (einsum, whatever
        ``attention`` says); otherwise use :func:`goal_jax.models.ops.attention` and sow nothing.
      dtype: compute dtype.
      attention: kernel of the layers that sow nothing: "auto" (fused Pallas flash attention on
        TPU, cuDNN on GPU, einsum on CPU), "einsum", "pallas" or "cudnn"
        (:func:`goal_jax.models.ops.resolve_attention`).
    """

    heads: int
    dim_head: int
    out_dim: int
    upcast: bool = False
    record_probs: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: [B, T, out_dim]; context: [B, S, Dc] (None: self-attention) -> [B, T, out_dim]."""
        context = x if context is None else context
        inner = self.heads * self.dim_head
        batch, tokens = x.shape[:2]
        q = _dense(inner, self.dtype, "to_q", use_bias=False)(x)
        k = _dense(inner, self.dtype, "to_k", use_bias=False)(context)
        v = _dense(inner, self.dtype, "to_v", use_bias=False)(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scale = self.dim_head ** -0.5
        if self.record_probs:
            logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
            probs = jax.nn.softmax(logits * scale, axis=-1)  # [B, heads, T, S] float32
            self.sow("intermediates", "attention_probs", probs)
            out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32))
        else:
            if self.upcast:
                q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
            out = ops.attention(q, k, v, scale=scale, implementation=self.attention)
        out = out.reshape(batch, tokens, inner).astype(self.dtype)
        return _dense(self.out_dim, self.dtype, "to_out_0")(out)


class GEGLU(nn.Module):
    """``proj`` to 2*inner, split (hidden, gate), ``hidden * gelu(gate)`` (exact erf GELU)."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(2 * self.inner_dim, self.dtype, "proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn="geglu", mult=4): ``net_0`` (GEGLU) then ``net_2``."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return _dense(self.dim, self.dtype, "net_2")(h)


FUSER_POSITION_EMBEDDINGS = ("sinusoidal_2d",)


def sinusoidal_2d(height: int, width: int, dim: int) -> np.ndarray:
    """float32 [height * width, dim] fixed position embedding of a token grid (row-major, as
    an NHWC map flattened).

    With q = dim // 4 frequencies f_k = 10^(-k/q) cycles per image side (1 down to ~0.1),
    the channels are [sin(2 pi f v), cos(2 pi f v), sin(2 pi f u), cos(2 pi f u)] (q each,
    k ascending) of the token centre u = (x + 0.5) / width, v = (y + 0.5) / height in [0, 1]
    (the coordinates of the GLIGEN boxes); the dim - 4q last channels are 0. The lowest
    frequency, one cycle per side, alone tells every token's place."""
    q = dim // 4
    if q < 1:
        raise ValueError(f"sinusoidal_2d: token width {dim} < 4")
    freqs = 10.0 ** (-np.arange(q) / q)  # [q] cycles per image side
    v = (np.arange(height) + 0.5) / height
    u = (np.arange(width) + 0.5) / width
    vv, uu = (a.reshape(-1) for a in np.meshgrid(v, u, indexing="ij"))  # [T]
    parts = []
    for c in (vv, uu):
        angle = 2 * np.pi * c[:, None] * freqs[None]
        parts += [np.sin(angle), np.cos(angle)]
    out = np.concatenate(parts, axis=1)
    return np.pad(out, ((0, 0), (0, dim - 4 * q))).astype(np.float32)


class GatedSelfAttentionDense(nn.Module):
    """GLIGEN fuser: gated self-attention over [visual tokens, grounding tokens] + gated FF.

    ``x += s * tanh(alpha_attn) * attn(norm1([x, linear(objs)]) + [pe, 0])[:, :n_visual]``
    ``x += s * tanh(alpha_dense) * ff(norm2(x))`` where ``s`` is the runtime ``gligen_scale``
    (1 = diffusers' enabled fuser, 0 = disabled fuser) and ``pe`` is 0 (GLIGEN, diffusers)
    or, with ``position_embedding="sinusoidal_2d"``, :func:`sinusoidal_2d` of the ``grid``
    added to the normalised visual tokens only: a goal_jax extension (no parameters, so the
    state dict is diffusers'; diffusers ignores it) for U-Nets too shallow to tell their
    tokens' places, which the fuser needs to put each phrase in its box.

    Only the n_visual kept outputs are computed: the queries are the visual rows of
    ``norm1([x, objs])`` and the keys / values all rows (diffusers computes the grounding-token
    rows too and discards them; the kept rows are the same).
    """

    dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # kernel of the gated self-attention (see Attention)
    position_embedding: str | None = None  # None or "sinusoidal_2d"
    grid: tuple[int, int] | None = None  # (height, width) of the visual tokens, for the PE

    @nn.compact
    def __call__(self, x, objs, gligen_scale):
        """x: [B, T, dim]; objs: [B, N, context_dim]; gligen_scale: scalar. Returns [B, T, dim]."""
        alpha_attn = self.param("alpha_attn", nn.initializers.zeros, (), jnp.float32)
        alpha_dense = self.param("alpha_dense", nn.initializers.zeros, (), jnp.float32)
        scale = jnp.asarray(gligen_scale, jnp.float32)
        n_visual = x.shape[1]
        objs = _dense(self.dim, self.dtype, "linear")(objs.astype(self.dtype))
        h = layer_norm(jnp.concatenate([x, objs], axis=1), "norm1")
        if self.position_embedding is not None:
            if self.position_embedding not in FUSER_POSITION_EMBEDDINGS:
                raise ValueError(f"unknown fuser position embedding "
                                 f"{self.position_embedding!r}; expected one of "
                                 f"{FUSER_POSITION_EMBEDDINGS}")
            if self.grid is None or self.grid[0] * self.grid[1] != n_visual:
                raise ValueError(f"fuser position embedding: grid {self.grid} does not hold "
                                 f"the {n_visual} visual tokens")
            pe = jnp.asarray(sinusoidal_2d(*self.grid, self.dim), h.dtype)
            h = jnp.concatenate([h[:, :n_visual] + pe[None], h[:, n_visual:]], axis=1)
        h = Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype,
                      attention=self.attention, name="attn")(
            h[:, :n_visual], context=h)
        gate = (scale * jnp.tanh(alpha_attn)).astype(self.dtype)
        x = x + gate * h
        h = FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(x, "norm2"))
        gate = (scale * jnp.tanh(alpha_dense)).astype(self.dtype)
        return x + gate * h


class BasicTransformerBlock(nn.Module):
    """Self-attention -> (GLIGEN fuser) -> cross-attention -> GEGLU feed-forward, pre-LayerNorm.

    Attributes:
      dim: token width; heads, dim_head: attention shape (heads * dim_head == dim).
      gated: has the GLIGEN ``fuser`` (attention_type "gated").
      upcast: float32 attention (``upcast_attention``).
      record_probs: sow the cross-attention (attn2) probabilities.
      attention: kernel of the attentions that sow nothing (see Attention).
      fuser_position_embedding, grid: the fuser's position embedding and the (height, width)
        of the tokens (GatedSelfAttentionDense).
    """

    dim: int
    heads: int
    dim_head: int
    gated: bool = False
    upcast: bool = False
    record_probs: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    fuser_position_embedding: str | None = None
    grid: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, context, objs=None, gligen_scale=1.0):
        """x: [B, T, dim]; context: [B, S, Dc]; objs: [B, N, Dc] grounding tokens or None
        (fuser skipped). Returns [B, T, dim]."""
        attn = lambda name, record=False: Attention(  # noqa: E731
            self.heads, self.dim_head, self.dim, upcast=self.upcast, record_probs=record,
            dtype=self.dtype, attention=self.attention, name=name)
        x = ops.shard_batch(x)
        x = x + attn("attn1")(layer_norm(x, "norm1"))
        if self.gated and objs is not None:
            x = GatedSelfAttentionDense(self.dim, self.heads, self.dim_head, dtype=self.dtype,
                                        attention=self.attention,
                                        position_embedding=self.fuser_position_embedding,
                                        grid=self.grid, name="fuser")(x, objs, gligen_scale)
        x = x + attn("attn2", self.record_probs)(layer_norm(x, "norm2"), context)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(x, "norm3"))
        return ops.shard_batch(x)


class Transformer2DModel(nn.Module):
    """Continuous-input spatial transformer: GroupNorm(eps 1e-6) -> proj_in -> blocks -> proj_out,
    plus the input residual. ``proj_in``/``proj_out`` are Dense when ``use_linear_projection``,
    else 1x1 convs.

    Attributes:
      channels: C of the NHWC input (= heads * dim_head).
      heads: attention heads; dim_head = channels // heads.
      num_layers: number of BasicTransformerBlocks.
      groups: GroupNorm groups.
      record_blocks: per-block flags: sow the attn2 probabilities of that block.
      remat: wrap each BasicTransformerBlock in ``nn.remat``.
      attention: kernel of the attentions that sow nothing (see Attention).
      fuser_position_embedding: None or "sinusoidal_2d" (GatedSelfAttentionDense).
    """

    channels: int
    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    gated: bool = False
    upcast: bool = False
    record_blocks: tuple[bool, ...] = ()
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    fuser_position_embedding: str | None = None

    @nn.compact
    def __call__(self, x, context, objs=None, gligen_scale=1.0):
        """x: [B, H, W, C]; context: [B, S, Dc]; objs: [B, N, Dc] or None. Returns [B, H, W, C]."""
        batch, height, width, channels = x.shape
        residual = x
        h = group_norm(x, self.groups, 1e-6, "norm")
        if self.use_linear_projection:
            h = h.reshape(batch, height * width, channels)
            h = _dense(self.channels, self.dtype, "proj_in")(h)
        else:
            h = nn.Conv(self.channels, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                        name="proj_in")(h)
            h = h.reshape(batch, height * width, self.channels)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        record = self.record_blocks or (False,) * self.num_layers
        for i in range(self.num_layers):
            h = block_cls(self.channels, self.heads, self.channels // self.heads,
                          gated=self.gated, upcast=self.upcast, record_probs=record[i],
                          dtype=self.dtype, attention=self.attention,
                          fuser_position_embedding=self.fuser_position_embedding,
                          grid=(height, width), name=f"transformer_blocks_{i}")(
                              h, context, objs, gligen_scale)
        if self.use_linear_projection:
            h = _dense(channels, self.dtype, "proj_out")(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = h.reshape(batch, height, width, self.channels)
            h = nn.Conv(channels, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                        name="proj_out")(h)
        return h + residual
