"""Two compute kernels shared by the models: multi-head attention and a convolution that avoids
XLA:CPU's slow path for tiny feature maps.

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

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Feature maps whose output has at most this many positions per image are convolved as one
# matrix product over gathered patches (im2col); larger ones go to lax.conv_general_dilated.
SMALL_MAP_POSITIONS = 16


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
