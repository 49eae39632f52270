"""GLIGEN U-Net: parity with diffusers' torch UNet2DConditionModel, attention maps, remat,
the SD-1.4 GLIGEN config, export round trip and error paths.

Models are tiny random diffusers U-Nets whose every parameter is perturbed (so zero-initialised
biases, unit norm scales, the GLIGEN gates alpha_attn/alpha_dense and the null features all
matter), saved with ``save_pretrained`` and loaded with ``weights.load_unet``. Forward passes are
jit-compiled once per (model, input shapes) and reused across tests: on CPU, eager execution
compiles every primitive separately and is several times slower than one jit compile.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.attention_processor import AttnProcessor
from flax import traverse_util

from goal_jax import diffusers_fuser, weights
from goal_jax.models import unet as unet_lib

torch.set_num_threads(1)  # 2 shared cores: torch's thread pool only adds contention

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sd14_gligen_unet_config.json")
TOL = 1e-4

# Two levels, GLIGEN, 1x1-conv projections.
GATED2 = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
              cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8, sample_size=8,
              attention_type="gated")
# Two levels, no GLIGEN, linear projections, upcast attention, 2 transformer blocks per module.
PLAIN2 = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
              cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8, sample_size=8,
              use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2)
# Three levels, GLIGEN, linear projections, per-level heads, 2 resnets per down block.
GATED3 = dict(block_out_channels=(16, 32, 32),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              layers_per_block=2, cross_attention_dim=16, attention_head_dim=(1, 2, 4),
              norm_num_groups=8, sample_size=8, use_linear_projection=True,
              attention_type="gated", freq_shift=1, flip_sin_to_cos=False)


def make_torch_unet(config, seed=0):
    """A diffusers U-Net with every parameter perturbed (alphas ~0.5, null features ~N(0,1))."""
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.5 + 0.3 * torch.rand(()).item())
            elif "null_" in name:
                p.normal_()
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder)."""
    out = {}
    for i, (name, cfg) in enumerate((("gated2", GATED2), ("plain2", PLAIN2), ("gated3", GATED3))):
        model = make_torch_unet(cfg, seed=i)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def inputs(cfg, batch=2, size=8, tokens=5, boxes=3, seed=0):
    rng = np.random.default_rng(seed)
    d = cfg["cross_attention_dim"]
    x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    t = np.array([17, 503, 999][:batch])
    ctx = rng.standard_normal((batch, tokens, d)).astype(np.float32)
    masks = np.zeros((batch, boxes), np.float32)
    masks[0, :2] = 1  # sample 0: two boxes + one padded slot; sample 1: one box
    masks[1:, :1] = 1
    grounding = {"boxes": rng.uniform(0, 1, (batch, boxes, 4)).astype(np.float32),
                 "phrase_embeds": rng.standard_normal((batch, boxes, d)).astype(np.float32),
                 "masks": masks}
    return x, t, ctx, grounding


def run_torch(model, x, t, ctx, grounding=None, fuser_enabled=True):
    for module in model.modules():
        if type(module) is GatedSelfAttentionDense:
            module.enabled = fuser_enabled
    kwargs = {}
    if grounding is not None:
        kwargs["cross_attention_kwargs"] = {"gligen": {
            "boxes": torch.from_numpy(grounding["boxes"]),
            "positive_embeddings": torch.from_numpy(grounding["phrase_embeds"]),
            "masks": torch.from_numpy(grounding["masks"])}}
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs)
    for module in model.modules():
        if type(module) is GatedSelfAttentionDense:
            module.enabled = True
    return out.sample.numpy()


_JITTED = {}


def jitted(model, maps=False):
    """jit(apply) shared by every model with the same config and options."""
    key = (model.config, model.dtype, model.remat, model.attention_maps, maps)
    if key not in _JITTED:
        def forward(params, x, t, ctx, grounding, scale):
            kwargs = {"mutable": ["intermediates"]} if maps else {}
            return model.apply({"params": params}, x, t, ctx, grounding=grounding,
                               gligen_scale=scale, **kwargs)
        _JITTED[key] = jax.jit(forward)
    return _JITTED[key]


