"""CLIP (text and vision transformers) in Flax linen, mirroring transformers' ``CLIPModel``.

Parameter names follow the transformers state dict, so ``goal_jax.weights`` converts by
renaming: ``text_model/embeddings/token_embedding``, ``text_model/encoder/layers_0/self_attn/
q_proj``, ``layer_norm1``, ``mlp/fc1``, ``text_model/final_layer_norm``,
``vision_model/embeddings/{class_embedding,patch_embedding,position_embedding}``,
``vision_model/pre_layrnorm`` (sic), ``vision_model/post_layernorm``, ``text_projection``,
``visual_projection`` and ``logit_scale``.

* :class:`CLIPTextModel` — the text tower alone (SD's ``text_encoder/``, no projection).
* :class:`CLIPModel` — both towers and the projections (used by DSAlign, ViT-L/14).

``dtype`` is the compute dtype; parameters are always float32. Images are NHWC and already
CLIP-normalised (see :func:`preprocess`). Only jax, flax and numpy are imported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from goal_jax.models import ops

# Checkpoint keys that hold buffers, not parameters (older transformers saved them).
IGNORED_KEYS = (r"(^|\.)position_ids$",)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: Mapping[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------

_MISSING = object()


def _get(d: Mapping, key: str, source: str, kind, default=_MISSING, positive: bool = True):
    """Reads ``d[key]`` as ``kind`` (int / float / str); errors name ``source`` and the key."""
    if key not in d or d[key] is None:
        if default is _MISSING:
            raise ValueError(f"{source}: missing required config key {key!r}")
        return default
    value = d[key]
    if kind is int:
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]  # square [n, n] sizes
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{source}: config key {key!r} must be an integer, got {value!r}")
        value = int(value)
        if positive and value <= 0:
            raise ValueError(f"{source}: config key {key!r} must be positive, got {value}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: config key {key!r} must be a number, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{source}: config key {key!r} must be a string, got {value!r}")
    return value


def _activation(d: Mapping, source: str) -> str:
    act = _get(d, "hidden_act", source, str, default="quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{source}: config key 'hidden_act' = {act!r} is not supported; "
            f"expected one of {sorted(ACTIVATIONS)}"
        )
    return act


def _check_heads(hidden: int, heads: int, source: str) -> None:
    if hidden % heads:
        raise ValueError(
            f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )


def _merge_legacy(d: Mapping, key: str, source: str) -> dict:
    """``d[key]`` updated by the legacy ``d[key + '_dict']`` (transformers gives it priority)."""
    sub = d.get(key)
    legacy = d.get(key + "_dict")
    if sub is None and legacy is None:
        raise ValueError(f"{source}: missing required config key {key!r}")
    for name, value in ((key, sub), (key + "_dict", legacy)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{source}: config key {name!r} must be an object, got {value!r}")
    merged = dict(sub or {})
    merged.update(legacy or {})
    return merged


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (transformers ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPTextConfig":
        """From a ``CLIPTextModel`` config.json dict (or a ``CLIPModel`` one: its text_config)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: config must be a JSON object, got {type(d).__name__}")
        if "hidden_size" not in d and ("text_config" in d or "text_config_dict" in d):
            d = _merge_legacy(d, "text_config", source)
            source = f"{source} text_config"
        hidden = _get(d, "hidden_size", source, int)
        heads = _get(d, "num_attention_heads", source, int)
        _check_heads(hidden, heads, source)
        return cls(
            vocab_size=_get(d, "vocab_size", source, int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", source, int),
            num_hidden_layers=_get(d, "num_hidden_layers", source, int),
            num_attention_heads=heads,
            max_position_embeddings=_get(d, "max_position_embeddings", source, int),
            hidden_act=_activation(d, source),
            layer_norm_eps=_get(d, "layer_norm_eps", source, float, default=1e-5),
            bos_token_id=_get(d, "bos_token_id", source, int, default=49406, positive=False),
            eos_token_id=_get(d, "eos_token_id", source, int, default=49407, positive=False),
            pad_token_id=_get(d, "pad_token_id", source, int, default=1, positive=False),
            projection_dim=_get(d, "projection_dim", source, int, default=512),
        )

    def to_dict(self) -> dict:
        """A ``CLIPTextModel`` config.json dict."""
        d = dataclasses.asdict(self)
        d.update(model_type="clip_text_model", architectures=["CLIPTextModel"])
        return d


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (transformers ``CLIPVisionConfig``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPVisionConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: config must be a JSON object, got {type(d).__name__}")
        hidden = _get(d, "hidden_size", source, int)
        heads = _get(d, "num_attention_heads", source, int)
        _check_heads(hidden, heads, source)
        image_size = _get(d, "image_size", source, int)
        patch_size = _get(d, "patch_size", source, int)
        if image_size % patch_size:
            raise ValueError(
                f"{source}: image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        return cls(
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", source, int),
            num_hidden_layers=_get(d, "num_hidden_layers", source, int),
            num_attention_heads=heads,
            num_channels=_get(d, "num_channels", source, int, default=3),
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=_activation(d, source),
            layer_norm_eps=_get(d, "layer_norm_eps", source, float, default=1e-5),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(model_type="clip_vision_model")
        return d


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A full ``CLIPModel`` (text_config, vision_config, projection_dim)."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: config must be a JSON object, got {type(d).__name__}")
        text = CLIPTextConfig.from_dict(
            _merge_legacy(d, "text_config", source), f"{source} text_config"
        )
        vision = CLIPVisionConfig.from_dict(
            _merge_legacy(d, "vision_config", source), f"{source} vision_config"
        )
        return cls(
            text_config=text,
            vision_config=vision,
            projection_dim=_get(d, "projection_dim", source, int, default=512),
            logit_scale_init_value=_get(
                d, "logit_scale_init_value", source, float, default=2.6592
            ),
        )

    def to_dict(self) -> dict:
        """A ``CLIPModel`` config.json dict."""
        text = self.text_config.to_dict()
        text.pop("architectures")
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": text,
            "vision_config": self.vision_config.to_dict(),
        }


# ----------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class CLIPTextOutput:
    """last_hidden_state [B, T, D] (after the final layer norm); pooled [B, D] (the EOS
    token's state); embeds [B, P] (``text_projection(pooled)``) or None for CLIPTextModel."""

    last_hidden_state: jax.Array
    pooled: jax.Array
    embeds: jax.Array | None = None


@struct.dataclass
class CLIPImageOutput:
    """pooled [B, Dv] (post-layernorm class token); embeds [B, P] (``visual_projection``)."""

    pooled: jax.Array
    embeds: jax.Array


@struct.dataclass
class CLIPOutput:
    """Both towers and ``logits_per_text`` [B_text, B_image] = exp(logit_scale) * cosine."""

    text: CLIPTextOutput
    image: CLIPImageOutput
    logits_per_text: jax.Array


# ----------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------


def _dense(features, dtype, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; q/k/v/out projections with bias; scale head_dim**-0.5.
    ``attention``: the kernel, see :func:`goal_jax.models.ops.resolve_attention`."""

    hidden_size: int
    num_heads: int
    causal: bool
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        b, t, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, head_dim)  # noqa: E731
        q = split(_dense(self.hidden_size, self.dtype, "q_proj")(x))
        k = split(_dense(self.hidden_size, self.dtype, "k_proj")(x))
        v = split(_dense(self.hidden_size, self.dtype, "v_proj")(x))
        out = ops.attention(q, k, v, causal=self.causal, implementation=self.attention)
        return _dense(self.hidden_size, self.dtype, "out_proj")(out.reshape(b, t, -1))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _dense(self.intermediate_size, self.dtype, "fc1")(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return _dense(self.hidden_size, self.dtype, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(ln1(x)); x += mlp(ln2(x))."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig
    causal: bool
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        c = self.config
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        x = ops.shard_batch(x)
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.causal, self.dtype,
                              self.attention, name="self_attn")(ln("layer_norm1")(x))
        x = x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype,
                        name="mlp")(ln("layer_norm2")(x))
        return ops.shard_batch(x)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` CLIPEncoderLayers; ``remat`` recomputes each layer's activations in
    the backward pass (DSAlign backpropagates through the vision tower once per box)."""

    config: Any
    causal: bool
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.causal, self.dtype, self.attention,
                      name=f"layers_{i}")(x)
        return x


def _layer_norm(eps, dtype, name):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings: input_ids [B, T] -> [B, T, D]."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        t = input_ids.shape[1]
        x = embed(c.vocab_size, "token_embedding")(input_ids)
        return x + embed(c.max_position_embeddings, "position_embedding")(jnp.arange(t))[None]


def eos_positions(input_ids, eos_token_id: int):
    """[B] position of the EOS token in each row of ``input_ids`` [B, T] (transformers' rule).

    ``eos_token_id == 2`` marks legacy configs (before transformers PR #24773): the EOS is then
    the largest id of the row (``argmax``). Otherwise it is the first position equal to
    ``eos_token_id`` (the pad token may equal the EOS); a row without it gives 0, as in torch.
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
    """transformers ``CLIPTextTransformer`` (``text_model``): causal pre-LN transformer."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids):
        """input_ids int [B, T], T <= max_position_embeddings ->
        (last_hidden_state [B, T, D] after the final layer norm, pooled [B, D] at the EOS)."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIP text: input_ids must be [B, T], got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"CLIP text: sequence length {input_ids.shape[1]} exceeds "
                f"max_position_embeddings {c.max_position_embeddings}"
            )
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(c, causal=True, dtype=self.dtype, remat=self.remat,
                        attention=self.attention, name="encoder")(x)
        x = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        return x, pooled


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + position embeddings: [B, H, W, C] -> [B, 1+N, D]."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), jnp.float32
        )
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32,
                    conv_general_dilated=ops.conv_general_dilated,
                    name="patch_embedding")(pixels)
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)  # row-major patches, as torch flatten(2)
        cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        positions = nn.Embed(x.shape[1], c.hidden_size, dtype=self.dtype,
                             param_dtype=jnp.float32, name="position_embedding")
        return x + positions(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers ``CLIPVisionTransformer`` (``vision_model``)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels):
        """pixels [B, S, S, C] CLIP-normalised, S = image_size -> pooled [B, D]
        (post_layernorm of the class token's last hidden state)."""
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"CLIP vision: pixels must be [B, {c.image_size}, {c.image_size}, "
                f"{c.num_channels}] (NHWC, see clip.preprocess), got shape {pixels.shape}"
            )
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = _layer_norm(c.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
        x = CLIPEncoder(c, causal=False, dtype=self.dtype, remat=self.remat,
                        attention=self.attention, name="encoder")(x)
        return _layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` (SD's ``text_encoder/``): the text tower, no projection."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False  # recompute encoder-layer activations in the backward pass
    attention: str = "auto"  # attention kernel (goal_jax.models.ops.resolve_attention)

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype, self.remat,
                                              self.attention)

    def encode_text(self, input_ids) -> CLIPTextOutput:
        """input_ids int [B, T] -> CLIPTextOutput(last_hidden_state [B,T,D], pooled [B,D], None)."""
        hidden, pooled = self.text_model(input_ids)
        return CLIPTextOutput(last_hidden_state=hidden, pooled=pooled, embeds=None)

    def __call__(self, input_ids) -> CLIPTextOutput:
        return self.encode_text(input_ids)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, 2), jnp.int32),)


class CLIPModel(nn.Module):
    """transformers ``CLIPModel``: text and vision towers, projections and logit scale."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    remat: bool = False  # recompute encoder-layer activations in the backward pass
    attention: str = "auto"  # attention kernel (goal_jax.models.ops.resolve_attention)

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text_config, self.dtype, self.remat,
                                              self.attention)
        self.vision_model = CLIPVisionTransformer(c.vision_config, self.dtype, self.remat,
                                                  self.attention)
        self.text_projection = _dense(c.projection_dim, self.dtype, None, use_bias=False)
        self.visual_projection = _dense(c.projection_dim, self.dtype, None, use_bias=False)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), jnp.float32
        )

    def encode_text(self, input_ids) -> CLIPTextOutput:
        """input_ids int [B, T] -> CLIPTextOutput(last_hidden_state [B,T,D], pooled [B,D],
        embeds [B,P] = text_projection(pooled), not normalised)."""
        hidden, pooled = self.text_model(input_ids)
        return CLIPTextOutput(hidden, pooled, self.text_projection(pooled))

    def encode_image(self, pixels) -> CLIPImageOutput:
        """pixels [B, S, S, 3] CLIP-normalised (S = image_size) -> CLIPImageOutput(pooled
        [B,Dv], embeds [B,P] = visual_projection(pooled), not normalised)."""
        pooled = self.vision_model(pixels)
        return CLIPImageOutput(pooled, self.visual_projection(pooled))

    def __call__(self, input_ids, pixels) -> CLIPOutput:
        """Both towers; logits_per_text [B_text, B_image] = exp(logit_scale) * cosine(text,
        image), as transformers' ``CLIPModel.forward``."""
        text = self.encode_text(input_ids)
        image = self.encode_image(pixels)
        t = _normalize(text.embeds)
        v = _normalize(image.embeds)
        logits = jnp.exp(self.logit_scale).astype(t.dtype) * (t @ v.T)
        return CLIPOutput(text=text, image=image, logits_per_text=logits)

    def dummy_inputs(self) -> tuple:
        v = self.config.vision_config
        return (
            jnp.zeros((1, 2), jnp.int32),
            jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
        )


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Image preprocessing.
# ----------------------------------------------------------------------------------------------


def preprocess(images, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """Images in [-1, 1] -> CLIP input pixels, differentiable (CLIPImageProcessor's steps).

    Resizes so the shortest side is ``image_size`` (the long side becomes
    ``int(image_size * long / short)``; bicubic, Keys a=-0.5 with antialiasing when shrinking,
    as PIL's BICUBIC), clips to the valid range (as the uint8 round trip of the reference does),
    center-crops ``image_size`` x ``image_size`` (offset ``int((n - image_size) / 2)``), maps to
    [0, 1] and normalises per channel with ``mean``/``std``.

    Args:
      images: float [B, H, W, C] (NHWC) in [-1, 1], any H, W.
      image_size: output side in pixels (the vision config's ``image_size``).
      mean, std: per-channel statistics (length C), default OpenAI CLIP's.

    Returns:
      float32 [B, image_size, image_size, C].
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"preprocess: images must be [B, H, W, C], got shape {images.shape}")
    b, h, w, ch = images.shape
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if mean.shape != (ch,) or std.shape != (ch,):
        raise ValueError(
            f"preprocess: mean/std must have {ch} values (one per channel), "
            f"got {mean.shape} and {std.shape}"
        )
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    nh, nw = (new_long, image_size) if w <= h else (image_size, new_long)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, ch), method="bicubic", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    top = int((nh - image_size) / 2.0)
    left = int((nw - image_size) / 2.0)
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - mean) / std


def rename_text_keys(state_dict: Mapping[str, Any]) -> dict:
    """Accepts both ``CLIPTextModel`` state-dict layouts: transformers < 5 (and SD-1.x
    ``text_encoder/`` files) name keys ``text_model.embeddings...``; transformers >= 5 saves
    them without the ``text_model.`` prefix. Returns the prefixed form our module uses.

    Raises:
      ValueError: when a key is present in both forms.
    """
    out: dict = {}
    for key, value in state_dict.items():
        new = key if key.startswith("text_model.") else "text_model." + key
        if new in out:
            raise ValueError(f"checkpoint holds {new!r} twice (with and without 'text_model.')")
        out[new] = value
    return out
