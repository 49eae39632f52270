"""goal_jax.models.vae against diffusers' PyTorch AutoencoderKL (tiny random models)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.numpy import load_file

from goal_jax import weights
from goal_jax.models import vae as vae_lib

TWO_LEVELS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                  latent_channels=4, sample_size=32)
THREE_LEVELS = dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                    latent_channels=4, sample_size=32, scaling_factor=0.5)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _torch_vae(seed: int, **kw) -> TorchVAE:
    levels = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    model = TorchVAE(down_block_types=("DownEncoderBlock2D",) * levels,
                     up_block_types=("UpDecoderBlock2D",) * levels, **kw).eval()
    with torch.no_grad():  # move norms/biases off their 1 / 0 init so every parameter matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=[TWO_LEVELS, THREE_LEVELS], ids=["2levels", "3levels"])
def saved(request, tmp_path_factory):
    """(torch model, folder written by save_pretrained, config kwargs)."""
    model = _torch_vae(0, **request.param)
    folder = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(folder)
    return model, folder, request.param


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = _torch_vae(1, **TWO_LEVELS)
    folder = str(tmp_path_factory.mktemp("vae_small"))
    model.save_pretrained(folder)
    return model, folder


def _inputs(cfg: dict, batch: int = 2):
    rs = np.random.RandomState(0)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = rs.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
    z = rs.randn(batch, 32 // f, 32 // f, cfg["latent_channels"]).astype(np.float32)
    return x, z


def test_parity_with_diffusers(saved):
    torch_vae, folder, cfg = saved
    vae, params = weights.load_vae(folder)
    assert vae.config.block_out_channels == cfg["block_out_channels"]
    assert vae.config.scaling_factor == cfg.get("scaling_factor", 0.18215)
    assert weights.count_params(params) == sum(p.numel() for p in torch_vae.parameters())
    x, z = _inputs(cfg)

    posterior = vae.apply({"params": params}, jnp.asarray(x), method="encode")
    decoded = vae.apply({"params": params}, jnp.asarray(z), method="decode")
    with torch.no_grad():
        ref = torch_vae.encode(_nchw(x)).latent_dist
        ref_decoded = _nhwc(torch_vae.decode(_nchw(z)).sample)
    f = vae.config.downsample_factor
    assert posterior.mean.shape == (2, 32 // f, 32 // f, 4)
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == jnp.float32
    d_mean = float(np.abs(np.asarray(posterior.mean) - _nhwc(ref.mean)).max())
    d_logvar = float(np.abs(np.asarray(posterior.logvar) - _nhwc(ref.logvar)).max())
    d_dec = float(np.abs(np.asarray(decoded) - ref_decoded).max())
    print(f"\n{cfg['block_out_channels']}: max|d mean| {d_mean:.2e} max|d logvar| "
          f"{d_logvar:.2e} max|d decode| {d_dec:.2e} (|decode| max {np.abs(ref_decoded).max():.2f})")
    assert d_mean <= 1e-4 and d_logvar <= 1e-4 and d_dec <= 1e-4
    np.testing.assert_allclose(np.asarray(posterior.std), _nhwc(ref.std), rtol=1e-4, atol=1e-5)

    # Reconstruction (__call__) = decode(posterior mean), as diffusers' forward().
    recon = vae.apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        ref_recon = _nhwc(torch_vae(_nchw(x)).sample)
    assert float(np.abs(np.asarray(recon) - ref_recon).max()) <= 1e-4


def test_config_round_trip(saved):
    torch_vae, folder, _ = saved
    config = weights.load_vae(folder)[0].config
    assert vae_lib.AutoencoderKLConfig.from_dict(config.to_dict()) == config
    rebuilt = TorchVAE.from_config(config.to_dict())
    public = {k for k in torch_vae.config if not k.startswith("_")}
    assert public == set(config.to_dict()) - {"_class_name"}
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    for key in public:
        assert norm(rebuilt.config[key]) == norm(torch_vae.config[key]), key


def test_export_round_trip(small, tmp_path):
    """Our params written back with weights.to_state_dict load into diffusers unchanged."""
    torch_vae, folder = small
    vae, params = weights.load_vae(folder)
    out = str(tmp_path / "export")
    weights.write_safetensors(out, weights.to_state_dict(params), vae.config.to_dict(),
                              "diffusion_pytorch_model")
    reloaded = TorchVAE.from_pretrained(out)
    for key, value in torch_vae.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(),
                                      err_msg=key)


def test_legacy_attention_names(small, tmp_path):
    torch_vae, folder = small
    _, params = weights.load_vae(folder)
    state = load_file(os.path.join(folder, WEIGHTS_FILE))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, name in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{name}.")
                if key.endswith("weight"):  # LDM checkpoints store them as 1x1 convolutions
                    value = value[:, :, None, None]
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.query.weight"].shape == (16, 16, 1, 1)

    # rename_legacy_keys maps back exactly and is a no-op on current names.
    renamed = vae_lib.rename_legacy_keys(legacy)
    assert sorted(renamed) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(renamed[key], state[key])
    assert vae_lib.rename_legacy_keys(state).keys() == state.keys()

    legacy_folder = str(tmp_path / "legacy")
    weights.write_safetensors(legacy_folder, legacy, dict(torch_vae.config),
                              "diffusion_pytorch_model")
    _, legacy_params = weights.load_vae(legacy_folder)
    flat, flat_legacy = (jax.tree_util.tree_leaves_with_path(p) for p in (params, legacy_params))
    assert len(flat) == len(flat_legacy)
    for (path, a), (path_b, b) in zip(flat, flat_legacy):
        assert path == path_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(ValueError, match="proj_attn.weight"):
        vae_lib.rename_legacy_keys({**state, "encoder.mid_block.attentions.0.proj_attn.weight":
                                    state["encoder.mid_block.attentions.0.to_out.0.weight"]})


def test_remat_same_output_and_gradient(small):
    _, folder = small
    vae, params = weights.load_vae(folder)
    vae_remat, _ = weights.load_vae(folder, remat=True)
    assert vae_remat.remat and not vae.remat
    _, z = _inputs(TWO_LEVELS, batch=1)
    z = jnp.asarray(z)

    def value_and_grad(model):
        def loss(p, z):
            out = model.apply({"params": p}, z, method="decode")
            return jnp.mean(out ** 2), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (_, out), grad = value_and_grad(vae)(params, z)
    (_, out_remat), grad_remat = value_and_grad(vae_remat)(params, z)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_remat))
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), grad, grad_remat)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad))
    worst = max(jax.tree_util.tree_leaves(diffs))
    print(f"\nremat: max |d grad| {worst:.2e} (max |grad| {scale:.2e})")
    assert scale > 0
    assert worst <= 1e-6 * max(scale, 1.0)
    # The decoder grad w.r.t. its input reaches DSAlign's U-Net path: it must be nonzero.
    assert float(jnp.abs(grad[1]).max()) > 0
    # Rematerialised per layer: the mid block, every up-block resnet and every upsampler is one
    # checkpoint (not nested in a per-block one), so one layer's activations are live at a time.
    cfg = vae_remat.config
    n_up = len(cfg.block_out_channels)
    expected = 1 + n_up * (cfg.layers_per_block + 1) + (n_up - 1)

    def checkpoints(jaxpr, inside=False):
        """One entry per remat (jax.checkpoint) equation: whether it is inside another."""
        found = []
        for eqn in jaxpr.eqns:
            is_ckpt = eqn.primitive.name.startswith(("remat", "checkpoint"))
            if is_ckpt:
                found.append(inside)
            for v in eqn.params.values():
                sub = getattr(v, "jaxpr", v)
                if hasattr(sub, "eqns"):
                    found += checkpoints(sub, inside or is_ckpt)
        return found

    jaxpr = jax.make_jaxpr(lambda p, z: vae_remat.apply({"params": p}, z, method="decode"))(
        params, z).jaxpr
    found = checkpoints(jaxpr)
    assert (len(found), sum(found)) == (expected, 0)


def test_bfloat16_close_to_float32(small):
    _, folder = small
    vae, params = weights.load_vae(folder)
    vae16, params16 = weights.load_vae(folder, dtype=jnp.bfloat16)
    for leaf in jax.tree_util.tree_leaves(params16):
        assert leaf.dtype == jnp.float32  # params stay float32
    x, z = _inputs(TWO_LEVELS)
    mean = vae.apply({"params": params}, jnp.asarray(x), method="encode").mean
    post16 = vae16.apply({"params": params16}, jnp.asarray(x), method="encode")
    dec = vae.apply({"params": params}, jnp.asarray(z), method="decode")
    dec16 = vae16.apply({"params": params16}, jnp.asarray(z), method="decode")
    assert post16.mean.dtype == jnp.float32 and dec16.dtype == jnp.float32
    rel_mean = float(jnp.abs(post16.mean - mean).max() / jnp.abs(mean).max())
    rel_dec = float(jnp.abs(dec16 - dec).max() / jnp.abs(dec).max())
    print(f"\nbf16 vs fp32: encode mean rel err {rel_mean:.3e}, decode rel err {rel_dec:.3e}")
    assert rel_mean < 3e-2 and rel_dec < 3e-2
    assert rel_mean > 0 and rel_dec > 0  # bf16 really ran


def test_missing_key_and_shape_mismatch(small, tmp_path):
    torch_vae, folder = small
    state = load_file(os.path.join(folder, WEIGHTS_FILE))
    config = dict(torch_vae.config)

    missing = dict(state)
    del missing["decoder.up_blocks.0.resnets.1.conv2.weight"]
    path = str(tmp_path / "missing")
    weights.write_safetensors(path, missing, config, "diffusion_pytorch_model")
    with pytest.raises(weights.CheckpointError,
                       match=r"missing keys \(1\): decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight"):
        weights.load_vae(path)

    bad = dict(state)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    path = str(tmp_path / "mismatch")
    weights.write_safetensors(path, bad, config, "diffusion_pytorch_model")
    with pytest.raises(weights.CheckpointError) as err:
        weights.load_vae(path)
    assert ("quant_conv.weight: checkpoint (8, 8, 3, 3) -> (3, 3, 8, 8), model expects "
            "(1, 1, 8, 8)") in str(err.value)

    extra = {**state, "encoder.mid_block.attentions.0.rel_pos": np.zeros(3, np.float32)}
    path = str(tmp_path / "extra")
    weights.write_safetensors(path, extra, config, "diffusion_pytorch_model")
    with pytest.raises(weights.CheckpointError,
                       match=r"unexpected keys \(1\): encoder\.mid_block\.attentions\.0\.rel_pos"):
        weights.load_vae(path)


@pytest.mark.parametrize("change, message", [
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
     "'up_block_types': only 'UpDecoderBlock2D' blocks are supported, got ['AttnUpDecoderBlock2D']"),
    ({"down_block_types": ["DownEncoderBlock2D"]},
     "'down_block_types': has 1 entries but block_out_channels has 2"),
    ({"norm_num_groups": 3}, "'norm_num_groups': 3 does not divide block_out_channels [8, 16]"),
    ({"latent_channels": 0}, "'latent_channels': expected an integer >= 1, got 0"),
    ({"block_out_channels": [8, "16"]}, "'block_out_channels': expected a list of int >= 1"),
    ({"act_fn": "gelu"}, "'act_fn': only 'silu' is supported, got 'gelu'"),
    ({"use_quant_conv": "yes"}, "'use_quant_conv': expected true or false, got 'yes'"),
])
def test_config_errors(change, message):
    d = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4,
         "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    d.update(change)
    with pytest.raises(ValueError) as err:
        vae_lib.AutoencoderKLConfig.from_dict(d, source="/ckpt/vae")
    assert str(err.value).startswith("/ckpt/vae: invalid AutoencoderKL config key")
    assert message in str(err.value)


def test_old_config_defaults():
    """SD-1.4's vae/config.json (diffusers 0.2.2) lacks the newer keys: diffusers' defaults."""
    old = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
           "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
           "latent_channels": 4, "layers_per_block": 2, "out_channels": 3, "sample_size": 512,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    cfg = vae_lib.AutoencoderKLConfig.from_dict(old)
    assert (cfg.norm_num_groups, cfg.scaling_factor, cfg.use_quant_conv,
            cfg.mid_block_add_attention, cfg.downsample_factor) == (32, 0.18215, True, True, 8)
    shapes = weights.param_shapes(vae_lib.AutoencoderKL(cfg), *vae_lib.AutoencoderKL(cfg)
                                  .dummy_inputs())
    assert weights.count_params(shapes) == 83_653_863  # the SD-1.x VAE


def test_posterior_matches_diffusers_distribution():
    rs = np.random.RandomState(3)
    moments = rs.randn(2, 4, 4, 8).astype(np.float32) * 3
    moments[0, 0, 0, 4] = 50.0  # logvar clipped to 20
    moments[0, 0, 1, 5] = -50.0  # and to -30
    post = vae_lib.DiagonalGaussian.from_moments(jnp.asarray(moments))
    ref = DiagonalGaussianDistribution(_nchw(moments))
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 1, 1]) == -30.0
    np.testing.assert_array_equal(np.asarray(post.mode()), _nhwc(ref.mode()))
    np.testing.assert_array_equal(np.asarray(post.logvar), _nhwc(ref.logvar))
    np.testing.assert_allclose(np.asarray(post.std), _nhwc(ref.std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(post.kl()), ref.kl().numpy(), rtol=1e-5)
    rng = jax.random.PRNGKey(7)
    eps = jax.random.normal(rng, post.mean.shape)
    np.testing.assert_allclose(np.asarray(post.sample(rng)),
                               np.asarray(post.mean + post.std * eps), rtol=1e-6)


def test_bad_input_shapes(small):
    _, folder = small
    vae, params = weights.load_vae(folder)
    with pytest.raises(ValueError, match=r"encode: expected 3 channels in the last axis \(NHWC\), "
                                         r"got shape \(1, 3, 32, 32\)"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), method="encode")
    with pytest.raises(ValueError, match=r"encode: height and width must be multiples of 2"):
        vae.apply({"params": params}, jnp.zeros((1, 31, 32, 3)), method="encode")
    with pytest.raises(ValueError, match=r"decode: expected 4 channels"):
        vae.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method="decode")