def run_jax(model, params, x, t, ctx, grounding=None, gligen_scale=1.0, maps=False):
    """x NCHW numpy -> eps NCHW numpy (and the sowed maps when ``maps``)."""
    out = jitted(model, maps)(params, x.transpose(0, 2, 3, 1), t, ctx, grounding,
                              jnp.float32(gligen_scale))
    if maps:
        eps, state = out
        return np.asarray(eps).transpose(0, 3, 1, 2), _maps(state)
    return np.asarray(out).transpose(0, 3, 1, 2)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------------------------
# Parity.
# ----------------------------------------------------------------------------------------------


def test_gligen_parity_grounding_scale_zero_and_no_grounding(saved):
    torch_model, folder = saved["gated2"]
    model, params = weights.load_unet(folder, require_grounding=True)
    x, t, ctx, g = inputs(GATED2)

    ref_on = run_torch(torch_model, x, t, ctx, g)
    ref_off = run_torch(torch_model, x, t, ctx, g, fuser_enabled=False)
    ref_none = run_torch(torch_model, x, t, ctx)

    d_on = max_diff(run_jax(model, params, x, t, ctx, g, 1.0), ref_on)
    d_off = max_diff(run_jax(model, params, x, t, ctx, g, 0.0), ref_off)
    compiled = jitted(model)._cache_size()  # scale 1 and 0 share one compiled program
    d_none = max_diff(run_jax(model, params, x, t, ctx, None), ref_none)
    fuser_effect = max_diff(ref_on, ref_off)
    print(f"gated2: grounding {d_on:.2e}, scale0 vs disabled fuser {d_off:.2e}, no grounding "
          f"{d_none:.2e}; fuser changes eps by {fuser_effect:.3f}; compilations for "
          f"scale 1 and 0: {compiled}")
    assert compiled == 1
    assert fuser_effect > 1e-2  # the fuser really contributes
    assert max(d_on, d_off, d_none) <= TOL
    # Fuser disabled by scale 0 equals the model run without grounding up to rounding.
    assert max_diff(ref_off, ref_none) <= 1e-5


def test_padded_slots_use_null_features(saved):
    """Garbage in masked slots must not change the output."""
    _, folder = saved["gated2"]
    model, params = weights.load_unet(folder)
    x, t, ctx, g = inputs(GATED2)
    g2 = dict(g)
    g2["boxes"] = np.where(g["masks"][..., None] > 0, g["boxes"], 7.0).astype(np.float32)
    g2["phrase_embeds"] = np.where(g["masks"][..., None] > 0, g["phrase_embeds"],
                                   -3.0).astype(np.float32)
    d = max_diff(run_jax(model, params, x, t, ctx, g), run_jax(model, params, x, t, ctx, g2))
    print(f"padded-slot garbage changes eps by {d:.2e}")
    assert d == 0.0


def test_non_gated_linear_projection_parity_and_grounding_error(saved):
    torch_model, folder = saved["plain2"]
    model, params = weights.load_unet(folder)
    assert not model.config.is_gligen and model.config.use_linear_projection
    x, t, ctx, g = inputs(PLAIN2)
    d = max_diff(run_jax(model, params, x, t, ctx), run_torch(torch_model, x, t, ctx))
    print(f"plain2 (linear proj, upcast, 2 transformer blocks): {d:.2e}")
    assert d <= TOL
    with pytest.raises(ValueError, match="has no position net"):
        model.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx, grounding=g)


