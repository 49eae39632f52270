"""Shared convolutional building blocks of the VAE and the U-Net (diffusers numerics, NHWC).

Parameter names mirror diffusers' PyTorch modules (``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``; ``conv`` in the resamplers), so that
:func:`goal_jax.weights.convert_state_dict` is a mechanical rename.

Parameters are always float32; ``dtype`` is the compute dtype. Group normalisation computes its
statistics and the normalisation itself in float32 and casts the result to ``dtype`` (this matters
for bfloat16, whose 8-bit mantissa cannot hold a variance of a 64x64x320 feature map).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from goal_jax.models import ops

Dtype = Any


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` over the last (channel) axis of ``[B, ..., C]``.

    Statistics are reduced over every axis except the batch axis, per group of ``C // num_groups``
    channels, with the exact two-pass variance (``use_fast_variance=False``) as PyTorch. The input is
    promoted to float32 before normalising; the output has dtype ``dtype`` (``None``: float32).
    Parameters: ``scale`` [C] (torch ``weight``), ``bias`` [C].
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, *, mask: Optional[jax.Array] = None):
        return super().__call__(jnp.asarray(x, jnp.float32), mask=mask)


def conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1, padding: Any = 1) -> nn.Conv:
    """A 3x3 ``nn.Conv`` with float32 parameters, ``padding`` pixels on every side (int) or an
    explicit flax padding spec ``((top, bottom), (left, right))``. Tiny outputs (<= 4x4) are
    computed by :func:`goal_jax.models.ops.conv_general_dilated` (same values, no XLA:CPU slow
    path)."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, conv_general_dilated=ops.conv_general_dilated,
                   name=name)


def conv1x1(features: int, dtype: Dtype, name: str) -> nn.Conv:
    """A 1x1 ``nn.Conv`` (PyTorch ``Conv2d(kernel_size=1)``) with float32 parameters."""
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                   name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``, ``output_scale_factor=1``,
    SiLU, pre-norm, dropout inactive).

    ``h = conv1(silu(norm1(x)))``; ``h += time_emb_proj(silu(temb))`` (when ``temb_channels``);
    ``h = conv2(silu(norm2(h)))``; output ``shortcut(x) + h`` where the shortcut is a 1x1
    ``conv_shortcut`` when ``in_channels != out_channels`` and the identity otherwise.

    Attributes:
      in_channels: C_in, the channels of ``x``.
      out_channels: C_out (``None``: C_in).
      groups: GroupNorm groups of both norms.
      eps: GroupNorm epsilon.
      temb_channels: T, the width of the time embedding, or ``None`` for no ``time_emb_proj``
        (the VAE).
      dtype: compute dtype.
    """

    in_channels: int
    out_channels: Optional[int] = None
    groups: int = 32
    eps: float = 1e-6
    temb_channels: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        """x [B,H,W,C_in], temb [B,T] or None -> [B,H,W,C_out] in ``dtype``."""
        out_channels = self.in_channels if self.out_channels is None else self.out_channels
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResnetBlock2D {self.name}: input has {x.shape[-1]} channels, expected "
                f"in_channels={self.in_channels} (x shape {tuple(x.shape)})")
        x = ops.shard_batch(jnp.asarray(x, self.dtype))
        h = GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = nn.silu(h)
        h = conv3x3(out_channels, self.dtype, "conv1")(h)
        if self.temb_channels is not None:
            if temb is None:
                raise ValueError(f"ResnetBlock2D {self.name}: temb_channels="
                                 f"{self.temb_channels} but no time embedding was given")
            t = nn.Dense(out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                         name="time_emb_proj")(nn.silu(jnp.asarray(temb, self.dtype)))
            h = h + t[:, None, None, :]
        h = GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        h = nn.silu(h)
        h = conv3x3(out_channels, self.dtype, "conv2")(h)
        if self.in_channels != out_channels:
            x = conv1x1(out_channels, self.dtype, "conv_shortcut")(x)
        return ops.shard_batch(x + h)


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(use_conv=True)``: a 3x3 stride-2 ``conv``.

    ``padding=1`` pads one pixel on every side (U-Net); ``padding=0`` pads only bottom and right by
    one pixel (diffusers' ``F.pad(x, (0, 1, 0, 1))`` in the VAE encoder). x [B,H,W,C] ->
    [B,ceil(H/2),ceil(W/2),C] for even H, W: [B,H/2,W/2,C].
    """

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.channels:
            raise ValueError(f"Downsample2D {self.name}: input has {x.shape[-1]} channels, "
                             f"expected {self.channels}")
        if self.padding == 0:
            pad = ((0, 1), (0, 1))
        elif self.padding == 1:
            pad = ((1, 1), (1, 1))
        else:
            raise ValueError(f"Downsample2D {self.name}: padding must be 0 or 1, got "
                             f"{self.padding}")
        return conv3x3(self.channels, self.dtype, "conv", stride=2, padding=pad)(
            jnp.asarray(x, self.dtype))


def upsample_nearest(x: jax.Array, output_size: Optional[Sequence[int]] = None) -> jax.Array:
    """PyTorch ``F.interpolate(mode="nearest")`` on NHWC: x [B,H,W,C] -> [B,H2,W2,C] with
    (H2, W2) = ``output_size`` or (2H, 2W); source index ``floor(i * H / H2)``."""
    b, h, w, c = x.shape
    if output_size is None:
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    oh, ow = (int(s) for s in output_size)
    rows = jnp.minimum((jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum((jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest-neighbour x2 (or to ``output_size``), then
    a 3x3 ``conv``. x [B,H,W,C] -> [B,2H,2W,C]."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[Sequence[int]] = None) -> jax.Array:
        if x.shape[-1] != self.channels:
            raise ValueError(f"Upsample2D {self.name}: input has {x.shape[-1]} channels, "
                             f"expected {self.channels}")
        x = upsample_nearest(jnp.asarray(x, self.dtype), output_size)
        return conv3x3(self.channels, self.dtype, "conv")(x)
