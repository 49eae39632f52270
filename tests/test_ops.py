"""goal_jax.models.ops: the attention and convolution kernels equal their textbook definitions
(jax.nn.dot_product_attention / lax.conv_general_dilated) in values and gradients, on every
branch (small-map patches, patch embedding, fallback) and for the error cases; the fused Pallas
TPU flash attention (run on the CPU in Pallas' TPU interpret mode) equals the einsum kernel in
values and gradients, with and without token padding; the ``attention`` switch resolves per
platform and keeps the einsum kernel for the layers that sow attention maps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from goal_jax.models import ops

NHWC = ("NHWC", "HWIO", "NHWC")


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("b,t,s,h,d,causal", [
    (2, 9, 9, 3, 4, False), (2, 7, 5, 2, 8, False), (1, 6, 6, 2, 4, True), (3, 1, 4, 1, 16, False)])
def test_attention_matches_jax_reference(b, t, s, h, d, causal):
    rng = np.random.default_rng(0)
    q, k, v = _rand(rng, b, t, h, d), _rand(rng, b, s, h, d), _rand(rng, b, s, h, d)
    scale = 0.3

    def ours(q, k, v):
        return ops.dot_product_attention(q, k, v, scale=scale, causal=causal)

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=2e-6, rtol=0)
    w = _rand(rng, b, t, h, d)  # a random cotangent
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=0)
    # default scale is D ** -0.5
    np.testing.assert_allclose(ops.dot_product_attention(q, k, v, causal=causal),
                               jax.nn.dot_product_attention(q, k, v, is_causal=causal),
                               atol=2e-6, rtol=0)


def test_attention_bfloat16_keeps_float32_softmax():
    """bf16 inputs: the error against float32 attention on the same (rounded) inputs is only the
    bf16 rounding of the softmax weights and the output, and no larger than
    jax.nn.dot_product_attention's in bf16."""
    rng = np.random.default_rng(1)
    q, k, v = (_rand(rng, 2, 16, 2, 8).astype(jnp.bfloat16) * 4 for _ in range(3))
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = ops.dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    err_jax = float(jnp.max(jnp.abs(jax.nn.dot_product_attention(q, k, v).astype(jnp.float32)
                                    - ref)))
    assert err <= 0.01 * float(jnp.max(jnp.abs(ref)))
    assert err <= err_jax * 1.01


def test_attention_errors():
    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match=r"expected \[B, T, H, D\] inputs"):
        ops.dot_product_attention(x, x, x)
    q, k = jnp.zeros((1, 3, 1, 4)), jnp.zeros((1, 5, 1, 4))
    with pytest.raises(ValueError, match="causal needs T == S, got 3 and 5"):
        ops.dot_product_attention(q, k, k, causal=True)


# (T, S, causal, head dim): padded queries and keys (segment ids mask the 51 padded keys), no
# padding, causal self-attention padded 77 -> 128 (the CLIP text encoder's shape), and SD-1.4's
# 1280-channel cross-attention head dim 160, which the kernel only takes padded to 256.
PALLAS_CASES = [(130, 77, False, 8), (128, 128, False, 8), (77, 77, True, 8),
                (64, 200, False, 160)]


