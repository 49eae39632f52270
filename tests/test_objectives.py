"""Hand-made checks of the GOAL loss math (eq. 2, 7, 8, 9, 12, 13, 14, 15) with known answers,
plus the DSAlign image helpers against their PyTorch equivalents."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from goal_jax import objectives as obj
from tests.reference import goal_reference as ref


def _unit(deg):
    r = math.radians(deg)
    return np.array([math.cos(r), math.sin(r), 0.0], np.float32)


# ---------------------------------------------------------------------------------------------
# Eq. 7.
# ---------------------------------------------------------------------------------------------


def test_spherical_distance_known_angles():
    a = np.stack([_unit(0)] * 4)
    b = np.stack([_unit(0), _unit(60), _unit(90), _unit(180)])
    d = np.asarray(obj.spherical_distance(jnp.asarray(a), jnp.asarray(b)))
    # ||a-b|| = 2 sin(theta/2), so D_sp = (theta/2)^2.
    expected = np.array([0.0, (math.pi / 6) ** 2, (math.pi / 4) ** 2, (math.pi / 2) ** 2])
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)


def test_spherical_distance_gradient_finite_at_equal_vectors():
    a = jnp.asarray(_unit(30))
    g = jax.grad(lambda x: obj.spherical_distance(x, a))(a)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    # away from a == b the gradient is the analytic one: d/dx (theta/2)^2 along the circle.
    g2 = jax.grad(lambda x: obj.spherical_distance(x, a))(jnp.asarray(_unit(90)))
    assert np.all(np.isfinite(np.asarray(g2))) and float(jnp.linalg.norm(g2)) > 0


# ---------------------------------------------------------------------------------------------
# Eq. 8-10.
# ---------------------------------------------------------------------------------------------


def test_dsalign_local_and_global_by_hand():
    # Item 0: box 0 at 90 deg from its phrase, box 1 identical, slot 2 padded (180 deg, ignored).
    # Item 1: box 0 at 60 deg, other slots padded.
    phrase = np.stack([np.stack([_unit(0), _unit(10), _unit(0)]),
                       np.stack([_unit(20), _unit(0), _unit(0)])])
    region = np.stack([np.stack([_unit(90), _unit(10), _unit(180)]),
                       np.stack([_unit(80), _unit(0), _unit(180)])])
    region = region * np.array([3.0, 0.5, 7.0])[None, :, None]  # unnormalised: same answer
    valid = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    caption = np.stack([_unit(0), _unit(0)]) * 2.0
    image = np.stack([_unit(90), _unit(180)])
    out = obj.dsalign_from_embeddings(*(jnp.asarray(x) for x in (image, caption, region,
                                                                 phrase, valid)))
    local = ((math.pi / 4) ** 2 + 0.0 + (math.pi / 6) ** 2) / 3  # mean over the 3 valid boxes
    glob = ((math.pi / 4) ** 2 + (math.pi / 2) ** 2) / 2
    np.testing.assert_allclose(float(out["dsa_local"]), local, rtol=1e-5)
    np.testing.assert_allclose(float(out["dsa_global"]), glob, rtol=1e-5)
    np.testing.assert_allclose(float(out["dsa"]), local + glob, rtol=1e-5)
    # Table 6 switches: a term switched off is exactly 0; item weights for D_global.
    off = obj.dsalign_from_embeddings(None, None, jnp.asarray(region), jnp.asarray(phrase),
                                      jnp.asarray(valid), local=True, global_=False)
    assert float(off["dsa_global"]) == 0.0 and float(off["dsa"]) == float(off["dsa_local"])
    w = obj.dsalign_from_embeddings(jnp.asarray(image), jnp.asarray(caption), None, None, None,
                                    jnp.asarray([0.0, 1.0]), local=False)
    np.testing.assert_allclose(float(w["dsa_global"]), (math.pi / 2) ** 2, rtol=1e-6)
    assert float(w["dsa_local"]) == 0.0


def test_dsalign_no_valid_box_is_zero_with_finite_grads():
    phrase = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    region = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5)), jnp.float32)
    valid = jnp.zeros((2, 3))

    def f(r):
        return obj.dsalign_from_embeddings(None, None, r, phrase, valid, global_=False)["dsa"]

    assert float(f(region)) == 0.0
    g = np.asarray(jax.grad(f)(region))
    assert np.all(np.isfinite(g)) and np.all(g == 0)


# ---------------------------------------------------------------------------------------------
# Box masks and eq. 12-14.
# ---------------------------------------------------------------------------------------------


def test_box_masks_cell_centre_rule():
    # 4x4 grid, centres at 0.125, 0.375, 0.625, 0.875; x1 = 0.625 excludes column 2 (half-open).
    m = np.asarray(obj.box_masks(jnp.asarray([[0.2, 0.0, 0.625, 0.5]]), 4, 4))[0]
    expected = np.zeros((4, 4))
    expected[0:2, 1] = 1
    np.testing.assert_array_equal(m, expected)
    # Non-square grid (h=2, w=4) and agreement with the torch reference on random boxes.
    boxes = np.random.default_rng(0).uniform(0, 1, (3, 5, 4)).astype(np.float32)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2])
    np.testing.assert_array_equal(np.asarray(obj.box_masks(jnp.asarray(boxes), 6, 10)),
                                  ref.box_masks(torch.tensor(boxes), 6, 10).numpy())


def test_maalign_known_maxima():
    h = w = 4
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1]]], np.float32)
    masks = obj.box_masks(jnp.asarray(boxes), h, w)
    maps = np.full((1, 3, h, w), 0.01, np.float32)
    maps[0, 0, 1, 1] = 0.6   # inside box 0 (top-left quadrant): max inside 0.6
    maps[0, 0, 3, 0] = 0.25  # outside: max outside 0.25
    maps[0, 1, 2, 3] = 0.9   # inside box 1
    maps[0, 1, 0, 0] = 0.05  # outside
    maps[0, 2] = 5.0         # slot 2 is padded: must not count
    valid = np.array([[1, 1, 0]], np.float32)
    out = obj.maalign_from_maps(jnp.asarray(maps), masks, jnp.asarray(valid))
    np.testing.assert_allclose(float(out["maa_in"]), ((1 - 0.6) + (1 - 0.9)) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(out["maa_out"]), (0.25 + 0.05) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(out["maa"]), 0.25 + 0.15, rtol=1e-6)


def _intermediates(probs_list):
    """Mimics the U-Net's sowed collection: one tuple per selected attn2."""
    return {f"up_blocks_1/attentions_{i}": {"transformer_blocks_0": {"attn2": {
        "attention_probs": (p,)}}} for i, p in enumerate(probs_list)}