def test_three_level_gligen_parity_odd_size(saved):
    torch_model, folder = saved["gated3"]
    model, params = weights.load_unet(folder)
    # 10x10 latents: 10 -> 5 -> 3 on the way down, so the decoder upsamples 3 -> 5 -> 10 with
    # diffusers' forwarded upsample sizes; a scalar timestep is broadcast to the batch.
    x, _, ctx, g = inputs(GATED3, size=10, seed=10)
    t = np.array(250)
    d = max_diff(run_jax(model, params, x, t, ctx, g), run_torch(torch_model, x, t, ctx, g))
    print(f"gated3 (3 levels, linear proj, heads (1,2,4), 10x10, scalar t): {d:.2e}")
    assert d <= TOL


# ----------------------------------------------------------------------------------------------
# Cross-attention maps and remat.
# ----------------------------------------------------------------------------------------------


class CaptureProcessor(AttnProcessor):
    """diffusers' reference attention processor that also keeps the attention probabilities."""

    probs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        self.probs = attn.get_attention_scores(q, k, None)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _maps(state):
    flat = traverse_util.flatten_dict(state.get("intermediates", {}), sep="/")
    return {k[: -len("/attention_probs")]: v[0] for k, v in flat.items()}


def _sowed_layers(model, params, x, t, ctx, grounding=None):
    """Names of the sowed maps, from shapes only (no compilation)."""
    _, state = jax.eval_shape(
        lambda p: model.apply({"params": p}, x.transpose(0, 2, 3, 1), t, ctx,
                              grounding=grounding, mutable=["intermediates"]), params)
    return set(_maps(state))


def test_attention_maps_and_remat_gradients_match_diffusers(saved):
    """remat=True with maps of "up_blocks_1": the sowed maps (shape, rows sum to 1, the values of
    diffusers' attention probabilities), eps, and the gradient of mean(eps^2) w.r.t. every
    parameter (fuser gates and position net included) match diffusers' autograd."""
    torch_model, folder = saved["gated2"]
    x, t, ctx, g = inputs(GATED2, seed=1)
    model, params = weights.load_unet(folder, remat=True, attention_maps=("up_blocks_1",))

    def loss(p):
        eps, state = model.apply({"params": p}, x.transpose(0, 2, 3, 1), t, ctx, grounding=g,
                                 mutable=["intermediates"])
        return jnp.mean(eps ** 2), (eps, state)

    (value, (eps, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    maps = _maps(state)

    capture = CaptureProcessor()
    attn2 = torch_model.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    default = attn2.processor
    attn2.set_processor(capture)
    torch_model.zero_grad()
    kwargs = {"gligen": {"boxes": torch.from_numpy(g["boxes"]),
                         "positive_embeddings": torch.from_numpy(g["phrase_embeds"]),
                         "masks": torch.from_numpy(g["masks"])}}
    out = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                      cross_attention_kwargs=kwargs).sample
    ref_loss = (out ** 2).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad.numpy().copy() for n, p in torch_model.named_parameters()}
    torch_model.zero_grad()
    attn2.set_processor(default)

    # maps: exactly the selected layers, [B, heads, h*w, T], rows sum to 1, diffusers' values
    assert set(maps) == {"up_blocks_1/attentions_0/transformer_blocks_0/attn2",
                         "up_blocks_1/attentions_1/transformer_blocks_0/attn2"}
    heads = GATED2["attention_head_dim"]
    row_err = 0.0
    for probs in maps.values():
        assert probs.shape == (2, heads, 8 * 8, ctx.shape[1]) and probs.dtype == jnp.float32
        row_err = max(row_err, float(jnp.max(jnp.abs(probs.sum(-1) - 1.0))))
    ref_probs = capture.probs.detach().numpy().reshape(2, heads, 64, ctx.shape[1])
    d_probs = max_diff(maps["up_blocks_1/attentions_0/transformer_blocks_0/attn2"], ref_probs)

    ours = weights.to_state_dict(grads)
    assert set(ours) == set(ref_grads)
    d_grad = max(max_diff(ours[n], ref_grads[n]) for n in ours)
    g_max = max(float(np.max(np.abs(v))) for v in ref_grads.values())
    d_eps = max_diff(np.asarray(eps).transpose(0, 3, 1, 2), out.detach().numpy())
    print(f"remat + maps: maps vs diffusers probs {d_probs:.2e} (rows sum to 1 within "
          f"{row_err:.1e}); loss {float(value):.6f} vs {ref_loss.item():.6f}; eps {d_eps:.2e}; "
          f"grads max abs diff {d_grad:.2e} (max |grad| {g_max:.2e})")
    assert row_err <= 1e-5 and d_probs <= 1e-5
    assert d_eps <= TOL and abs(float(value) - ref_loss.item()) <= 1e-5
    assert d_grad <= 1e-4 * max(1.0, g_max)
    for name in ("up_blocks.1.attentions.0.transformer_blocks.0.fuser.alpha_attn",
                 "position_net.linears.0.weight", "position_net.null_positive_feature"):
        assert float(np.max(np.abs(ours[name]))) > 0