@pytest.mark.parametrize("t,s,causal,d", PALLAS_CASES)
def test_pallas_flash_attention_matches_einsum_in_interpret_mode(t, s, causal, d):
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(4)
    q, k, v = _rand(rng, 1, t, 2, d), _rand(rng, 1, s, 2, d), _rand(rng, 1, s, 2, d)
    w = _rand(rng, 1, t, 2, d)  # a random cotangent
    scale = 0.4

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * w)

    def einsum(q, k, v):
        return ops.attention(q, k, v, scale=scale, causal=causal, implementation="einsum")

    def pallas(q, k, v):
        return ops.attention(q, k, v, scale=scale, causal=causal, implementation="pallas")

    ref = einsum(q, k, v)
    g_ref = jax.grad(loss(einsum), argnums=(0, 1, 2))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        out = pallas(q, k, v)
        g_out = jax.grad(loss(pallas), argnums=(0, 1, 2))(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    grow = (d / 8) ** 0.5  # float32 rounding of a D-term dot product grows like sqrt(D)
    np.testing.assert_allclose(out, ref, atol=2e-6 * grow, rtol=0)
    for name, a, r in zip("qkv", g_out, g_ref):
        bound = 2e-5 * grow * max(1.0, float(jnp.max(jnp.abs(r))))
        assert float(jnp.max(jnp.abs(a - r))) <= bound, name


def test_resolve_attention_per_platform():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert ops.resolve_attention("auto", f32, 40, platform="tpu") == "pallas"
    assert ops.resolve_attention("auto", bf16, 160, platform="tpu") == "pallas"
    assert ops.resolve_attention("auto", bf16, 64, platform="gpu") == "cudnn"
    assert ops.resolve_attention("auto", f32, 64, platform="gpu") == "einsum"  # cuDNN: half only
    assert ops.resolve_attention("auto", bf16, 160, platform="gpu") == "einsum"  # D > 128
    assert ops.resolve_attention("auto", bf16, 40, platform="cpu") == "einsum"
    assert ops.resolve_attention("einsum", platform="tpu") == "einsum"
    assert ops.resolve_attention("auto") == "einsum"  # the tests' backend is the CPU
    with ops.target_platform("tpu"):
        assert ops.resolve_attention("auto") == "pallas"
    assert ops.resolve_attention("auto") == "einsum"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        ops.resolve_attention("flash")
    with pytest.raises(ValueError, match="unknown platform 'ipu'"):
        with ops.target_platform("ipu"):
            pass


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_pallas_kernel_runs_in_float32_on_tpu_v2_and_v3():
    """Mosaic has no bfloat16 matmul on TPU v2 / v3 (the SD-1.4 train step for a v2-8 failed
    to compile with E2001 there): for those kinds the kernel's operands are float32, for v5e
    (and when no TPU kind is known) they stay bfloat16; the output keeps the input dtype."""
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    seen = {}
    for kind in ("TPU v2", "TPU v3", "TPU v5 lite", None):
        with ops.target_platform("tpu", kind):
            assert ops.target_device_kind() == kind
            # a new function per kind: jit-style trace caches do not key on the block
            closed = jax.make_jaxpr(lambda a, b, c: ops.pallas_tpu_attention(a, b, c))(q, q, q)
        calls = [e for e in _eqns(closed.jaxpr) if e.primitive.name == "pallas_call"]
        assert len(calls) == 1, kind
        seen[kind] = {str(v.aval.dtype) for v in calls[0].invars}
        assert closed.out_avals[0].dtype == jnp.bfloat16, kind
    assert seen == {"TPU v2": {"float32"}, "TPU v3": {"float32"}, "TPU v5 lite": {"bfloat16"},
                    None: {"bfloat16"}}
    assert ops.target_device_kind() is None  # the tests' backend is the CPU
    q32 = q.astype(jnp.float32)
    with ops.target_platform("tpu", "TPU v2"):
        closed = jax.make_jaxpr(lambda a, b, c: ops.pallas_tpu_attention(a, b, c))(q32, q32, q32)
    assert closed.out_avals[0].dtype == jnp.float32


def test_attention_auto_on_cpu_is_the_einsum_kernel():
    rng = np.random.default_rng(5)
    q, k = _rand(rng, 2, 9, 2, 4), _rand(rng, 2, 5, 2, 4)
    np.testing.assert_array_equal(ops.attention(q, k, k), ops.dot_product_attention(q, k, k))
    with pytest.raises(ValueError, match=r"expected \[B, T, H, D\] inputs"):
        ops.attention(q[0], k, k)
    with pytest.raises(ValueError, match="causal needs T == S, got 9 and 5"):
        ops.pallas_tpu_attention(q, k, k, causal=True)


def test_maalign_layers_keep_einsum_under_any_attention_switch():
    """A layer that sows its probabilities computes them with the einsum kernel even when the
    switch asks for the fused kernel (which cannot expose them); no Pallas call is traced."""
    from goal_jax.models.attention import Attention

    rng = np.random.default_rng(6)
    x, ctx = _rand(rng, 1, 6, 8), _rand(rng, 1, 3, 8)
    layer = Attention(heads=2, dim_head=4, out_dim=8, record_probs=True, attention="pallas")
    params = layer.init(jax.random.PRNGKey(0), x, ctx)
    out, state = layer.apply(params, x, ctx, mutable=["intermediates"])
    probs = state["intermediates"]["attention_probs"][0]
    assert probs.shape == (1, 2, 6, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    plain = Attention(heads=2, dim_head=4, out_dim=8, attention="einsum")
    np.testing.assert_allclose(out, plain.apply(params, x, ctx), atol=1e-6, rtol=0)
    assert "pallas_call" not in str(jax.make_jaxpr(
        lambda x: layer.apply(params, x, ctx, mutable=["intermediates"]))(x))


def test_unet_rejects_unknown_attention():
    from benchmarks import models as bm
    from goal_jax.models import unet as unet_lib

    config = unet_lib.UNet2DConditionConfig.from_dict(bm.SIZES["tiny"].unet, source="tiny")
    with pytest.raises(ValueError, match="attention must be one of"):
        unet_lib.UNet2DConditionModel(config=config, attention="flash")


# (input B,H,W,Cin; kernel; stride; padding; expected branch)
CONVS = [
    ((2, 2, 2, 5), (3, 3), (1, 1), ((1, 1), (1, 1)), "patches"),      # 2x2 map
    ((2, 4, 4, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), "patches"),      # 4x4 = 16 positions
    ((1, 3, 5, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), "patches"),      # odd, non-square
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1)), "patches"),      # stride-2 -> 4x4
    ((1, 7, 7, 2), (3, 3), (2, 2), ((0, 1), (0, 1)), "patches"),      # VAE downsample pad
    ((3, 12, 12, 3), (4, 4), (4, 4), "VALID", "patchify"),            # patch embedding 3x3
    ((2, 16, 16, 3), (4, 4), (4, 4), ((0, 0), (0, 0)), "patchify"),
    ((1, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), "lax"),          # 64 positions
    ((1, 22, 22, 2), (4, 4), (4, 4), "VALID", "lax"),                 # 22 not divisible by 4
]


