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


def test_world_recipe_smoke(tmp_path):
    """Every stage for 4 steps at tiny sizes, then a rerun that only reloads (resume)."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "world.py"),
           "--config", os.path.join(REPO, "configs", "world.py") + ":smoke",
           "--workdir", str(work), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=REPO)
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
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "pipeline" / sub).is_dir()
    assert (out / "world_samples.png").is_file()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[ldm] step" not in second.stdout  # finished stages are reloaded, not retrained
    again = json.loads((out / "world.json").read_text())
    assert again["stages"]["ldm"] == record["stages"]["ldm"]

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