def test_maalign_loss_token_average_heads_layers():
    # Two layers x two heads on a 2x2 grid for 8x8 latents, T = 5 tokens.
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (2, 1, 2, 4, 5)).astype(np.float32)  # [layer, B, heads, hw, T]
    p /= p.sum(-1, keepdims=True)
    boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5], [0.1, 0.1, 0.9, 0.9]]],
                     np.float32)
    tok = np.zeros((1, 3, 5), np.float32)
    tok[0, 0, [1, 2]] = 1   # phrase 0: tokens 1 and 2
    tok[0, 1, 3] = 1        # phrase 1: token 3
    # phrase 2 is absent from the caption (no tokens): excluded even though the box is real.
    valid = np.array([[1, 1, 1]], np.float32)
    out = obj.maalign_loss(_intermediates([jnp.asarray(p[0]), jnp.asarray(p[1])]),
                           jnp.asarray(boxes), jnp.asarray(tok), jnp.asarray(valid), (8, 8))
    a = p.mean(axis=(0, 2))[0]  # [hw, T] averaged over layers and heads
    a0 = a[:, [1, 2]].mean(-1).reshape(2, 2)
    a1 = a[:, 3].reshape(2, 2)
    m0 = np.array([[1, 0], [1, 0]])  # left column
    m1 = np.array([[0, 1], [0, 0]])  # top-right cell
    maa_in = ((1 - (a0 * m0).max()) + (1 - (a1 * m1).max())) / 2
    maa_out = ((a0 * (1 - m0)).max() + (a1 * (1 - m1)).max()) / 2
    np.testing.assert_allclose(float(out["maa_in"]), maa_in, rtol=1e-6)
    np.testing.assert_allclose(float(out["maa_out"]), maa_out, rtol=1e-6)
    # The absent phrase and padded slots change nothing: drop slot 2 entirely.
    out2 = obj.maalign_loss(_intermediates([jnp.asarray(p[0]), jnp.asarray(p[1])]),
                            jnp.asarray(boxes[:, :2]), jnp.asarray(tok[:, :2]),
                            jnp.asarray(valid[:, :2]), (8, 8))
    assert float(out2["maa"]) == float(out["maa"])