@pytest.mark.parametrize("in_shape,kernel,stride,padding,branch", CONVS)
def test_conv_matches_lax(in_shape, kernel, stride, padding, branch, monkeypatch):
    rng = np.random.default_rng(2)
    x = _rand(rng, *in_shape)
    w = _rand(rng, *kernel, in_shape[-1], 6) * 0.2
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    calls = []
    real = lax.conv_general_dilated
    monkeypatch.setattr(ops.lax, "conv_general_dilated",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def ours(x, w):
        return ops.conv_general_dilated(x, w, stride, padding, dimension_numbers=dn)

    def ref(x, w):
        return real(x, w, stride, padding, dimension_numbers=dn)

    out = ours(x, w)
    assert bool(calls) == (branch == "lax")  # the expected branch ran
    np.testing.assert_allclose(out, ref(x, w), atol=3e-6, rtol=0)
    cot = _rand(rng, *out.shape)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1))(x, w)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=0)


def test_flax_conv_with_ops_keeps_parameters_and_values():
    rng = np.random.default_rng(3)
    x = _rand(rng, 2, 2, 2, 4)
    plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    fast = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)),
                   conv_general_dilated=ops.conv_general_dilated)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        fast.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), atol=3e-6, rtol=0)


def test_shard_batch_constrains_the_batch_axis_under_a_mesh():
    """Under jax.set_mesh the models' activations keep the batch axis split over the whole
    mesh (the FSDP program's activation constraint); identity without a mesh or when the
    mesh does not divide the batch."""
    from goal_jax import sharding as sharding_lib

    x = jnp.arange(8 * 3 * 2, dtype=jnp.float32).reshape(8, 3, 2)
    assert ops.shard_batch(x) is x  # no mesh
    mesh = sharding_lib.create_mesh(data=2, fsdp=4)
    # weights-like input sharded on the last axis: the constraint moves the split to the batch
    src = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, None, "data")))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda a: ops.shard_batch(a * 2.0))(src)
        odd = jax.jit(lambda a: ops.shard_batch(a))(jnp.ones((6, 2)))
    assert out.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out.addressable_shards} == {(1, 3, 2)}
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
    assert odd.sharding.is_fully_replicated or odd.sharding.spec[0] is None