def _sowed_layers(model, params, x, t, ctx, grounding=None):
    """Names of the sowed maps, from shapes only (no compilation)."""
    _, state = jax.eval_shape(
        lambda p: model.apply({"params": p}, x.transpose(0, 2, 3, 1), t, ctx,
                              grounding=grounding, mutable=["intermediates"]), params)
    return set(_maps(state))


def test_attention_map_selection(saved):
    _, folder = saved["gated2"]
    x, t, ctx, g = inputs(GATED2)
    model, params = weights.load_unet(folder)
    build = lambda sel: unet_lib.UNet2DConditionModel(model.config, attention_maps=sel)  # noqa
    assert _sowed_layers(build(("up_blocks_1/attentions_1",)), params, x, t, ctx) == {
        "up_blocks_1/attentions_1/transformer_blocks_0/attn2"}
    assert _sowed_layers(build(("mid_block", "down_blocks_0/attentions_0")), params, x, t, ctx,
                         g) == {"mid_block/attentions_0/transformer_blocks_0/attn2",
                                "down_blocks_0/attentions_0/transformer_blocks_0/attn2"}
    assert _sowed_layers(model, params, x, t, ctx, g) == set()  # no selection: nothing sowed
    with pytest.raises(ValueError, match=r"attention_maps \['up_blocks_7'\] match no"):
        _sowed_layers(build(("up_blocks_7",)), params, x, t, ctx)


# ----------------------------------------------------------------------------------------------
# The real SD-1.4 GLIGEN configuration.
# ----------------------------------------------------------------------------------------------


