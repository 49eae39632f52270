"""The GOAL objective and train step against the PyTorch reference (tests/reference/), on tiny
random diffusers / transformers models saved with save_pretrained and loaded by goal_jax.

One jit-compiled ``value_and_grad(compute_losses)`` is reused for every parity case (same shapes)
to keep CPU compile time low; the multi-step checks of the jitted train step (frozen parameters
bit-identical, optimizer state) run in tests/test_sharding.py, which compiles that step anyway."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from goal_jax import train, weights
from tests.reference import goal_reference as ref
from tests.reference import tiny

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
KEYS = ("ldm", "dsa_local", "dsa_global", "dsa", "maa_in", "maa_out", "maa", "total")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    folder = str(tmp_path_factory.mktemp("goal_models"))
    ref_models = tiny.build(folder, tokenizer_dir, seed=0)
    store = ref.capture_cross_attention(ref_models.unet, tiny.MAA_LAYERS_TORCH)
    ref.trainable_parameters(ref_models.unet)
    ref.freeze(ref_models.vae, ref_models.text_encoder, ref_models.clip)
    models, params = tiny.load_jax(folder, tokenizer_dir)
    batch = tiny.make_batch(tokenizer_dir)
    cfg = train.default_train_config()
    trainable, frozen_unet = train.partition_params(params["unet"],
                                                    train.trainable_patterns(cfg))
    frozen = {"unet": frozen_unet, "vae": params["vae"], "text_encoder": params["text_encoder"],
              "clip": params["clip"]}

    @jax.jit
    def loss_and_grads(trainable, frozen, batch, t, noise, post, caption_keep, grounding_keep):
        z0 = train.encode_latents(models, frozen, batch["images"], post)

        def f(p):
            return train.compute_losses(models, cfg, p, frozen, batch, t, noise, z0,
                                        caption_keep, grounding_keep)

        return jax.value_and_grad(f, has_aux=True)(trainable)

    return dict(folder=folder, ref=ref_models, store=store, models=models, params=params,
                batch=batch,
                cfg=cfg, trainable=trainable, frozen=frozen, loss_and_grads=loss_and_grads)


def _draws(b, seed=1):
    rng = np.random.default_rng(seed)
    t = np.array([37, 810][:b], np.int32)
    noise = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
    post = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
    return t, noise, post


def _run_jax(s, batch, t, noise, post, caption_keep=None, grounding_keep=None):
    b = len(t)
    ck = np.ones(b, np.float32) if caption_keep is None else caption_keep
    gk = np.ones(b, np.float32) if grounding_keep is None else grounding_keep
    (_, metrics), grads = s["loss_and_grads"](
        s["trainable"], s["frozen"], {k: jnp.asarray(v) for k, v in batch.items()},
        jnp.asarray(t), jnp.asarray(noise), jnp.asarray(post), jnp.asarray(ck), jnp.asarray(gk))
    return {k: float(v) for k, v in metrics.items()}, grads


def _run_torch(s, batch, t, noise, post, caption_keep=None, grounding_keep=None):
    models = s["ref"]
    tb = {k: torch.tensor(v) for k, v in batch.items()}
    for k in ("input_ids", "phrase_input_ids"):
        tb[k] = tb[k].long()
    nchw = lambda x: torch.tensor(x).permute(0, 3, 1, 2)  # noqa: E731
    for p in models.unet.parameters():
        p.grad = None
    out = ref.goal_losses(
        models, tb, torch.tensor(t).long(), nchw(noise), nchw(post),
        ref.RefConfig(attention_layers=tiny.MAA_LAYERS_TORCH), store=s["store"],
        caption_keep=None if caption_keep is None else torch.tensor(caption_keep),
        grounding_keep=None if grounding_keep is None else torch.tensor(grounding_keep),
        null_input_ids=torch.tensor(np.asarray(s["models"].null_input_ids)).long())
    out["total"].backward()
    grads = {n: p.grad.numpy().copy() for n, p in models.unet.named_parameters()
             if p.requires_grad}
    return {k: float(v.detach()) for k, v in out.items()}, grads


def _compare(jax_out, torch_out, jax_grads, torch_grads):
    """Asserts the tolerances; returns (max loss rel err, global-norm rel err, max per-tensor
    rel err)."""
    loss_err = 0.0
    for k in KEYS:
        a, b = jax_out[k], torch_out[k]
        err = abs(a - b) / max(abs(b), 1e-12)
        assert err <= LOSS_RTOL, f"{k}: jax {a} torch {b} rel {err:.2e}"
        loss_err = max(loss_err, err)
    ours = weights.to_state_dict(jax_grads)
    assert sorted(ours) == sorted(torch_grads)  # same trainable set
    gn_j = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in ours.values()))
    gn_t = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in torch_grads.values()))
    assert gn_t > 0
    gn_err = abs(gn_j - gn_t) / gn_t
    assert gn_err <= GRAD_RTOL
    worst = 0.0
    for name, g_t in torch_grads.items():
        diff = np.linalg.norm((ours[name] - g_t).ravel())
        err = diff / max(np.linalg.norm(g_t.ravel()), 1e-12)
        assert err <= GRAD_RTOL, f"{name}: relative gradient error {err:.2e}"
        worst = max(worst, err)
    return loss_err, gn_err, worst


def test_parity_with_pytorch_reference(setup, capsys):
    batch = setup["batch"]
    t, noise, post = _draws(2)
    jo, jg = _run_jax(setup, batch, t, noise, post)
    to, tg = _run_torch(setup, batch, t, noise, post)
    errs = _compare(jo, to, jg, tg)
    # Every term is active (non-trivial) in this case.
    for k in KEYS:
        assert jo[k] > 1e-3, k
    with capsys.disabled():
        print(f"\n[parity] losses {jo}\n[parity] max loss rel err {errs[0]:.2e}, grad-norm rel "
              f"err {errs[1]:.2e}, max per-tensor grad rel err {errs[2]:.2e}")


def test_parity_with_dropout_draws(setup, capsys):
    """Caption dropped for item 0, grounding dropped for item 1: both frameworks agree."""
    batch = setup["batch"]
    t, noise, post = _draws(2, seed=2)
    ck = np.array([0.0, 1.0], np.float32)
    gk = np.array([1.0, 0.0], np.float32)
    jo, jg = _run_jax(setup, batch, t, noise, post, ck, gk)
    to, tg = _run_torch(setup, batch, t, noise, post, ck, gk)
    errs = _compare(jo, to, jg, tg)
    with capsys.disabled():
        print(f"\n[parity-dropout] max loss rel err {errs[0]:.2e}, grad-norm rel err "
              f"{errs[1]:.2e}, max per-tensor grad rel err {errs[2]:.2e}")


def test_padded_slots_do_not_change_loss(setup):
    """Filling the padded slot 3 with a junk box, phrase and token mask (masks = 0) changes
    neither the losses nor the gradients (same shapes, so the compiled function is reused)."""
    batch = setup["batch"]
    t, noise, post = _draws(2)
    base, g0 = _run_jax(setup, batch, t, noise, post)
    junk = {k: v.copy() for k, v in batch.items()}
    junk["boxes"][:, 3] = [0.3, 0.1, 0.9, 0.7]
    junk["phrase_input_ids"][:, 3] = batch["phrase_input_ids"][:, 0]
    junk["phrase_token_masks"][:, 3, 1:4] = 1.0
    assert np.all(junk["masks"][:, 3] == 0)
    out, g1 = _run_jax(setup, junk, t, noise, post)
    for k in KEYS:
        np.testing.assert_allclose(out[k], base[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_encoded_slots_and_tokens_same_loss_and_grads(setup, capsys):
    """encoded_box_slots=K and encoded_phrase_tokens=L (phrase encoders and DSAlign CLIP on the
    first K slots, phrases cut to L tokens) give the losses and gradients of K = N, L = 77 while
    every real box is in the first K slots and every real phrase's EOS in the first L tokens;
    otherwise an error that names the batch item."""
    from goal_jax.models import clip as clip_lib

    s = setup
    batch = s["batch"]
    t, noise, post = _draws(2)
    k = int(batch["masks"].sum(axis=1).max())
    n, length = batch["phrase_input_ids"].shape[1:]
    eos_ids = train.phrase_eos_token_ids(s["models"])
    real = batch["masks"] > 0
    eos = max(int(np.asarray(clip_lib.eos_positions(jnp.asarray(batch["phrase_input_ids"][real]),
                                                    e)).max()) for e in eos_ids)
    tokens = eos + 1
    assert k < n and np.all(batch["masks"][:, k:] == 0) and tokens < length
    full, g_full = _run_jax(s, batch, t, noise, post)
    cfg = train.default_train_config()
    cfg.encoded_box_slots = k
    cfg.encoded_phrase_tokens = tokens

    @jax.jit
    def loss_and_grads(trainable, batch):
        z0 = train.encode_latents(s["models"], s["frozen"], batch["images"], jnp.asarray(post))
        return jax.value_and_grad(lambda p: train.compute_losses(
            s["models"], cfg, p, s["frozen"], batch, jnp.asarray(t), jnp.asarray(noise), z0),
            has_aux=True)(trainable)

    (_, m), g_k = loss_and_grads(s["trainable"], {k_: jnp.asarray(v) for k_, v in batch.items()})
    worst = 0.0
    for key in KEYS:
        err = abs(float(m[key]) - full[key]) / max(abs(full[key]), 1e-12)
        worst = max(worst, err)
        assert err <= 1e-6, (key, float(m[key]), full[key])
    gworst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(g_full)):
        a, b = np.asarray(a), np.asarray(b)
        gworst = max(gworst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    assert gworst <= 1e-4  # float32 summation order (other batch shapes in the encoders)
    with capsys.disabled():
        print(f"\n[encoded_box_slots={k} of {n}, encoded_phrase_tokens={tokens} of {length}] "
              f"max loss rel diff {worst:.1e}, max grad rel diff {gworst:.1e}")

    train.check_box_slots(batch["masks"], k)  # fits: no error
    train.check_phrase_tokens(batch["phrase_input_ids"], batch["masks"], tokens, eos_ids)
    with pytest.raises(ValueError, match=rf"encoded_box_slots={k - 1} but 1 item\(s\) "
                                         rf"have a real box in slot >= {k - 1}: item \d \({k} "
                                         r"boxes\)"):
        train.check_box_slots(batch["masks"], k - 1)
    with pytest.raises(ValueError, match=rf"encoded_phrase_tokens={tokens - 1} but \d item\(s\) "
                                         rf"have a phrase whose EOS token is beyond it: b \(needs "
                                         rf"{tokens}\)"):
        train.check_phrase_tokens(batch["phrase_input_ids"], batch["masks"], tokens - 1,
                                  eos_ids, item_names=["a", "b"])
    cfg.encoded_box_slots = n + 1
    with pytest.raises(ValueError, match=rf"encoded_box_slots={n + 1} must be in \[0, {n}\]"):
        train.encoded_box_slots(cfg, n)
    cfg.encoded_phrase_tokens = length + 1
    with pytest.raises(ValueError, match=rf"encoded_phrase_tokens={length + 1} must be in "
                                         rf"\[0, {length}\]"):
        train.encoded_phrase_tokens(cfg, length)
    cfg.encoded_box_slots = cfg.encoded_phrase_tokens = 0
    assert (train.encoded_box_slots(cfg, n), train.encoded_phrase_tokens(cfg, length)) == \
        (n, length)


def test_alpha_beta_zero_is_ldm(setup):
    cfg = train.default_train_config()
    cfg.alpha = 0.0
    cfg.beta = 0.0
    s = setup
    t, noise, post = _draws(2)
    batch = {k: jnp.asarray(v) for k, v in s["batch"].items()}

    @jax.jit
    def f(trainable):  # forward only: a cheap compile
        z0 = train.encode_latents(s["models"], s["frozen"], batch["images"], jnp.asarray(post))
        return train.compute_losses(s["models"], cfg, trainable, s["frozen"], batch,
                                    jnp.asarray(t), jnp.asarray(noise), z0)

    total, m = f(s["trainable"])
    assert float(total) == float(m["ldm"])
    for k in ("dsa", "maa"):
        assert float(m[k]) == 0.0
    full, _ = _run_jax(s, s["batch"], t, noise, post)
    np.testing.assert_allclose(float(m["ldm"]), full["ldm"], rtol=1e-6)


def test_trainable_selection_and_errors(setup):
    unet_params = setup["params"]["unet"]
    cfg = train.default_train_config()
    paths = list(train.trainable_mask(unet_params, train.trainable_patterns(cfg)).items())
    chosen = {p for p, keep in paths if keep}
    assert chosen and all(("/fuser/" in p or "/attn1/" in p or "/attn2/" in p) for p in chosen)
    assert any("/fuser/" in p for p in chosen) and not any(p.startswith("position_net/")
                                                          for p in chosen)
    assert any("/fuser/alpha_attn" in p for p in chosen)
    cfg.train_position_net = True
    with_pos = train.trainable_mask(unet_params, train.trainable_patterns(cfg))
    assert any(k.startswith("position_net/") and v for k, v in with_pos.items())
    cfg.trainable_patterns = ("nothing_matches_this",)
    cfg.train_position_net = False
    with pytest.raises(ValueError, match="match no U-Net parameter"):
        train.trainable_mask(unet_params, train.trainable_patterns(cfg))
    tr, fr = train.partition_params(unet_params, train.PAPER_TRAINABLE)
    merged = train.merge_params(tr, fr)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(
        dict(unet_params))
    with pytest.raises(ValueError, match="lacks"):
        train.create_train_state({"unet": unet_params}, cfg, optax.adamw(1e-3))
    with pytest.raises(ValueError, match=r"train batch lacks \['boxes'\]"):
        train._check_batch({k: 0 for k in train.BATCH_KEYS if k != "boxes"})


def test_optimizer_options():
    """Warm-up schedule, clipping and MultiSteps accumulation on a toy problem."""
    cfg = train.default_train_config()
    cfg.optimizer.warmup_steps = 4
    cfg.optimizer.grad_accum_steps = 2
    cfg.optimizer.grad_clip_norm = 1.0
    cfg.optimizer.learning_rate = 0.1
    tx, sched = train.make_optimizer(cfg)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(0.05)
    assert float(sched(10)) == pytest.approx(0.1)
    params = {"w": jnp.ones(3)}
    st = tx.init(params)
    g = {"w": jnp.full(3, 100.0)}
    u, st = tx.update(g, st, params)
    assert float(jnp.abs(u["w"]).max()) == 0.0  # first micro-step: accumulated, no update
    u, st = tx.update(g, st, params)
    u, st = tx.update(g, st, params)
    u, st = tx.update(g, st, params)
    assert float(jnp.abs(u["w"]).max()) > 0.0


def test_sd14_parameter_counts(capsys):
    """Trainable / frozen parameter counts of the SD-1.4 GLIGEN U-Net (shapes only)."""
    from goal_jax.models import unet as unet_lib

    path = os.path.join(os.path.dirname(__file__), "fixtures", "sd14_gligen_unet_config.json")
    with open(path, encoding="utf-8") as f:
        config = unet_lib.UNet2DConditionConfig.from_dict(json.load(f), source=path)
    module = unet_lib.UNet2DConditionModel(config=config)
    shapes = weights.param_shapes(module, *module.dummy_inputs())
    cfg = train.default_train_config()
    n_train, n_frozen = train.parameter_counts(shapes, cfg)
    cfg.train_position_net = True
    n_train_pos, _ = train.parameter_counts(shapes, cfg)
    with capsys.disabled():
        print(f"\n[sd14] trainable {n_train:,} frozen {n_frozen:,} total {n_train + n_frozen:,}"
              f"; with position net trainable {n_train_pos:,}")
    assert n_train + n_frozen == weights.count_params(shapes)
    assert 0 < n_train < n_frozen
    assert n_train_pos > n_train


def test_load_models_from_config(setup, tokenizer_dir):
    """train.load_models reads the pipeline + CLIP folders named in the config: MAAlign layers
    from maa_part/maa_resolution, compute dtype and remat, the empty caption's ids."""
    from goal_jax import text

    folder = setup["folder"]
    if not os.path.isdir(os.path.join(folder, "tokenizer")):
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"))
    cfg = train.default_train_config()
    cfg.model.pipeline = folder
    cfg.model.clip = os.path.join(folder, "clip")
    cfg.maa_resolution = 8
    cfg.dtype = "bfloat16"
    cfg.remat = True
    models, params = train.load_models(cfg)
    assert models.unet.attention_maps == tiny.MAA_LAYERS_FLAX
    assert models.unet.dtype == jnp.bfloat16 and models.unet.remat
    assert models.vae.remat and models.clip.remat and models.clip.dtype == jnp.bfloat16
    assert models.clip_image_size == tiny.IMAGE and models.scaling_factor == 0.5
    empty = text.tokenize(text.load_tokenizer(tokenizer_dir), [""])[0]
    np.testing.assert_array_equal(np.asarray(models.null_input_ids), empty)
    for name in ("unet", "vae", "text_encoder", "clip"):
        for a, b in zip(jax.tree_util.tree_leaves(params[name]),
                        jax.tree_util.tree_leaves(setup["params"][name])):
            assert a.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg.maa_resolution = 5
    with pytest.raises(ValueError, match="no up cross-attention layers at resolution 5"):
        train.load_models(cfg)
    cfg.dtype = "float64"
    with pytest.raises(ValueError, match="config.dtype must be one of"):
        train.compute_dtype(cfg)


