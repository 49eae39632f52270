"""Flax port of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE), NHWC.

Parameter names mirror the diffusers state dict (``encoder/down_blocks_0/resnets_0/conv1`` is
``encoder.down_blocks.0.resnets.0.conv1``), so :mod:`goal_jax.weights` converts checkpoints by
renaming. Shapes (for SD-1.x: ``block_out_channels=(128, 256, 512, 512)``, 4 latent channels):

* ``encode``: image x [B,H,W,3] in [-1, 1] -> :class:`DiagonalGaussian` with mean / logvar
  [B,H/f,W/f,4], ``f = 2 ** (len(block_out_channels) - 1)``; latents are *unscaled* (multiply a
  sample by ``config.scaling_factor`` before the U-Net).
* ``decode``: unscaled latents z [B,h,w,4] -> image [B,h*f,w*f,3] (about [-1, 1]).

Parameters are float32; ``dtype`` is the compute dtype. The posterior and the decoded image are
returned in float32 whatever the compute dtype. ``remat=True`` rematerialises the decoder's
mid block and up blocks in the backward pass (DSAlign differentiates through the decoder at
512x512, the training memory peak).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from goal_jax.models import ops
from goal_jax.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv1x1,
    conv3x3,
)

Dtype = Any

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------


def _fail(source: str, key: str, why: str) -> ValueError:
    return ValueError(f"{source}: invalid AutoencoderKL config key {key!r}: {why}")


def _int(d: Mapping, key: str, default, source: str, minimum: int = 1) -> int:
    value = d.get(key, default)
    if value is None:
        raise _fail(source, key, "missing (required)")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _fail(source, key, f"expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(d: Mapping, key: str, default, source: str, optional: bool = False):
    value = d.get(key, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _fail(source, key, f"expected a number, got {value!r}")
    return float(value)


def _bool(d: Mapping, key: str, default: bool, source: str) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise _fail(source, key, f"expected true or false, got {value!r}")
    return value


def _seq(d: Mapping, key: str, default, source: str, kind: type) -> tuple:
    value = d.get(key, default)
    if value is None:
        raise _fail(source, key, "missing (required)")
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(source, key, f"expected a non-empty list, got {value!r}")
    for item in value:
        ok = isinstance(item, kind) and not isinstance(item, bool)
        if not ok or (kind is int and item < 1):
            raise _fail(source, key, f"expected a list of {kind.__name__}"
                        f"{' >= 1' if kind is int else ''}, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json`` (defaults: diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = (_DOWN_BLOCK,)
    up_block_types: tuple = (_UP_BLOCK,)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "AutoencoderKLConfig":
        """Reads a diffusers ``config.json`` dict; unknown keys (``_class_name`` ...) are ignored,
        absent keys take diffusers' defaults (old SD-1.x configs lack e.g. ``norm_num_groups``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: AutoencoderKL config must be a JSON object, got "
                             f"{type(d).__name__}")
        name = d.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise _fail(source, "_class_name", f"expected 'AutoencoderKL', got {name!r}")
        default = cls()
        block_out = _seq(d, "block_out_channels", default.block_out_channels, source, int)
        down = _seq(d, "down_block_types", default.down_block_types, source, str)
        up = _seq(d, "up_block_types", default.up_block_types, source, str)
        for key, types, want in (("down_block_types", down, _DOWN_BLOCK),
                                 ("up_block_types", up, _UP_BLOCK)):
            if len(types) != len(block_out):
                raise _fail(source, key, f"has {len(types)} entries but block_out_channels has "
                            f"{len(block_out)}")
            bad = [t for t in types if t != want]
            if bad:
                raise _fail(source, key, f"only {want!r} blocks are supported, got {bad}")
        act_fn = d.get("act_fn", default.act_fn)
        if act_fn not in ("silu", "swish"):
            raise _fail(source, "act_fn", f"only 'silu' is supported, got {act_fn!r}")
        groups = _int(d, "norm_num_groups", default.norm_num_groups, source)
        for c in block_out:
            if c % groups:
                raise _fail(source, "norm_num_groups",
                            f"{groups} does not divide block_out_channels {list(block_out)}")
        sample_size = d.get("sample_size", default.sample_size)
        if isinstance(sample_size, list):
            sample_size = tuple(sample_size)
        latents_mean = d.get("latents_mean")
        latents_std = d.get("latents_std")
        return cls(
            in_channels=_int(d, "in_channels", default.in_channels, source),
            out_channels=_int(d, "out_channels", default.out_channels, source),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=block_out,
            layers_per_block=_int(d, "layers_per_block", default.layers_per_block, source),
            act_fn="silu",
            latent_channels=_int(d, "latent_channels", default.latent_channels, source),
            norm_num_groups=groups,
            sample_size=sample_size,
            scaling_factor=_float(d, "scaling_factor", default.scaling_factor, source),
            shift_factor=_float(d, "shift_factor", None, source, optional=True),
            latents_mean=None if latents_mean is None else tuple(latents_mean),
            latents_std=None if latents_std is None else tuple(latents_std),
            force_upcast=_bool(d, "force_upcast", default.force_upcast, source),
            use_quant_conv=_bool(d, "use_quant_conv", default.use_quant_conv, source),
            use_post_quant_conv=_bool(d, "use_post_quant_conv", default.use_post_quant_conv,
                                      source),
            mid_block_add_attention=_bool(d, "mid_block_add_attention",
                                          default.mid_block_add_attention, source),
        )

    def to_dict(self) -> dict:
        """A ``config.json`` dict that ``diffusers.AutoencoderKL.from_pretrained`` accepts."""
        out = {"_class_name": "AutoencoderKL"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


# ----------------------------------------------------------------------------------------------
# Posterior.
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class DiagonalGaussian:
    """diffusers ``DiagonalGaussianDistribution``: mean and log-variance [B,h,w,C] (float32,
    logvar clipped to [-30, 20]). Latents are unscaled."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments [B,h,w,2C] (mean first, then logvar, as ``torch.chunk(.., 2, dim=1)``)."""
        moments = jnp.asarray(moments, jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * N(0, 1) noise drawn with ``rng``; [B,h,w,C]."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to N(0, I) summed over h, w, C: [B]."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """The VAE mid-block self-attention (diffusers ``Attention`` built from a deprecated attention
    block): one head of width C, ``group_norm`` first, residual, output rescale 1.

    x [B,H,W,C] -> x + to_out_0(softmax(q k^T / sqrt(C)) v), q/k/v from group_norm(x).
    """

    channels: int
    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dense = lambda name: nn.Dense(self.channels, dtype=self.dtype, param_dtype=jnp.float32,
                                      name=name)
        hs = GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype,
                       name="group_norm")(x)
        hs = hs.reshape(b, h * w, 1, c)  # [B, T, heads=1, C]
        q, k, v = dense("to_q")(hs), dense("to_k")(hs), dense("to_v")(hs)
        out = ops.dot_product_attention(q, k, v)  # scale 1/sqrt(C), float32 logits
        out = dense("to_out_0")(out.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    """``resnets_0``, then (``attentions_i`` if ``add_attention``, ``resnets_{i+1}``) once (the
    VAE's ``num_layers=1``). x [B,H,W,C] -> [B,H,W,C]."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [ResnetBlock2D(self.channels, self.channels, groups=self.groups,
                                      eps=1e-6, dtype=self.dtype) for _ in range(2)]
        if self.add_attention:
            self.attentions = [Attention(self.channels, self.groups, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _resnet_stack(block, remat: bool = False) -> list:
    """``block.layers`` ResnetBlock2Ds (no time embedding): C_in -> C_out, then C_out -> C_out;
    each in ``nn.remat`` when ``remat``."""
    cls = nn.remat(ResnetBlock2D) if remat else ResnetBlock2D
    return [
        cls(block.in_channels if i == 0 else block.out_channels, block.out_channels,
            groups=block.groups, eps=1e-6, dtype=block.dtype)
        for i in range(block.layers)
    ]


class DownEncoderBlock2D(nn.Module):
    """``layers`` resnets (C_in -> C_out, then C_out -> C_out) and, unless last, a stride-2
    ``downsamplers_0`` with diffusers' bottom/right padding. [B,H,W,C_in] -> [B,H/2,W/2,C_out]."""

    in_channels: int
    out_channels: int
    layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = _resnet_stack(self)
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, padding=0, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers`` resnets (C_in -> C_out, then C_out -> C_out) and, unless last, a nearest x2
    ``upsamplers_0``. [B,H,W,C_in] -> [B,2H,2W,C_out]. ``remat`` wraps each resnet and the
    upsampler in ``nn.remat`` (one layer's activations live at a time in the backward pass)."""

    in_channels: int
    out_channels: int
    layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.resnets = _resnet_stack(self, self.remat)
        if self.add_upsample:
            up_cls = nn.remat(Upsample2D) if self.remat else Upsample2D
            self.upsamplers = [up_cls(self.out_channels, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,C_in] -> moments [B,H/f,W/f,2*latent_channels] (before ``quant_conv``)."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        chans = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = conv3x3(chans[0], self.dtype, "conv_in")
        self.down_blocks = [
            DownEncoderBlock2D(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, g,
                               add_downsample=i < len(chans) - 1, dtype=self.dtype)
            for i in range(len(chans))
        ]
        self.mid_block = UNetMidBlock2D(chans[-1], g, cfg.mid_block_add_attention, self.dtype)
        self.conv_norm_out = GroupNorm(num_groups=g, epsilon=1e-6, dtype=self.dtype)
        self.conv_out = conv3x3(2 * cfg.latent_channels, self.dtype, "conv_out")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(jnp.asarray(x, self.dtype))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B,h,w,latent_channels] (after ``post_quant_conv``) -> image [B,h*f,w*f,C_out].

    ``remat=True`` wraps the mid block, every resnet and every upsampler of the up blocks in
    ``nn.remat`` (activations recomputed in the backward pass; parameter names unchanged). Per
    layer rather than per up block: at 512x512 the last up block holds three 128-channel resnets
    whose recomputed activations (each 512x512x128 per image) would all be live at once in that
    block's backward pass; per layer only one resnet's are."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        mid_cls = nn.remat(UNetMidBlock2D) if self.remat else UNetMidBlock2D
        self.conv_in = conv3x3(chans[0], self.dtype, "conv_in")
        self.mid_block = mid_cls(chans[0], g, cfg.mid_block_add_attention, self.dtype)
        self.up_blocks = [
            UpDecoderBlock2D(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, g,
                             add_upsample=i < len(chans) - 1, dtype=self.dtype,
                             remat=self.remat)
            for i in range(len(chans))
        ]
        self.conv_norm_out = GroupNorm(num_groups=g, epsilon=1e-6, dtype=self.dtype)
        self.conv_out = conv3x3(cfg.out_channels, self.dtype, "conv_out")

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(jnp.asarray(z, self.dtype))
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. See the module docstring for shapes.

    Attributes:
      config: the architecture.
      dtype: compute dtype (params stay float32).
      remat: rematerialise the decoder blocks in the backward pass.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype, self.remat)
        if cfg.use_quant_conv:
            self.quant_conv = conv1x1(2 * cfg.latent_channels, self.dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv1x1(cfg.latent_channels, self.dtype, "post_quant_conv")

    def _check(self, array: jax.Array, what: str, channels: int, multiple: int) -> None:
        if array.ndim != 4:
            raise ValueError(f"AutoencoderKL.{what}: expected an NHWC array [B,H,W,{channels}], "
                             f"got shape {tuple(array.shape)}")
        if array.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected {channels} channels in the last "
                             f"axis (NHWC), got shape {tuple(array.shape)}")
        if array.shape[1] % multiple or array.shape[2] % multiple:
            raise ValueError(f"AutoencoderKL.{what}: height and width must be multiples of "
                             f"{multiple}, got shape {tuple(array.shape)}")

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x [B,H,W,in_channels] in [-1, 1] (H, W multiples of f) -> posterior over unscaled
        latents [B,H/f,W/f,latent_channels]."""
        self._check(x, "encode", self.config.in_channels, self.config.downsample_factor)
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents z [B,h,w,latent_channels] -> image [B,h*f,w*f,out_channels], float32."""
        self._check(z, "decode", self.config.latent_channels, 1)
        z = jnp.asarray(z, self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return jnp.asarray(self.decoder(z), jnp.float32)

    def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction: decode(posterior sample with ``rng``, or its mean when ``rng`` is
        None). x [B,H,W,in_channels] -> [B,H,W,out_channels]. Creates every parameter."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z)

    def dummy_inputs(self) -> tuple:
        """A tiny image batch for ``init``: [1, f, f, in_channels] zeros."""
        f = self.config.downsample_factor
        return (jnp.zeros((1, f, f, self.config.in_channels), jnp.float32),)


# ----------------------------------------------------------------------------------------------
# Old checkpoints.
# ----------------------------------------------------------------------------------------------

_LEGACY_ATTENTION = re.compile(
    r"^(?P<path>.*\.attentions\.\d+)\.(?P<old>query|key|value|proj_attn)\.(?P<leaf>weight|bias)$")
_NEW_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def rename_legacy_keys(state: Mapping[str, np.ndarray]) -> dict:
    """Maps old VAE attention names to current ones, as diffusers does on load.

    ``<path>.attentions.<i>.{query,key,value,proj_attn}.{weight,bias}`` become
    ``to_q / to_k / to_v / to_out.0``, and attention weights stored as 1x1 convolutions
    [C, C, 1, 1] (original LDM checkpoints) become [C, C] linear weights. Current names pass
    unchanged. Raises ValueError when an old and a new name map to the same key.
    """
    out = {}
    for key, value in state.items():
        match = _LEGACY_ATTENTION.match(key)
        new_key = (f"{match['path']}.{_NEW_NAME[match['old']]}.{match['leaf']}"
                   if match else key)
        if new_key in out or (match and new_key in state):
            raise ValueError(f"checkpoint holds both {key!r} and {new_key!r}")
        if _ATTENTION_WEIGHT.search(new_key):
            shape = np.shape(value)
            if len(shape) == 4 and shape[2:] == (1, 1):
                value = np.reshape(value, shape[:2])
        out[new_key] = value
    return out