def test_sd14_gligen_config_param_count_and_16x16_layers():
    with open(FIXTURE) as f:
        raw = json.load(f)
    config = unet_lib.UNet2DConditionConfig.from_dict(raw, source=FIXTURE)
    assert config.is_gligen and config.sample_size == 64
    assert config.block_out_channels == (320, 640, 1280, 1280)
    assert unet_lib.UNet2DConditionConfig.from_dict(config.to_dict()) == config

    model = unet_lib.UNet2DConditionModel(config)
    shapes = weights.param_shapes(model, *model.dummy_inputs())
    flat = traverse_util.flatten_dict(shapes, sep="/")
    count = lambda pred: int(sum(np.prod(v.shape) for k, v in flat.items() if pred(k)))  # noqa
    total = count(lambda k: True)
    gligen = count(lambda k: "/fuser/" in k or k.startswith("position_net/"))
    attn = count(lambda k: "/attn1/" in k or "/attn2/" in k)

    with torch.device("meta"):
        ref = TorchUNet.from_config(raw)
    ref_params = dict(ref.named_parameters())
    ref_total = sum(p.numel() for p in ref_params.values())
    ref_gligen = sum(p.numel() for n, p in ref_params.items()
                     if ".fuser." in n or n.startswith("position_net."))
    ref_attn = sum(p.numel() for n, p in ref_params.items() if ".attn1." in n or ".attn2." in n)
    print(f"SD-1.4 GLIGEN U-Net params: total {total:,} (diffusers {ref_total:,}); "
          f"fuser + position net {gligen:,} (diffusers {ref_gligen:,}); attn1 + attn2 "
          f"{attn:,} (diffusers {ref_attn:,})")
    assert (total, gligen, attn) == (ref_total, ref_gligen, ref_attn)
    # identical names and (layout-converted) shapes, not only counts
    def torch_shape(path, shape):
        if path.endswith("/kernel") and len(shape) == 2:
            return shape[::-1]
        if path.endswith("/kernel") and len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
        return shape

    ours = {weights.torch_name(k.split("/")): torch_shape(k, tuple(v.shape))
            for k, v in flat.items()}
    assert ours == {n: tuple(p.shape) for n, p in ref_params.items()}

    layers = unet_lib.cross_attention_layers(config, "up", 16)
    assert layers == ("up_blocks_1/attentions_0", "up_blocks_1/attentions_1",
                      "up_blocks_1/attentions_2")
    assert unet_lib.cross_attention_layers(config, "mid", 8) == ("mid_block/attentions_0",)
    assert unet_lib.cross_attention_layers(config, "down", 64) == (
        "down_blocks_0/attentions_0", "down_blocks_0/attentions_1")
    assert unet_lib.cross_attention_layers(config, "up", 32, sample_size=128) == layers
    with pytest.raises(ValueError, match=r"no up cross-attention layers at resolution 12 .*"
                                         r"\[16, 32, 64\]"):
        unet_lib.cross_attention_layers(config, "up", 12)


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------


def test_export_round_trip_to_diffusers(tmp_path):
    config = unet_lib.UNet2DConditionConfig.from_dict(GATED2)
    model = unet_lib.UNet2DConditionModel(config)
    rng = np.random.default_rng(3)

    def random_param(path, spec):  # fan-in scaled kernels; non-trivial gates, norms, biases
        name = path[-1].key
        if name in ("alpha_attn", "alpha_dense"):
            return jnp.float32(rng.uniform(0.3, 0.8))
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(spec.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(0.1 * noise)

    params = jax.tree_util.tree_map_with_path(
        random_param, weights.param_shapes(model, *model.dummy_inputs()))
    folder = str(tmp_path / "exported")
    weights.save_unet(folder, model, params)
    torch_model = TorchUNet.from_pretrained(folder).eval()
    x, t, ctx, g = inputs(GATED2, seed=5)
    d = max_diff(run_jax(model, params, x, t, ctx, g), run_torch(torch_model, x, t, ctx, g))
    _, reloaded = weights.load_unet(folder)
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, reloaded))
    print(f"export -> diffusers from_pretrained: max abs diff {d:.2e}; reload bit-exact {same}")
    assert d <= TOL and same