def test_reference_train_step_updates_trainable_set(tmp_path, tokenizer_dir):
    """The PyTorch reference's AdamW step (the benchmark baseline) trains exactly the paper's
    set: fusers, attn1 and attn2 move; every other parameter of every model stays put."""
    models = tiny.build(str(tmp_path), tokenizer_dir, seed=3)
    store = ref.capture_cross_attention(models.unet, tiny.MAA_LAYERS_TORCH)
    chosen = ref.trainable_parameters(models.unet)
    ref.freeze(models.vae, models.text_encoder, models.clip)
    before = {f"{m}.{n}": p.detach().clone() for m, mod in
              (("unet", models.unet), ("vae", models.vae), ("clip", models.clip))
              for n, p in mod.named_parameters()}
    opt = ref.make_optimizer([p for _, p in chosen], lr=1e-3)
    tb = {k: torch.tensor(v) for k, v in tiny.make_batch(tokenizer_dir).items()}
    for k in ("input_ids", "phrase_input_ids"):
        tb[k] = tb[k].long()
    cfg = ref.RefConfig(attention_layers=tiny.MAA_LAYERS_TORCH)
    metrics = ref.train_step(models, opt, tb, cfg, torch.Generator().manual_seed(0), store=store,
                             grad_clip_norm=1.0)
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["grad_norm"] > 0
    names = {f"unet.{n}" for n, _ in chosen}
    for m, mod in (("unet", models.unet), ("vae", models.vae), ("clip", models.clip)):
        for n, p in mod.named_parameters():
            key = f"{m}.{n}"
            moved = not torch.equal(before[key], p.detach())
            assert moved == (key in names), key
