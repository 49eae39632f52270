"""Compute kernels shared by the models: multi-head attention (an einsum kernel plus the fused
accelerator kernels behind one switch) and a convolution that avoids XLA:CPU's slow path for tiny
feature maps.

Attention implementations (:func:`attention`, chosen by the models' ``attention`` attribute):

* ``"einsum"``: :func:`dot_product_attention` below (materialises the [B, H, T, S] logits);
  the only kernel that can expose the attention probabilities (MAAlign's layers always use it);
* ``"pallas"``: the Pallas TPU flash attention (``jax.experimental.pallas.ops.tpu``), which
  never materialises the logits (forward and backward are tiled over 128-token blocks); tokens
  are padded to a multiple of 128 and padded keys are masked out by segment ids;
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16);
* ``"auto"``: ``"pallas"`` on TPU, ``"cudnn"`` on GPU when the inputs are bf16/fp16 and the
  head width is a multiple of 8 up to 128 (else ``"einsum"``), ``"einsum"`` on CPU. The platform
  is ``jax.default_backend()`` unless a :func:`target_platform` block says otherwise (compiling
  for a TPU topology from a host without one).

A Mosaic (Pallas TPU) kernel cannot be partitioned by XLA's SPMD partitioner, so on a mesh of
several devices the kernel runs under ``jax.shard_map`` with the batch axis split over all mesh
axes (the mesh of the enclosing ``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh`` block, as
``goal_jax.train.make_train_step`` sets it). Without such a block on several devices, or with a
batch the device count does not divide, ``"auto"`` uses the einsum kernel instead (explicit
``"pallas"`` raises).

Activation sharding (:func:`shard_batch`): under a mesh the models constrain the inputs and
outputs of every ResnetBlock2D, BasicTransformerBlock and CLIPEncoderLayer to the batch
sharding. Without it, XLA's SPMD partitioner resharded activations to follow the FSDP-sharded
weights: the SD-1.4 train step on a TPU v2-8 (FSDP over 8 cores, einsum attention) needed 13.01
GiB per core at 2 images per core (out of HBM); with it, 5.92 GiB (XLA:TPU's buffer
assignment, ``benchmarks/RESULTS.md``).

Both compute exactly what their textbook definitions (and the diffusers / transformers modules)
compute; they differ from ``jax.nn.dot_product_attention`` / ``lax.conv_general_dilated`` only in
how the work is laid out for XLA. Measured on a 2-core x86 CPU (jaxlib 0.10.2, float32,
``benchmarks/RESULTS.md``):

* attention with 8 heads of width 8 over 256 tokens, batch 2: ``jax.nn.dot_product_attention``
  1.09 ms forward / 5.8 ms forward + backward, :func:`dot_product_attention` 0.73 / 3.2 ms
  (batch 8: 6.7 / 44 ms vs 2.1 / 21 ms);
* 3x3 convolution on a 2x2x256 map, batch 2: ``lax.conv_general_dilated`` 1.56 ms (XLA:CPU swaps
  the operands of convolutions whose input is smaller than the padded window and reverses the
  kernel on every call), :func:`conv_general_dilated` 0.12 ms;
* CLIP's patch embedding (14x14 kernel, stride 14) of 31 112x112 images, forward + input
  gradient: 38.7 ms as a convolution, 10.4 ms as a reshape and one matrix product.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# Feature maps whose output has at most this many positions per image are convolved as one
# matrix product over gathered patches (im2col); larger ones go to lax.conv_general_dilated.
SMALL_MAP_POSITIONS = 16

ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "pallas", "cudnn")
# Token block of the Pallas TPU flash attention (its default block sizes; sequences are padded
# to a multiple of it).
PALLAS_BLOCK = 128
# The kernel takes a head dim of at most this, or a multiple of it (TPU vector lanes).
PALLAS_LANES = 128
# Mosaic (libtpu 0.0.42) cannot compile the flash kernel's bfloat16 / float16 matmuls for these
# TPU generations ("E2001 CompileTimeMosaicUnsupportedRhsType: Unsupported matmul RHS type on
# target: vector<128x128xbf16>"; float32 compiles; v4, v5e and v6e compile both), so
# pallas_tpu_attention runs the kernel in float32 there (jax.devices()[0].device_kind).
PALLAS_FLOAT32_KINDS = ("TPU v2", "TPU v3")
_TARGET_PLATFORM: list[Optional[str]] = [None]
_TARGET_DEVICE_KIND: list[Optional[str]] = [None]


@contextlib.contextmanager
def target_platform(platform: Optional[str],
                    device_kind: Optional[str] = None) -> Iterator[None]:
    """Within the block, ``attention="auto"`` resolves for ``platform`` ("tpu", "gpu", "cpu")
    instead of ``jax.default_backend()``, and the Pallas kernel is built for ``device_kind``
    (e.g. "TPU v2") instead of ``jax.devices()[0].device_kind`` (tracing for an ahead-of-time
    TPU compile on a host whose default backend is the CPU)."""
    if platform not in (None, "tpu", "gpu", "cuda", "rocm", "cpu"):
        raise ValueError(f"target_platform: unknown platform {platform!r} "
                         "(expected 'tpu', 'gpu' or 'cpu')")
    previous = _TARGET_PLATFORM[0], _TARGET_DEVICE_KIND[0]
    _TARGET_PLATFORM[0], _TARGET_DEVICE_KIND[0] = platform, device_kind
    try:
        yield
    finally:
        _TARGET_PLATFORM[0], _TARGET_DEVICE_KIND[0] = previous


def target_device_kind() -> Optional[str]:
    """The device kind programs are built for: the :func:`target_platform` block's, else that
    of ``jax.devices()[0]`` when the default backend is a TPU, else None."""
    if _TARGET_DEVICE_KIND[0] is not None:
        return _TARGET_DEVICE_KIND[0]
    if _TARGET_PLATFORM[0] in (None, "tpu") and jax.default_backend() == "tpu":
        return jax.devices()[0].device_kind
    return None


def resolve_attention(implementation: str, dtype=jnp.float32, head_dim: int = 64,
                      platform: Optional[str] = None) -> str:
    """The concrete kernel ("einsum", "pallas" or "cudnn") for ``implementation``.

    ``"auto"`` picks by platform (``platform`` argument, else the :func:`target_platform` block,
    else ``jax.default_backend()``): TPU -> "pallas"; GPU -> "cudnn" for bf16/fp16 inputs with
    ``head_dim`` a multiple of 8 and at most 128, else "einsum"; CPU -> "einsum".
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation != "auto":
        return implementation
    platform = platform or _TARGET_PLATFORM[0] or jax.default_backend()
    if platform == "tpu":
        return "pallas"
    if platform in ("gpu", "cuda", "rocm"):
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "einsum"
    return "einsum"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
              causal: bool = False, implementation: str = "auto") -> jax.Array:
    """Multi-head attention through the kernel ``implementation`` (see the module docstring).

    q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D] in ``q.dtype``; same result as
    :func:`dot_product_attention` up to float rounding.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected [B, T, H, D] inputs, got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    kind = resolve_attention(implementation, q.dtype, q.shape[-1])
    if kind == "pallas":
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            if jax.device_count() > 1 and implementation == "auto":
                # A Mosaic kernel cannot be partitioned automatically: without a mesh context
                # on several devices, "auto" keeps the einsum kernel.
                return dot_product_attention(q, k, v, scale=scale, causal=causal)
            return pallas_tpu_attention(q, k, v, scale=scale, causal=causal)
        if q.shape[0] % mesh.size:
            if implementation == "auto":
                return dot_product_attention(q, k, v, scale=scale, causal=causal)
            raise ValueError(f"attention: the Pallas kernel is split over the batch axis; "
                             f"batch {q.shape[0]} is not divisible by the {mesh.size} devices "
                             f"of the mesh {dict(mesh.shape)}")
        spec = P(tuple(mesh.axis_names))
        kernel = functools.partial(pallas_tpu_attention, scale=scale, causal=causal)
        return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q, k, v)
    if kind == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation="cudnn")
    return dot_product_attention(q, k, v, scale=scale, causal=causal)


def shard_batch(x: jax.Array) -> jax.Array:
    """``x`` constrained to have its leading (batch) axis split over all axes of the current
    mesh (``jax.set_mesh``), as the train step's batch is (``sharding.batch_sharding``).

    The models call it on block inputs and outputs: with FSDP-sharded weights XLA's SPMD
    partitioner may otherwise reshard activations to follow a weight's sharded channel axis
    (replicating their batch axis), which holds several images' activations per device.
    Identity without a mesh, on one device, or when the mesh size does not divide the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.ndim == 0 or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, P(tuple(mesh.axis_names)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         scale: Optional[float] = None, causal: bool = False,
                         block: int = PALLAS_BLOCK) -> jax.Array:
    """The Pallas TPU flash attention on [B, T, H, D] inputs -> [B, T, H, D] in ``q.dtype``.

    T and S are zero-padded to a multiple of ``block``; padded keys get segment id 0 and real
    keys (and all queries) segment id 1, so no real query attends to padding (with ``causal``
    and T == S the padded keys lie after every real query and are masked anyway). Padded query
    rows are dropped. A head dim above 128 that is not a multiple of 128 (SD-1.4's 1280-channel
    blocks have 8 heads of 160) is zero-padded to the next multiple of 128, as the kernel
    requires: zero columns of q and k leave every logit unchanged and zero columns of v give
    output columns that are dropped. On the TPU kinds of ``PALLAS_FLOAT32_KINDS`` (v2, v3),
    whose Mosaic compiler has no bfloat16 / float16 matmul, half-precision inputs are cast to
    float32 for the kernel (the output is cast back). Runs on TPU, or on any backend inside
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (slow; for tests).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"pallas_tpu_attention: causal needs T == S, got {q.shape[1]} and "
                         f"{k.shape[1]}")
    b, t, _, d = q.shape
    s = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    tp, sp = _round_up(t, block), _round_up(s, block)
    dp = _round_up(d, PALLAS_LANES) if d > PALLAS_LANES else d
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T|S, D]
    if target_device_kind() in PALLAS_FLOAT32_KINDS and jnp.dtype(q.dtype).itemsize < 4:
        qh, kh, vh = (x.astype(jnp.float32) for x in (qh, kh, vh))
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))
    kh, vh = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, dp - d))) for x in (kh, vh))
    segment_ids = None
    if sp != s and not causal:
        segment_ids = fa.SegmentIds(q=jnp.ones((b, tp), jnp.int32),
                                    kv=(jnp.arange(sp) < s).astype(jnp.int32)[None].repeat(b, 0))
    blocks = fa.BlockSizes(
        block_q=block, block_k_major=block, block_k=block, block_b=1,
        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
        block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    out = fa.flash_attention(qh, kh, vh, segment_ids=segment_ids, causal=causal,
                             sm_scale=float(scale), block_sizes=blocks)
    return jnp.swapaxes(out[:, :, :t, :d], 1, 2).astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          scale: Optional[float] = None, causal: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention, ``softmax(q k^T * scale) v`` per head.

    q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D] in ``q.dtype``. ``scale`` defaults to
    ``D ** -0.5``; ``causal`` masks key s > query t (T == S). Logits, the softmax and the output
    accumulation are float32 whatever the input dtype; the softmax normalisation is applied after
    the product with v (one division per output element instead of one per logit). The heads are
    moved in front of the tokens so that both products are plain batched matrix products.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"dot_product_attention: expected [B, T, H, D] inputs, got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, T|S, D]
    logits = jnp.einsum("bhtd,bhsd->bhts", qh, kh, preferred_element_type=jnp.float32) * scale
    if causal:
        t, s = logits.shape[-2:]
        if t != s:
            raise ValueError(f"dot_product_attention: causal needs T == S, got {t} and {s}")
        keep = jnp.tril(jnp.ones((t, s), dtype=bool))
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), vh,
                     preferred_element_type=jnp.float32)
    out = out / weights.sum(axis=-1)[..., None]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _patches_matmul(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], precision,
                    preferred_element_type) -> jax.Array:
    """NHWC x HWIO convolution as one matrix product over the gathered patches."""
    kh, kw, cin, cout = rhs.shape
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    sh, sw = strides
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    patches = jnp.concatenate(
        [lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1,
                                     x.shape[3]), (1, sh, sw, 1))
         for i in range(kh) for j in range(kw)], axis=-1)  # [B, oh, ow, kh*kw*cin]
    return jnp.einsum("bhwk,ko->bhwo", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision, preferred_element_type=preferred_element_type)


def _patchify_matmul(lhs: jax.Array, rhs: jax.Array, precision,
                     preferred_element_type) -> jax.Array:
    """NHWC x HWIO convolution with stride = kernel size and no padding (a patch embedding) as a
    reshape into non-overlapping patches and one matrix product. H, W divisible by the kernel."""
    kh, kw, cin, cout = rhs.shape
    b, h, w, _ = lhs.shape
    patches = lhs.reshape(b, h // kh, kh, w // kw, kw, cin).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // kh, w // kw, kh * kw * cin)
    return jnp.einsum("bhwk,ko->bhwo", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision, preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """Drop-in for ``lax.conv_general_dilated`` (pass it as ``nn.Conv(conv_general_dilated=...)``).

    NHWC / HWIO convolutions without dilation or groups are computed as one matrix product when
    the output has at most ``SMALL_MAP_POSITIONS`` positions per image (over the gathered kh*kw
    patches) or when the stride equals the kernel size without padding (a patch embedding);
    every other case calls ``lax.conv_general_dilated`` unchanged. Same result up to float32
    summation order.
    """
    simple = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
              and batch_group_count == 1
              and (not isinstance(padding, str) or padding == "VALID")
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and all(d == 1 for d in (rhs_dilation or (1, 1)))
              and dimension_numbers is not None
              and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
              and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
              and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
    if simple and padding == "VALID":
        padding = ((0, 0), (0, 0))
    if simple and rhs.shape[0] * rhs.shape[1] > 1:
        (pt, pb), (pl, pr) = padding
        if (tuple(window_strides) == tuple(rhs.shape[:2]) and pt == pb == pl == pr == 0
                and lhs.shape[1] % rhs.shape[0] == 0 and lhs.shape[2] % rhs.shape[1] == 0):
            return _patchify_matmul(lhs, rhs, precision, preferred_element_type)
        oh = (lhs.shape[1] + pt + pb - rhs.shape[0]) // window_strides[0] + 1
        ow = (lhs.shape[2] + pl + pr - rhs.shape[1]) // window_strides[1] + 1
        if oh * ow <= SMALL_MAP_POSITIONS:
            return _patches_matmul(lhs, rhs, window_strides, padding, precision,
                                   preferred_element_type)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