def test_fuser_position_embedding_acts_in_the_fusers_only(tmp_path):
    """goal_jax's fuser position embedding: same parameters as diffusers' GLIGEN U-Net, the
    config key diffusers ignores; without grounding the output equals diffusers', with it the
    visual tokens' places change the output (diffusers, which drops the embedding, differs)."""
    from goal_jax.models import attention as attention_lib

    config = unet_lib.UNet2DConditionConfig.from_dict(
        dict(GATED2, fuser_position_embedding="sinusoidal_2d"))
    assert config.fuser_position_embedding == "sinusoidal_2d"
    assert unet_lib.UNet2DConditionConfig.from_dict(config.to_dict()) == config
    plain_config = unet_lib.UNet2DConditionConfig.from_dict(GATED2)
    assert "fuser_position_embedding" not in plain_config.to_dict()  # diffusers' keys only
    model = unet_lib.UNet2DConditionModel(config)
    plain = unet_lib.UNet2DConditionModel(plain_config)
    shapes = weights.param_shapes(model, *model.dummy_inputs())
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        weights.param_shapes(plain, *plain.dummy_inputs()))
    torch_model = make_torch_unet(GATED2, seed=4)
    torch_model.save_pretrained(str(tmp_path / "torch"))
    _, params = weights.load_unet(str(tmp_path / "torch"))
    x, t, ctx, g = inputs(GATED2, seed=6)
    with_pe = run_jax(model, params, x, t, ctx, g)
    d_plain = max_diff(run_jax(plain, params, x, t, ctx, g), run_torch(torch_model, x, t, ctx, g))
    d_ungrounded = max_diff(run_jax(model, params, x, t, ctx),
                            run_torch(torch_model, x, t, ctx))
    d_pe = max_diff(with_pe, run_torch(torch_model, x, t, ctx, g))
    print(f"fuser PE: diffusers vs goal_jax without PE {d_plain:.1e}, without grounding "
          f"{d_ungrounded:.1e}, with PE and grounding {d_pe:.2e}")
    assert d_plain <= TOL and d_ungrounded <= TOL and d_pe > 100 * TOL
    # The saved folder keeps the key; diffusers loads it (ignoring the key).
    weights.save_unet(str(tmp_path / "pe"), model, params)
    assert weights.read_config(str(tmp_path / "pe"))["fuser_position_embedding"] == \
        "sinusoidal_2d"
    reloaded, _ = weights.load_unet(str(tmp_path / "pe"))
    assert reloaded.config.fuser_position_embedding == "sinusoidal_2d"
    diffusers_pe = TorchUNet.from_pretrained(str(tmp_path / "pe")).eval()
    assert max_diff(run_torch(diffusers_pe, x, t, ctx, g),
                    run_torch(torch_model, x, t, ctx, g)) <= TOL
    # With goal_jax's hooks diffusers computes what goal_jax computes (4 fusers: down 1,
    # mid 1, up 2).
    assert diffusers_fuser.add_fuser_position_embedding(diffusers_pe, str(tmp_path / "pe")) == 4
    d_hooked = max_diff(run_torch(diffusers_pe, x, t, ctx, g), with_pe)
    print(f"fuser PE: diffusers with add_fuser_position_embedding vs goal_jax {d_hooked:.1e}")
    assert d_hooked <= TOL
    assert max_diff(run_torch(diffusers_pe, x, t, ctx), run_torch(torch_model, x, t, ctx)) <= TOL
    with pytest.raises(ValueError, match="this U-Net has it already"):
        diffusers_fuser.add_fuser_position_embedding(diffusers_pe, str(tmp_path / "pe"))
    assert diffusers_fuser.add_fuser_position_embedding(torch_model, str(tmp_path / "torch")) == 0

    pe = attention_lib.sinusoidal_2d(3, 5, 10)  # q = 2 frequencies; 2 zero channels
    assert pe.shape == (15, 10) and np.all(pe[:, 8:] == 0)
    assert len({tuple(np.round(row, 6)) for row in pe}) == 15  # every place its own code
    # One cycle per side: the angle of (sin, cos) at the lowest frequency is the place.
    v = np.arctan2(pe[:, 0], pe[:, 2]) / (2 * np.pi) % 1  # channels [sin v, cos v, sin u, cos u]
    u = np.arctan2(pe[:, 4], pe[:, 6]) / (2 * np.pi) % 1  # x q frequencies each
    np.testing.assert_allclose(v, np.repeat((np.arange(3) + 0.5) / 3, 5), atol=1e-6)
    np.testing.assert_allclose(u, np.tile((np.arange(5) + 0.5) / 5, 3), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------


def _rewrite(src, dst, edit):
    state = weights.read_state_dict(src, ("diffusion_pytorch_model",))
    edit(state)
    weights.write_safetensors(dst, state, weights.read_config(src), "diffusion_pytorch_model")
    return dst


def test_checkpoint_errors(saved, tmp_path):
    _, gated = saved["gated2"]
    _, plain = saved["plain2"]

    def drop(state):
        del state["up_blocks.1.attentions.0.transformer_blocks.0.fuser.alpha_attn"]

    with pytest.raises(weights.CheckpointError,
                       match=r"missing keys \(1\): up_blocks\.1\.attentions\.0\.transformer_blocks"
                             r"\.0\.fuser\.alpha_attn"):
        weights.load_unet(_rewrite(gated, str(tmp_path / "missing"), drop))

    def reshape(state):
        state["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)

    with pytest.raises(weights.CheckpointError,
                       match=r"shape mismatches \(1\): conv_in\.weight: "
                             r"checkpoint \(32, 4, 5, 5\)"):
        weights.load_unet(_rewrite(gated, str(tmp_path / "shape"), reshape))

    def extra(state):
        state["position_net.linears.6.weight"] = np.zeros((3, 3), np.float32)

    with pytest.raises(weights.CheckpointError,
                       match=r"unexpected keys \(1\): position_net\.linears\.6\.weight"):
        weights.load_unet(_rewrite(gated, str(tmp_path / "extra"), extra))

    with pytest.raises(weights.CheckpointError, match="the checkpoint has no position net"):
        weights.load_unet(plain, require_grounding=True)


@pytest.mark.parametrize("key,value,message", [
    ("class_embed_type", "timestep", r"'class_embed_type' = 'timestep' is not supported"),
    ("addition_embed_type", "text", r"'addition_embed_type' = 'text' is not supported"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"],
     r"'down_block_types' holds unsupported block type 'AttnDownBlock2D'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", r"'mid_block_type' = "),
    ("attention_type", "gated-text-image", r"'attention_type' = 'gated-text-image'"),
    ("only_cross_attention", True, r"'only_cross_attention' = True"),
    ("attention_head_dim", [2, 2, 2], r"'attention_head_dim' must be a positive int or a list "
                                      r"of 2"),
    ("norm_num_groups", 7, r"'norm_num_groups' = 7 does not divide"),
    ("cross_attention_dim", None, r"'cross_attention_dim' is missing"),
    ("block_out_channels", "32,64", r"'block_out_channels' must be a list"),
    ("fuser_position_embedding", "learned",
     r"'fuser_position_embedding' = 'learned' is not supported \(supported: null or "
     r"'sinusoidal_2d'\)"),
])
def test_config_errors(key, value, message):
    d = dict(GATED2)
    d[key] = value
    with pytest.raises(ValueError, match=r"my/unet/config\.json: config key " + message):
        unet_lib.UNet2DConditionConfig.from_dict(d, source="my/unet/config.json")


def test_fuser_position_embedding_needs_fusers():
    with pytest.raises(ValueError, match=r"my/unet/config\.json: config key "
                       r"'fuser_position_embedding' = 'sinusoidal_2d' needs GLIGEN fusers "
                       r"\(attention_type 'gated'\), got attention_type 'default'"):
        unet_lib.UNet2DConditionConfig.from_dict(
            dict(PLAIN2, fuser_position_embedding="sinusoidal_2d"), source="my/unet/config.json")


def test_input_errors(saved):
    _, folder = saved["gated2"]
    model, params = weights.load_unet(folder)
    x, t, ctx, g = inputs(GATED2)
    xs = x.transpose(0, 2, 3, 1)
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
    with pytest.raises(ValueError,
                       match=r"sample must be \[B, h, w, 4\].*got shape \(2, 4, 8, 8\)"):
        apply(x, t, ctx)  # NCHW instead of NHWC
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2, T, 32\]"):
        apply(xs, t, ctx[..., :16])
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or \[2\]"):
        apply(xs, np.arange(3), ctx)
    with pytest.raises(ValueError, match=r"grounding is missing \['masks'\]"):
        apply(xs, t, ctx, grounding={k: v for k, v in g.items() if k != "masks"})
    with pytest.raises(ValueError, match=r"grounding\['phrase_embeds'\] must be \[2, 3, 32\]"):
        apply(xs, t, ctx, grounding=dict(g, phrase_embeds=g["phrase_embeds"][..., :8]))