def test_maalign_item_without_valid_box_no_nan():
    p = jnp.full((2, 1, 4, 5), 0.2)
    boxes = jnp.asarray([[[0, 0, 0.5, 0.5]], [[0.5, 0.5, 1, 1]]], jnp.float32)
    tok = jnp.zeros((2, 1, 5)).at[0, 0, 1].set(1.0)
    valid = jnp.asarray([[1.0], [0.0]])  # item 1 has no valid box

    def loss(pp, v):
        return obj.maalign_loss(_intermediates([pp]), boxes, tok, v, (4, 4))["maa"]

    both = loss(p, valid)
    only0 = obj.maalign_loss(_intermediates([p[:1]]), boxes[:1], tok[:1], valid[:1], (4, 4))
    assert float(both) == float(only0["maa"])
    none = jnp.zeros_like(valid)
    assert float(loss(p, none)) == 0.0
    g = np.asarray(jax.grad(loss)(p, none))
    assert np.all(np.isfinite(g)) and np.all(g == 0)
    g = np.asarray(jax.grad(loss)(p, valid))
    assert np.all(np.isfinite(g)) and np.all(g[1] == 0) and np.any(g[0] != 0)


def test_maalign_errors():
    with pytest.raises(ValueError, match="no 'attention_probs'"):
        obj.collect_attention_probs({"up_blocks_1": {}})
    with pytest.raises(ValueError, match="share one resolution"):
        obj.mean_attention_map([jnp.zeros((1, 1, 4, 3)), jnp.zeros((1, 1, 16, 3))])
    with pytest.raises(ValueError, match="cannot place 5 attention cells"):
        obj.grid_shape(5, (8, 8))
    assert obj.grid_shape(8, (4, 8)) == (2, 4)
    assert obj.grid_shape(256, (64, 64)) == (16, 16)


# ---------------------------------------------------------------------------------------------
# Eq. 2 and 15.
# ---------------------------------------------------------------------------------------------


def test_ldm_and_goal_loss():
    pred = jnp.asarray(np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2))
    target = jnp.zeros_like(pred)
    ldm = obj.ldm_loss(pred, target)
    assert float(ldm) == float(np.mean(np.arange(8) ** 2))
    dsa = {"dsa_local": jnp.float32(1.0), "dsa_global": jnp.float32(2.0), "dsa": jnp.float32(3.0)}
    maa = {"maa_in": jnp.float32(0.5), "maa_out": jnp.float32(0.25), "maa": jnp.float32(0.75)}
    total, m = obj.goal_loss(ldm, dsa, maa, alpha=0.0, beta=0.0)
    assert float(total) == float(ldm)  # exactly the LDM loss
    total, m = obj.goal_loss(ldm, dsa, maa)
    np.testing.assert_allclose(float(total), 17.5 + 1e-2 * 3.0 + 1e-3 * 0.75, rtol=1e-7)
    assert sorted(m) == sorted(["ldm", "dsa_local", "dsa_global", "dsa", "maa_in", "maa_out",
                                "maa", "total"])


# ---------------------------------------------------------------------------------------------
# DSAlign images against torch.
# ---------------------------------------------------------------------------------------------


def test_region_images_match_torch():
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (2, 12, 20, 3)).astype(np.float32)
    boxes = np.array([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]],
                      [[0.55, 0.05, 0.95, 0.5], [0.3, 0.3, 0.31, 0.32]]], np.float32)
    timg, tbox = torch.tensor(img).permute(0, 3, 1, 2), torch.tensor(boxes)
    crop = np.asarray(obj.crop_and_resize(jnp.asarray(img), jnp.asarray(boxes), 8))
    crop_t = ref.crop_and_resize(timg, tbox, 8).permute(0, 1, 3, 4, 2).numpy()
    np.testing.assert_allclose(crop, crop_t, atol=1e-5)
    masked = np.asarray(obj.masked_regions(jnp.asarray(img), jnp.asarray(boxes)))
    masked_t = (timg[:, None] * ref.box_masks(tbox, 12, 20)[:, :, None]).permute(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(masked, masked_t.numpy())
    # CLIP pixels: same size (no resize) and a downscale (antialiased bilinear).
    cfg = ref.RefConfig()
    for size in (12, 7):
        sq = img[:, :, :12]
        ours = np.asarray(obj.clip_pixels(jnp.asarray(sq), size))
        theirs = ref.clip_pixels(torch.tensor(sq).permute(0, 3, 1, 2), cfg, size)
        np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_crop_and_resize_full_box_is_identity():
    img = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 3)), jnp.float32)
    out = obj.crop_and_resize(img, jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]]), 8)
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(img[0]), atol=1e-6)
    with pytest.raises(ValueError, match="region_mode must be 'mask' or 'crop'"):
        obj.dsalign_loss(None, None, None, None, None, None, None, None, None,
                         scaling_factor=1.0, image_size=8, region_mode="box")
