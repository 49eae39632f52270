"""GLIGEN / Stable Diffusion U-Net (diffusers ``UNet2DConditionModel``) in Flax linen, NHWC.

Supports the SD-1.x / SD-2.x configurations (CrossAttnDownBlock2D / DownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D) and GLIGEN's gated self-attention
(``attention_type="gated"``: a ``fuser`` in every transformer block and the text-box
``position_net``). Parameter names are diffusers' state-dict names, so loading a diffusers
checkpoint is a mechanical rename (see :mod:`goal_jax.weights`).

Cross-attention maps: the ``attn2`` layers under the module-path prefixes in ``attention_maps``
materialise ``softmax(QK^T/sqrt(d))`` in float32 and sow it as
``intermediates/.../attn2/attention_probs`` with shape [B, heads, h*w, T]; use
:func:`cross_attention_layers` to pick the prefixes by resolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from goal_jax.models import ops
from goal_jax.models.attention import (FUSER_POSITION_EMBEDDINGS, Transformer2DModel,
                                       group_norm)
from goal_jax.models.gligen import GLIGENTextBoundingboxProjection
from goal_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ATTENTION_TYPES = ("default", "gated")

# Config keys of diffusers' UNet2DConditionModel that this implementation does not support
# unless they hold the listed (default) values.
_UNSUPPORTED_UNLESS = {
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "act_fn": ("silu", "swish"),
    "mid_block_scale_factor": (1, 1.0),
    "num_attention_heads": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
    "mid_block_only_cross_attention": (None, False),
    "only_cross_attention": (False,),
}
_REQUIRED = ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim")


def _err(source: str, key: str, message: str) -> ValueError:
    return ValueError(f"{source}: config key {key!r} {message}")


def _same(value, allowed) -> bool:
    """Equality that does not confuse False/True with 0/1 or None with anything."""
    if allowed is None or isinstance(allowed, bool) or isinstance(value, bool) or value is None:
        return value is allowed
    return value == allowed


def _int_or_list(d: dict, key: str, n: int, source: str, default):
    value = d.get(key, default)
    if isinstance(value, bool):
        raise _err(source, key, f"must be an int or a list of {n} ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise _err(source, key, f"must be positive, got {value!r}")
        return value
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return tuple(value)
    raise _err(source, key, f"must be a positive int or a list of {n} positive ints "
                            f"(one per block), got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The diffusers ``UNet2DConditionModel`` config fields that SD-1.x/2.x and GLIGEN use.

    ``attention_head_dim`` is, as in diffusers, the NUMBER of heads per block (int or one per
    block); the head width is ``block_out_channels[i] // heads``.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    transformer_layers_per_block: int | tuple[int, ...] = 1
    only_cross_attention: bool = False
    upcast_attention: bool = False
    sample_size: int | tuple[int, int] | None = None
    attention_type: str = "default"
    # goal_jax extension (not a diffusers field; diffusers ignores it): "sinusoidal_2d" adds a
    # fixed 2D position embedding to the visual tokens of every GLIGEN fuser
    # (attention.GatedSelfAttentionDense); None = GLIGEN's fuser.
    fuser_position_embedding: str | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_gligen(self) -> bool:
        """True for a GLIGEN U-Net (gated self-attention + position net)."""
        return self.attention_type == "gated"

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def _per_block(self, value) -> tuple[int, ...]:
        return (value,) * self.num_levels if isinstance(value, int) else tuple(value)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each down-block level."""
        return self._per_block(self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return self._per_block(self.layers_per_block)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        """BasicTransformerBlocks per Transformer2DModel of each level."""
        return self._per_block(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "UNet2DConditionConfig":
        """Builds the config from a diffusers ``config.json`` dict (unused keys are ignored).

        Raises:
          ValueError: naming ``source`` and the key for a missing required key, an invalid
            value, or a diffusers option this implementation does not support.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: a U-Net config must be a JSON object, got {type(d)}")
        d = dict(d)
        for key in _REQUIRED:
            if key not in d or d[key] is None:
                raise _err(source, key, "is missing (required for a UNet2DConditionModel)")
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if key in d and not any(_same(d[key], a) for a in allowed):
                raise _err(source, key, f"= {d[key]!r} is not supported by goal_jax (supported: "
                                        f"{' or '.join(repr(a) for a in allowed)})")
        boc = d["block_out_channels"]
        if (not isinstance(boc, (list, tuple)) or not boc
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in boc)):
            raise _err(source, "block_out_channels",
                       f"must be a list of positive ints, got {boc!r}")
        n = len(boc)
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES),
                             ("up_block_types", UP_BLOCK_TYPES)):
            types = d[key]
            if not isinstance(types, (list, tuple)) or len(types) != n:
                raise _err(source, key, f"must be a list of {n} block types (one per "
                                        f"block_out_channels entry), got {types!r}")
            for t in types:
                if t not in allowed:
                    raise _err(source, key, f"holds unsupported block type {t!r} (supported: "
                                            f"{', '.join(allowed)})")
        mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in MID_BLOCK_TYPES:
            raise _err(source, "mid_block_type", f"= {mid!r} is not supported (supported: "
                                                 f"{', '.join(MID_BLOCK_TYPES)})")
        cad = d["cross_attention_dim"]
        if isinstance(cad, bool) or not isinstance(cad, int) or cad < 1:
            raise _err(source, "cross_attention_dim", f"must be a positive int, got {cad!r}")
        attention_type = d.get("attention_type", "default")
        if attention_type not in ATTENTION_TYPES:
            raise _err(source, "attention_type", f"= {attention_type!r} is not supported "
                                                 f"(supported: {', '.join(ATTENTION_TYPES)})")
        fuser_pe = d.get("fuser_position_embedding")
        if fuser_pe is not None:
            if fuser_pe not in FUSER_POSITION_EMBEDDINGS:
                raise _err(source, "fuser_position_embedding",
                           f"= {fuser_pe!r} is not supported (supported: null or "
                           f"{', '.join(repr(v) for v in FUSER_POSITION_EMBEDDINGS)})")
            if attention_type != "gated":
                raise _err(source, "fuser_position_embedding",
                           f"= {fuser_pe!r} needs GLIGEN fusers (attention_type 'gated'), "
                           f"got attention_type {attention_type!r}")
        groups = d.get("norm_num_groups", 32)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise _err(source, "norm_num_groups", f"must be a positive int, got {groups!r}")
        bad = [c for c in boc if c % groups]
        if bad:
            raise _err(source, "norm_num_groups", f"= {groups} does not divide "
                                                  f"block_out_channels {list(boc)}")
        heads = _int_or_list(d, "attention_head_dim", n, source, 8)
        for c, h in zip(boc, (heads,) * n if isinstance(heads, int) else heads):
            if c % h:
                raise _err(source, "attention_head_dim", f"(number of heads) {h} does not divide "
                                                         f"block channels {c}")
        padding = d.get("downsample_padding", 1)
        if padding not in (0, 1) or isinstance(padding, bool):
            raise _err(source, "downsample_padding", f"must be 0 or 1, got {padding!r}")
        sample_size = d.get("sample_size")
        if isinstance(sample_size, (list, tuple)):
            if len(sample_size) != 2 or not all(isinstance(s, int) and s > 0 for s in sample_size):
                raise _err(source, "sample_size", f"must be an int or [height, width], got "
                                                  f"{sample_size!r}")
            sample_size = tuple(sample_size)
        elif sample_size is not None and (isinstance(sample_size, bool)
                                          or not isinstance(sample_size, int) or sample_size < 1):
            raise _err(source, "sample_size", f"must be a positive int, got {sample_size!r}")
        for key in ("in_channels", "out_channels"):
            v = d.get(key, 4)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _err(source, key, f"must be a positive int, got {v!r}")
        for key in ("use_linear_projection", "flip_sin_to_cos", "upcast_attention"):
            if key in d and not isinstance(d[key], bool):
                raise _err(source, key, f"must be true or false, got {d[key]!r}")
        return cls(
            block_out_channels=tuple(boc),
            down_block_types=tuple(d["down_block_types"]),
            up_block_types=tuple(d["up_block_types"]),
            cross_attention_dim=cad,
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            layers_per_block=_int_or_list(d, "layers_per_block", n, source, 2),
            attention_head_dim=heads,
            mid_block_type=mid,
            use_linear_projection=d.get("use_linear_projection", False),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            norm_num_groups=groups,
            norm_eps=float(d.get("norm_eps", 1e-5)),
            downsample_padding=padding,
            transformer_layers_per_block=_int_or_list(d, "transformer_layers_per_block", n,
                                                      source, 1),
            only_cross_attention=False,
            upcast_attention=d.get("upcast_attention", False),
            sample_size=sample_size,
            attention_type=attention_type,
            fuser_position_embedding=fuser_pe,
        )

    def to_dict(self) -> dict:
        """A diffusers config.json dict that UNet2DConditionModel.from_pretrained accepts."""
        out = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "fuser_position_embedding" and v is None:
                continue  # a diffusers config has no such key
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out.update(act_fn="silu", center_input_sample=False, mid_block_scale_factor=1,
                   dual_cross_attention=False, resnet_time_scale_shift="default",
                   time_embedding_type="positional", conv_in_kernel=3, conv_out_kernel=3)
        return out


# ----------------------------------------------------------------------------------------------
# Attention-map selection.
# ----------------------------------------------------------------------------------------------


def _level_sizes(sample_size: int, num_levels: int) -> list[int]:
    sizes = [sample_size]
    for _ in range(num_levels - 1):
        sizes.append(math.ceil(sizes[-1] / 2))  # 3x3 stride-2 conv with padding 1
    return sizes


def attention_modules(config: UNet2DConditionConfig) -> list[tuple[str, str, int, int]]:
    """All Transformer2DModel modules: (path prefix, part, level, transformer blocks), where part is
    "down"/"mid"/"up" and level indexes the resolution (0 = full latent resolution)."""
    n = config.num_levels
    out = []
    for i, t in enumerate(config.down_block_types):
        if t == "CrossAttnDownBlock2D":
            for j in range(config.layers[i]):
                out.append((f"down_blocks_{i}/attentions_{j}", "down", i,
                            config.transformer_layers[i]))
    out.append(("mid_block/attentions_0", "mid", n - 1, config.transformer_layers[-1]))
    rev_layers = config.layers[::-1]
    rev_tl = config.transformer_layers[::-1]
    for i, t in enumerate(config.up_block_types):
        if t == "CrossAttnUpBlock2D":
            for j in range(rev_layers[i] + 1):
                out.append((f"up_blocks_{i}/attentions_{j}", "up", n - 1 - i, rev_tl[i]))
    return out


def cross_attention_paths(config: UNet2DConditionConfig) -> tuple[str, ...]:
    """Module paths of every cross-attention (attn2) layer, e.g.
    ``"up_blocks_1/attentions_0/transformer_blocks_0/attn2"``."""
    return tuple(f"{prefix}/transformer_blocks_{k}/attn2"
                 for prefix, _, _, blocks in attention_modules(config) for k in range(blocks))


def cross_attention_layers(config: UNet2DConditionConfig, part: str, resolution: int,
                           sample_size: int | None = None) -> tuple[str, ...]:
    """Prefixes of the attention modules of ``part`` ("down", "mid" or "up") whose
    cross-attention maps are ``resolution x resolution`` for latents of ``sample_size``
    (default ``config.sample_size``). SD-1.4, ("up", 16) ->
    ("up_blocks_1/attentions_0", "up_blocks_1/attentions_1", "up_blocks_1/attentions_2").

    Raises:
      ValueError: unknown part, no sample size, or no such layers (the message lists the
        resolutions that exist).
    """
    if part not in ("down", "mid", "up"):
        raise ValueError(f"part must be 'down', 'mid' or 'up', got {part!r}")
    size = config.sample_size if sample_size is None else sample_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"sample_size {tuple(size)} is not square; pass sample_size=")
        size = size[0]
    if size is None:
        raise ValueError("the U-Net config has no sample_size; pass sample_size= (latent size)")
    sizes = _level_sizes(int(size), config.num_levels)
    modules = [(p, sizes[lvl]) for p, prt, lvl, _ in attention_modules(config) if prt == part]
    chosen = tuple(p for p, s in modules if s == resolution)
    if not chosen:
        available = sorted({s for _, s in modules})
        raise ValueError(f"no {part} cross-attention layers at resolution {resolution} for "
                         f"latents of size {size}; {part} resolutions: {available}")
    return chosen


def _is_selected(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> jnp.ndarray:
    """diffusers ``get_timestep_embedding``: timesteps [B] -> [B, dim] float32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``: [B, C0] -> [B, time_embed_dim]."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.time_embed_dim, dtype=self.dtype,  # noqa: E731
                                      param_dtype=jnp.float32, name=name)
        return dense("linear_2")(nn.silu(dense("linear_1")(x)))


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """Static description of one down/mid/up block (hashable, so it can be a module field)."""

    in_channels: int
    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    has_attention: bool
    resample: bool
    prev_output_channels: int = 0
    record: tuple[tuple[bool, ...], ...] = ()


class _UNetBlock(nn.Module):
    """Common fields of the U-Net blocks."""

    spec: _BlockSpec
    config: UNet2DConditionConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def _resnet(self, in_ch, name):
        cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        return cls(in_ch, self.spec.out_channels, groups=self.config.norm_num_groups,
                   eps=self.config.norm_eps, temb_channels=self.config.time_embed_dim,
                   dtype=self.dtype, name=name)

    def _attention(self, j, name):
        s = self.spec
        return Transformer2DModel(
            s.out_channels, s.heads, num_layers=s.transformer_layers,
            groups=self.config.norm_num_groups,
            use_linear_projection=self.config.use_linear_projection,
            gated=self.config.is_gligen, upcast=self.config.upcast_attention,
            record_blocks=s.record[j] if s.record else (), remat=self.remat,
            dtype=self.dtype, attention=self.attention,
            fuser_position_embedding=self.config.fuser_position_embedding, name=name)


class DownBlock(_UNetBlock):
    """CrossAttnDownBlock2D (has_attention) or DownBlock2D: resnets (+ attentions), then the
    ``downsamplers_0`` stride-2 conv. Returns (x, skip outputs)."""

    @nn.compact
    def __call__(self, x, temb, context, objs, gligen_scale):
        s = self.spec
        outputs = []
        for j in range(s.num_layers):
            x = self._resnet(s.in_channels if j == 0 else s.out_channels, f"resnets_{j}")(x, temb)
            if s.has_attention:
                x = self._attention(j, f"attentions_{j}")(x, context, objs, gligen_scale)
            outputs.append(x)
        if s.resample:
            x = Downsample2D(s.out_channels, self.config.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            outputs.append(x)
        return x, outputs


class MidBlock(_UNetBlock):
    """UNetMidBlock2DCrossAttn: resnets_0 -> (attentions_j -> resnets_{j+1})."""

    @nn.compact
    def __call__(self, x, temb, context, objs, gligen_scale):
        s = self.spec
        x = self._resnet(s.in_channels, "resnets_0")(x, temb)
        for j in range(s.num_layers):
            x = self._attention(j, f"attentions_{j}")(x, context, objs, gligen_scale)
            x = self._resnet(s.out_channels, f"resnets_{j + 1}")(x, temb)
        return x


class UpBlock(_UNetBlock):
    """CrossAttnUpBlock2D (has_attention) or UpBlock2D: for each layer concatenate the last skip,
    resnet (+ attention); then ``upsamplers_0`` (nearest x2 or to ``upsample_size``, conv)."""

    @nn.compact
    def __call__(self, x, skips, temb, context, objs, gligen_scale, upsample_size=None):
        s = self.spec
        skips = list(skips)
        for j in range(s.num_layers):
            skip = skips.pop()
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            res_ch = s.in_channels if j == s.num_layers - 1 else s.out_channels
            in_ch = (s.prev_output_channels if j == 0 else s.out_channels) + res_ch
            x = self._resnet(in_ch, f"resnets_{j}")(x, temb)
            if s.has_attention:
                x = self._attention(j, f"attentions_{j}")(x, context, objs, gligen_scale)
        if s.resample:
            x = Upsample2D(s.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """The (GLIGEN) conditional U-Net.

    Attributes:
      config: the architecture.
      dtype: compute dtype (parameters are float32; norms and softmax statistics in float32).
      remat: wrap every resnet and transformer block in ``nn.remat`` (gradient checkpointing).
      attention_maps: module-path prefixes (e.g. ``"up_blocks_1"``,
        ``"up_blocks_1/attentions_0"``) whose cross-attention probabilities are sowed into the
        ``intermediates`` collection; see :func:`cross_attention_layers`. These layers always
        use the einsum kernel (they need the probabilities).
      attention: kernel of every other attention (self-, cross- and gated self-attention):
        "auto" (Pallas flash attention on TPU, cuDNN on GPU, einsum on CPU), "einsum",
        "pallas" or "cudnn"; see :func:`goal_jax.models.ops.resolve_attention`.
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention_maps: tuple[str, ...] = ()
    attention: str = "auto"

    def __post_init__(self):
        maps = self.attention_maps
        maps = (maps,) if isinstance(maps, str) else tuple(maps)  # lists from configs: hashable
        bad = [p for p in maps if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"attention_maps must be module-path prefixes (non-empty strings), "
                             f"got {bad}")
        object.__setattr__(self, "attention_maps", maps)
        if self.attention not in ops.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"UNet2DConditionModel: attention must be one of "
                             f"{ops.ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        super().__post_init__()

    def _specs(self):
        cfg = self.config
        n = cfg.num_levels
        boc = cfg.block_out_channels
        paths = cross_attention_paths(cfg)
        prefixes = tuple(self.attention_maps)
        unmatched = [p for p in prefixes if not any(_is_selected(a, (p,)) for a in paths)]
        if unmatched:
            raise ValueError(
                f"attention_maps {unmatched} match no cross-attention layer of this U-Net; "
                f"attention modules: {[m[0] for m in attention_modules(cfg)]}")

        def record(prefix, count, blocks):
            return tuple(tuple(_is_selected(f"{prefix}/attentions_{j}/transformer_blocks_{k}/attn2",
                                            prefixes) for k in range(blocks))
                         for j in range(count))

        down = []
        out_ch = boc[0]
        for i, t in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            attn = t == "CrossAttnDownBlock2D"
            down.append(_BlockSpec(in_ch, out_ch, cfg.layers[i], cfg.heads[i],
                                   cfg.transformer_layers[i], attn, i < n - 1,
                                   record=record(f"down_blocks_{i}", cfg.layers[i],
                                                 cfg.transformer_layers[i]) if attn else ()))
        mid = _BlockSpec(boc[-1], boc[-1], 1, cfg.heads[-1], cfg.transformer_layers[-1], True,
                         False, record=record("mid_block", 1, cfg.transformer_layers[-1]))
        up = []
        rboc, rheads = boc[::-1], cfg.heads[::-1]
        rlayers, rtl = cfg.layers[::-1], cfg.transformer_layers[::-1]
        out_ch = rboc[0]
        for i, t in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            attn = t == "CrossAttnUpBlock2D"
            up.append(_BlockSpec(in_ch, out_ch, rlayers[i] + 1, rheads[i], rtl[i], attn,
                                 i < n - 1, prev_output_channels=prev,
                                 record=record(f"up_blocks_{i}", rlayers[i] + 1, rtl[i])
                                 if attn else ()))
        return down, mid, up

    def _check_inputs(self, sample, encoder_hidden_states, grounding):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, h, w, {cfg.in_channels}] (NHWC latents), got "
                             f"shape {tuple(sample.shape)}")
        batch = sample.shape[0]
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch
                or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim):
            raise ValueError(f"encoder_hidden_states must be [{batch}, T, "
                             f"{cfg.cross_attention_dim}], got shape "
                             f"{tuple(encoder_hidden_states.shape)}")
        if grounding is None:
            return None
        if not cfg.is_gligen:
            raise ValueError(
                "grounding was given but this U-Net has no position net (attention_type="
                f"{cfg.attention_type!r}); only a GLIGEN U-Net (attention_type='gated') takes "
                "grounding inputs")
        if not isinstance(grounding, Mapping):
            raise ValueError(f"grounding must be a dict with boxes, phrase_embeds, masks; got "
                             f"{type(grounding).__name__}")
        missing = [k for k in ("boxes", "phrase_embeds", "masks") if k not in grounding]
        if missing:
            raise ValueError(f"grounding is missing {missing} (needs boxes [B,N,4], "
                             f"phrase_embeds [B,N,{cfg.cross_attention_dim}], masks [B,N])")
        boxes = jnp.asarray(grounding["boxes"])
        phrases = jnp.asarray(grounding["phrase_embeds"])
        masks = jnp.asarray(grounding["masks"])
        if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
            raise ValueError(f"grounding['boxes'] must be [{batch}, N, 4] xyxy, got shape "
                             f"{tuple(boxes.shape)}")
        n_boxes = boxes.shape[1]
        if phrases.shape != (batch, n_boxes, cfg.cross_attention_dim):
            raise ValueError(f"grounding['phrase_embeds'] must be [{batch}, {n_boxes}, "
                             f"{cfg.cross_attention_dim}], got shape {tuple(phrases.shape)}")
        if masks.shape != (batch, n_boxes):
            raise ValueError(f"grounding['masks'] must be [{batch}, {n_boxes}], got shape "
                             f"{tuple(masks.shape)}")
        return boxes, phrases, masks

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, grounding=None,
                 gligen_scale=1.0):
        """Noise prediction.

        Args:
          sample: [B, h, w, in_channels] noisy latents z_t (NHWC).
          timesteps: [B] or scalar (or [1]) diffusion timesteps (int or float).
          encoder_hidden_states: [B, T, cross_attention_dim] text encoder states.
          grounding: None, or {"boxes": [B, N, 4] xyxy in [0, 1], "phrase_embeds": [B, N, D]
            pooled CLIP text features, "masks": [B, N] (1 real box, 0 padded slot)}.
            None on a GLIGEN U-Net skips the fusers (as diffusers without gligen kwargs).
          gligen_scale: runtime scalar multiplying both fuser residuals (1 on, 0 off); a traced
            value, so changing it does not recompile.

        Returns:
          eps: [B, h, w, out_channels] float32.
        """
        cfg = self.config
        sample = jnp.asarray(sample)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states)
        checked = self._check_inputs(sample, encoder_hidden_states, grounding)
        batch = sample.shape[0]
        t = jnp.asarray(timesteps)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = jnp.broadcast_to(t.reshape(()), (batch,))
        elif t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or [{batch}], got shape {tuple(t.shape)}")
        down_specs, mid_spec, up_specs = self._specs()

        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding")(
            t_emb.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)
        scale = jnp.asarray(gligen_scale, jnp.float32)
        objs = None
        if checked is not None:
            boxes, phrases, masks = checked
            objs = GLIGENTextBoundingboxProjection(
                positive_len=cfg.cross_attention_dim, out_dim=cfg.cross_attention_dim,
                dtype=self.dtype, name="position_net")(boxes, masks, phrases)

        x = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in")(sample.astype(self.dtype))
        skips = [x]
        for i, spec in enumerate(down_specs):
            x, outputs = DownBlock(spec, cfg, self.remat, self.dtype, self.attention,
                                     name=f"down_blocks_{i}")(
                x, emb, context, objs, scale)
            skips.extend(outputs)
        x = MidBlock(mid_spec, cfg, self.remat, self.dtype, self.attention, name="mid_block")(
            x, emb, context, objs, scale)
        for i, spec in enumerate(up_specs):
            res, skips = skips[-spec.num_layers:], skips[:-spec.num_layers]
            upsample_size = None
            if spec.resample:
                target = tuple(skips[-1].shape[1:3])
                if target != (2 * x.shape[1], 2 * x.shape[2]):
                    upsample_size = target  # odd sizes: diffusers' forward_upsample_size
            x = UpBlock(spec, cfg, self.remat, self.dtype, self.attention, name=f"up_blocks_{i}")(
                x, res, emb, context, objs, scale, upsample_size)
        x = group_norm(x, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")
        x = conv3x3(cfg.out_channels, self.dtype, "conv_out")(nn.silu(x))
        return x.astype(jnp.float32)

    def dummy_inputs(self) -> tuple:
        """Tiny inputs for ``init`` that create every parameter (incl. the position net)."""
        cfg = self.config
        size = 2 ** (cfg.num_levels - 1)
        sample = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
        timesteps = jnp.zeros((1,), jnp.int32)
        context = jnp.zeros((1, 2, cfg.cross_attention_dim), jnp.float32)
        grounding = None
        if cfg.is_gligen:
            grounding = {"boxes": jnp.zeros((1, 1, 4), jnp.float32),
                         "phrase_embeds": jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32),
                         "masks": jnp.ones((1, 1), jnp.float32)}
        return sample, timesteps, context, grounding
