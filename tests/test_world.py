"""The shapes-world recipe: resumable stages, a smoke run of every stage, the exported folders.

No world training in CI: the smoke preset trains tiny models for 4 steps per stage.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from goal_jax.world import data, stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_stage(tmp, steps, stop_at=None):
    """A 2-parameter regression trained with run_stage; batch k is a function of k only."""
    tx = optax.adam(0.1)
    state = stage.init_state({"w": jnp.zeros((2,))}, tx, ema=True)

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch @ p["w"] - 1.0) ** 2))(
            state["params"])
        return stage.apply_gradients(state, grads, tx, 0.9), {"loss": loss}

    def batch_fn(k):
        if stop_at is not None and k == stop_at:
            raise KeyboardInterrupt  # an interruption between two steps
        return jnp.asarray(np.random.default_rng([7, k]).standard_normal((4, 2)), jnp.float32)

    return stage.run_stage("toy", str(tmp), state, step, batch_fn, steps, log_every=1,
                           save_every=3, log=lambda _: None)


def test_stage_resume_is_exact(tmp_path):
    straight, info = _toy_stage(tmp_path / "a", 8)
    with pytest.raises(KeyboardInterrupt):
        _toy_stage(tmp_path / "b", 8, stop_at=5)  # saved at step 3, interrupted at 5
    assert not os.path.exists(tmp_path / "b" / "done.json")
    resumed, _ = _toy_stage(tmp_path / "b", 8)
    for key in ("params", "ema"):
        np.testing.assert_array_equal(np.asarray(straight[key]["w"]),
                                      np.asarray(resumed[key]["w"]))
    assert int(resumed["step"]) == 8 and info["steps"] == 8
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # each step logged once despite the restart
    # A finished stage is only reloaded.
    again, _ = _toy_stage(tmp_path / "b", 8, stop_at=0)
    np.testing.assert_array_equal(np.asarray(again["params"]["w"]),
                                  np.asarray(straight["params"]["w"]))


def test_render_split_is_deterministic_and_resumable(tmp_path):
    data.render_split(str(tmp_path / "a"), "train", 5, seed=3, resolution=32, log=lambda _: None)
    a = data.WorldSplit(str(tmp_path / "a"))
    # An interrupted render (2 of 5 items done) finishes with the same bytes.
    b_dir = tmp_path / "b"
    data.render_split(str(b_dir), "train", 5, seed=3, resolution=32, log=lambda _: None)
    meta = json.loads((b_dir / "split.json").read_text())
    meta["done"] = 2
    (b_dir / "split.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incomplete: 2 of 5"):
        data.WorldSplit(str(b_dir))
    data.render_split(str(b_dir), "train", 5, seed=3, resolution=32, log=lambda _: None)
    b = data.WorldSplit(str(b_dir))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert a.records == b.records
    assert a.records[0]["id"] == "world-train-000000"
    assert all(0 <= v <= 1 for r in a.records for o in r["objects"] for v in o["box"])
    # Held-out items come from another random stream.
    data.render_split(str(tmp_path / "h"), "heldout", 5, seed=3, resolution=32,
                      log=lambda _: None)
    h = data.WorldSplit(str(tmp_path / "h"))
    assert [r["caption"] for r in h.records] != [r["caption"] for r in a.records]
    with pytest.raises(ValueError, match="rendered with"):
        data.render_split(str(tmp_path / "a"), "train", 6, seed=3, resolution=32)


def test_grounding_arrays_names_an_item_with_too_many_objects():
    records = [{"id": "world-train-000007", "objects": [{"box": [0, 0, .5, .5], "phrase": "a"}] * 3}]
    with pytest.raises(ValueError, match="world-train-000007 has 3 objects, more than the 2"):
        data.grounding_arrays(records, 2)


def test_mirror_boxes_moves_places_not_sizes():
    from goal_jax.world import evaluate as world_eval

    boxes = [[0.1, 0.2, 0.4, 0.9], [0.5, 0.0, 0.75, 0.25]]
    mirrored = world_eval.mirror_boxes(boxes)
    np.testing.assert_allclose(mirrored, [[0.6, 0.2, 0.9, 0.9], [0.25, 0.0, 0.5, 0.25]])
    np.testing.assert_allclose(world_eval.mirror_boxes(mirrored), boxes)  # an involution
    for array in (np.asarray(boxes)[None], jnp.asarray(boxes)[None]):  # [B, N, 4] arrays
        out = world_eval.mirror_boxes(array)
        assert type(out) is type(array) and out.shape == (1, 2, 4)
        np.testing.assert_allclose(np.asarray(out)[0], mirrored, rtol=1e-6)
    items = [{"caption": "a red circle", "phrases": ["a red circle"], "boxes": boxes[:1],
              "seed": 3}]
    (item,) = world_eval.mirrored_items(items)
    assert item["boxes"] == mirrored[:1] and items[0]["boxes"] == boxes[:1]
    assert {k: item[k] for k in ("caption", "phrases", "seed")} == \
        {"caption": "a red circle", "phrases": ["a red circle"], "seed": 3}


def test_world_recipe_smoke(tmp_path):
    """Every stage for 4 steps at tiny sizes, then a rerun that only reloads (resume)."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "world.py"),
           "--config", os.path.join(REPO, "configs", "world.py") + ":smoke",
           "--workdir", str(work), "--out", str(out)]
    # The three runs share JAX's persistent compilation cache, so the reruns can reuse the
    # programs the first run compiled.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("vae", "clip", "ldm", "gligen"):
        metrics = [json.loads(line) for line in open(work / "stages" / name / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == [2, 4]
        assert all(np.isfinite(v) for m in metrics for v in m.values())
        assert (work / "stages" / name / "ckpt" / "4").is_dir()
        assert f"[{name}] step 4/4" in first.stdout
    record = json.loads((out / "world.json").read_text())
    assert set(record["stages"]) == {"vae", "clip", "ldm", "gligen"}
    assert record["evaluation"]["ground truth"]["boxes"]["present"] == 1.0
    assert 0 <= record["evaluation"]["world"]["boxes"]["present"] <= 1
    assert 0 <= record["evaluation"]["world, boxes mirrored"]["boxes"]["present"] <= 1
    # The renders flipped left-right, scored against the true boxes: objects move off the
    # boxes that are not symmetric about x = 0.5.
    assert record["evaluation"]["ground truth, boxes mirrored"]["boxes"]["present"] < 1.0
    for row in record["evaluation"]["grounding_gap"].values():
        for v in row.values():
            assert np.isclose(v["position_gap"], 1 - v["grounded"] / v["mirrored"], atol=1e-4)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "pipeline" / sub).is_dir()
    unet_config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert unet_config["fuser_position_embedding"] == "sinusoidal_2d"  # the config's default
    assert (out / "world_samples.png").is_file()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[ldm] step" not in second.stdout  # finished stages are reloaded, not retrained
    again = json.loads((out / "world.json").read_text())
    assert again["stages"]["ldm"] == record["stages"]["ldm"]

    # --base: only the GLIGEN stage reruns, on the base world's VAE / CLIP / LDM U-Net.
    out2 = tmp_path / "out2"
    third = subprocess.run(cmd[:-4] + ["--workdir", str(tmp_path / "work2"), "--out", str(out2),
                                       "--base", str(out)],
                           capture_output=True, text=True, env=env, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[gligen] step 4/4" in third.stdout
    assert "[ldm] step" not in third.stdout and "[vae] step" not in third.stdout
    rerun = json.loads((out2 / "world.json").read_text())
    assert rerun["stages"]["ldm"] == dict(record["stages"]["ldm"], reused_from=str(out))
    from flax import traverse_util

    from goal_jax import weights

    base = traverse_util.flatten_dict(
        weights.load_component(str(out / "pipeline" / "unet"), "unet")[1], sep="/")
    new = traverse_util.flatten_dict(
        weights.load_component(str(out2 / "pipeline" / "unet"), "unet")[1], sep="/")
    assert base.keys() == new.keys()
    for k in base:
        if "fuser/" in k or "position_net/" in k:
            continue
        np.testing.assert_array_equal(new[k], base[k], err_msg=k)  # the base is frozen
    gates = [float(v) for k, v in new.items() if k.endswith("alpha_attn")]
    assert gates and all(abs(g - 0.5) < 0.01 for g in gates)  # gate_init 0.5, 4 small steps

    # --from_stage clip: a new CLIP (plain pairs, a wider text tower) and a new U-Net (3
    # levels) on the base world's VAE; the pipeline's text encoder is the new CLIP's text tower.
    out3 = tmp_path / "out3"
    fourth = subprocess.run(cmd[:-4] + ["--workdir", str(tmp_path / "work3"), "--out", str(out3),
                                        "--base", str(out), "--from_stage", "clip",
                                        "--config.clip.vocabulary_weight=0",
                                        "--config.model.clip.text.width=32",
                                        "--config.model.unet.channels=(16,32,32)",
                                        "--config.model.unet.attention=(False,True,True)"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "[clip] step 4/4" in fourth.stdout and "vocab_loss" not in fourth.stdout
    assert "[ldm] step 4/4" in fourth.stdout and "[gligen] step 4/4" in fourth.stdout
    assert "[vae] step" not in fourth.stdout
    assert "vocab_loss" in first.stdout  # the config's default: the vocabulary term on
    third_level = json.loads((out3 / "world.json").read_text())
    assert third_level["stages"]["vae"] == dict(record["stages"]["vae"], reused_from=str(out))
    for name in ("clip", "ldm"):
        assert "reused_from" not in third_level["stages"][name]
    assert set(third_level["stages"]["clip"]["zero_shot_heldout"]) == {
        "color", "shape", "texture", "objects"}
    from safetensors.numpy import load_file

    new_clip = load_file(str(out3 / "clip" / "model.safetensors"))
    text_encoder = load_file(str(out3 / "pipeline" / "text_encoder" / "model.safetensors"))
    assert new_clip["text_model.final_layer_norm.weight"].shape == (32,)
    text_keys = [k for k in new_clip if k.startswith("text_model.")]
    assert text_keys and sorted(text_keys) == sorted(text_encoder)
    for k in text_keys:
        np.testing.assert_array_equal(text_encoder[k], new_clip[k], err_msg=k)
    unet_config = json.loads((out3 / "pipeline" / "unet" / "config.json").read_text())
    assert unet_config["block_out_channels"] == [16, 32, 32]
    assert unet_config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D"]
    np.testing.assert_array_equal(  # the base's VAE, as it was
        weights.load_component(str(out3 / "pipeline" / "vae"), "vae")[1]["decoder"]["conv_out"]
        ["kernel"],
        weights.load_component(str(out / "pipeline" / "vae"), "vae")[1]["decoder"]["conv_out"]
        ["kernel"])

    # The exported pipeline loads in diffusers and samples; the CLIP folder in transformers.
    import diffusers
    import transformers

    pipe = diffusers.StableDiffusionGLIGENPipeline.from_pretrained(
        str(out / "pipeline"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    image = pipe(prompt="a red circle", gligen_phrases=["a red circle"],
                 gligen_boxes=[[0.1, 0.1, 0.5, 0.5]], num_inference_steps=2, height=32,
                 width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    clip = transformers.CLIPModel.from_pretrained(str(out / "clip"))
    assert clip.config.vision_config.image_size == 32


def test_base_world_is_checked_before_a_rerun(tmp_path):
    """--base names what is wrong with the base folder, before anything is trained."""
    sys.path.insert(0, REPO)
    from configs import world as world_config
    from goal_jax.world import recipe

    config = world_config.get_config("smoke")
    with pytest.raises(recipe.BaseWorldError, match=r"is not a world folder: it has no world.json, "
                                         r"pipeline/unet, .*clip"):
        recipe.check_base(config, str(tmp_path), "gligen")
    for sub in ("pipeline/unet", "pipeline/vae", "pipeline/text_encoder", "pipeline/tokenizer",
                "clip"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "world.json").write_text(json.dumps({"config": json.loads(config.to_json())}))
    assert recipe.check_base(config, str(tmp_path), "gligen")["config"]["seed"] == 0
    # The fusers' position embedding only acts in the GLIGEN stage, which reruns: a base made
    # without it (or with another one) is the same base.
    config.model.unet.fuser_position_embedding = "none"
    assert recipe.check_base(config, str(tmp_path), "gligen")
    config.model.unet.fuser_position_embedding = "sinusoidal_2d"
    with pytest.raises(ValueError, match="from_stage 'vae'"):
        recipe.check_base(config, str(tmp_path), "vae")
    config.model.unet.channels = (16, 32, 32)
    config.model.unet.attention = (False, True, True)
    assert recipe.check_base(config, str(tmp_path), "ldm")  # a new U-Net: allowed from ldm on
    with pytest.raises(ValueError, match=r"config.model.unet differs from the base world's .*"
                                         r"from 'gligen' on can only be rerun on the same"):
        recipe.check_base(config, str(tmp_path), "gligen")
    config.model.clip.projection_dim = 16
    assert recipe.check_base(config, str(tmp_path), "clip")  # a new CLIP: from clip on
    with pytest.raises(ValueError, match=r"config.model.clip differs from the base world's .*"
                                         r"from 'ldm' on can only be rerun on the same"):
        recipe.check_base(config, str(tmp_path), "ldm")
    config.model.vae.latent_channels = 8
    with pytest.raises(ValueError, match="config.model.vae differs"):
        recipe.check_base(config, str(tmp_path), "ldm")
    bad = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "world.py"),
                          "--config", os.path.join(REPO, "configs", "world.py") + ":smoke",
                          "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                          "--base", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                         timeout=300)
    assert bad.returncode == 2
    assert "error: --base: base world" in bad.stderr and "has no world.json" in bad.stderr
    lone = subprocess.run(bad.args[:-2] + ["--from_stage", "ldm"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert lone.returncode == 2
    assert "error: --from_stage needs --base" in lone.stderr


def test_timestep_sampling_and_loss_weighting():
    from goal_jax import schedule as schedule_lib
    from goal_jax.world import models, unet_stage

    rng = np.random.default_rng(0)
    uniform = unet_stage.sample_timesteps(rng, 200_000, 1000, "uniform")
    cubic = unet_stage.sample_timesteps(rng, 200_000, 1000, "cubic")
    for t in (uniform, cubic):
        assert t.min() == 0 and t.max() == 999
    assert abs((uniform >= 500).mean() - 0.5) < 0.005
    # P(t >= T/2) = P(u^3 <= 1/2) = 2^(-1/3)
    assert abs((cubic >= 500).mean() - 2 ** (-1 / 3)) < 0.005
    with pytest.raises(ValueError, match="unknown timestep sampling 'cosine'"):
        unet_stage.sample_timesteps(rng, 4, 1000, "cosine")

    sched = schedule_lib.DDPMSchedule.from_config(models.SCHEDULER_CONFIG)
    t = np.array([0, 300, 600, 999])
    abar = np.asarray(sched.alphas_cumprod)[t]
    w = np.asarray(unet_stage.loss_weight(sched.alphas_cumprod, t, "x0_clipped"))
    np.testing.assert_allclose(w, np.clip((1 - abar) / abar, 1, 10), rtol=1e-6)
    assert w[0] == 1.0 and w[-1] == 10.0
    np.testing.assert_array_equal(unet_stage.loss_weight(sched.alphas_cumprod, t, "eps"), 1.0)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        unet_stage.loss_weight(sched.alphas_cumprod, t, "snr")


def test_clip_vocabulary_loss(tmp_path):
    """The region-vs-vocabulary term: the in-batch loss unchanged, plus the cross-entropy of
    each image over all 216 full phrases, from one pass of the image tower."""
    sys.path.insert(0, REPO)
    from configs import world as world_config
    from goal_jax import text as text_lib
    from goal_jax.data import shapes
    from goal_jax.world import clip_stage, models

    vocab = clip_stage.vocabulary_phrases()
    assert len(vocab) == len(set(vocab)) == 9 * 4 * 6
    assert {"a red circle", "an orange dotted hexagon", "a blue striped star"} <= set(vocab)
    assert "a red solid circle" not in vocab

    text_lib.write_word_vocab(str(tmp_path), shapes.VOCABULARY)
    tokenizer = text_lib.load_tokenizer(str(tmp_path))
    model, _ = clip_stage.build(world_config.get_config("smoke"), tokenizer)
    params = models.init_params(model, 0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(clip_stage._text_ids(tokenizer, ["a red circle", "a red circle",
                                                       "a blue star"], 12))
    vocab_ids = jnp.asarray(clip_stage._text_ids(tokenizer, vocab, 12))
    pixels = jnp.asarray(rng.uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray([vocab.index("a red circle"), vocab.index("a red circle"),
                          vocab.index("a blue star")])
    loss, acc = clip_stage.contrastive_loss(model, params, ids, pixels)
    loss2, acc2, v_loss, v_acc = clip_stage.contrastive_loss(model, params, ids, pixels,
                                                             vocab_ids, labels)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    assert float(acc2) == float(acc)
    # by hand: rows 0 and 1 share their text, so each is a positive for the other
    logits = np.asarray(model.apply({"params": params}, ids, pixels).logits_per_text, np.float64)
    target = np.array([[.5, .5, 0], [.5, .5, 0], [0, 0, 1]])
    log_sm = lambda x: x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1,  # noqa: E731
                                         keepdims=True)) - x.max(-1, keepdims=True)
    manual = (-np.mean(np.sum(target * log_sm(logits), -1))
              - np.mean(np.sum(target * log_sm(logits.T), -1))) / 2
    np.testing.assert_allclose(float(loss), manual, rtol=1e-5)
    v_logits = np.asarray(model.apply({"params": params}, vocab_ids, pixels).logits_per_text,
                          np.float64).T  # [3 images, 216]
    manual_v = -np.mean(log_sm(v_logits)[np.arange(3), np.asarray(labels)])
    np.testing.assert_allclose(float(v_loss), manual_v, rtol=1e-5)
    assert float(v_acc) == np.mean(v_logits.argmax(-1) == np.asarray(labels))

    # Phrases encoded at 8 tokens embed as at 24 (causal attention, pooled at the EOS); a text
    # whose EOS does not fit is refused by name.
    def embeds(length):
        ids = jnp.asarray(clip_stage._text_ids(tokenizer, vocab, length))
        return np.asarray(model.apply({"params": params}, ids, method=model.encode_text).embeds)

    np.testing.assert_allclose(embeds(8), embeds(24), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"text 'an orange checkered hexagon' needs 6 tokens, "
                                         r"more than the 5 this stage encodes"):
        clip_stage._text_ids(tokenizer, ["a red circle", "an orange checkered hexagon"], 5)
