"""What DSAlign sees (experiments/shapes_world/x0_quality.py) on the shipped world: the one-step
prediction x̂0 by diffusion time, scored by the oracle and the world CLIP."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(REPO, "assets", "shapes_world")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from experiments.shapes_world import x0_quality

    out = str(tmp_path_factory.mktemp("x0"))
    result = x0_quality.main(["--world", WORLD, "--out", out, "--per_category", "1",
                              "--timesteps", "0", "1", "999"])
    return out, result


def test_rows_files_and_picture(measured):
    from PIL import Image

    out, result = measured
    assert [(r["label"], r["t"]) for r in result["rows"]] == [
        ("render", 0), ("VAE reconstruction", 0), ("x̂0 at t = 1", 1), ("x̂0 at t = 999", 999)]
    assert result["items"] == 6 and result["pipeline"] == "assets/shapes_world/pipeline"
    with open(os.path.join(out, "x0_quality.json"), encoding="utf-8") as f:
        assert json.load(f)["rows"] == result["rows"]
    with open(os.path.join(out, "x0_quality.md"), encoding="utf-8") as f:
        md = f.read()
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + 4  # header, rule, rows
    # One picture row per t plus the renders: 28 px of captions, then (64 x 2 + 4) px per row.
    assert Image.open(os.path.join(out, "x0_quality.png")).size[1] == 28 + 4 * (128 + 4)


def test_boxes_read_are_the_single_objects(measured):
    from experiments.shapes_world import datasets

    _, result = measured
    items = datasets.eval_layouts(1, 64)
    singles = sum(len(it["objects"]) for it in items if it["category"] != "counting")
    assert all(r["clip"]["boxes"] == singles for r in result["rows"])
    # The renders are the ceiling: every object in its box with its colour, and the world
    # CLIP names every rendered colour (its zero-shot colour accuracy is 100 %).
    render = result["rows"][0]
    assert render["oracle"]["present"] == 1.0 and render["oracle"]["color_in_box"] == 1.0
    assert render["clip"]["color"] == 1.0
    assert render["clip"]["margin"] > 0.1


def test_t0_is_the_vae_reconstruction_and_t1_is_close(measured):
    import jax.numpy as jnp

    from experiments.shapes_world import datasets
    from experiments.shapes_world.x0_quality import _psnr
    from goal_jax import weights

    _, result = measured
    items = datasets.eval_layouts(1, 64)
    truth = datasets.eval_truth_images(items, 64).astype(np.float32) / 255
    p = weights.load_pipeline(os.path.join(WORLD, "pipeline"))
    z = p.vae.apply({"params": p.vae_params}, jnp.asarray(truth * 2 - 1),
                    method=p.vae.encode).mean
    recon = p.vae.apply({"params": p.vae_params}, z, method=p.vae.decode)
    recon = np.clip(np.asarray(recon) / 2 + 0.5, 0, 1)
    rows = result["rows"]
    assert rows[1]["psnr_db"] == pytest.approx(float(np.mean(_psnr(recon, truth))), abs=0.02)
    # At t = 1 the noise is √(1 - ᾱ_1) ≈ 0.03 of the latent: x̂0 is nearly the reconstruction;
    # at t = 999 the U-Net guesses from pure noise (measured 18 dB against 26 dB).
    assert abs(rows[2]["psnr_db"] - rows[1]["psnr_db"]) < 1.0
    assert rows[3]["psnr_db"] < rows[1]["psnr_db"] - 3.0


def test_timestep_outside_the_schedule_is_an_error(tmp_path):
    from experiments.shapes_world import datasets, x0_quality

    items = datasets.eval_layouts(1, 64, categories=("color",))
    truth = datasets.eval_truth_images(items, 64)
    with pytest.raises(ValueError, match=r"timesteps \[1000\] are outside \[0, 1000\)"):
        x0_quality.measure(os.path.join(WORLD, "pipeline"), os.path.join(WORLD, "clip"), items,
                           truth, timesteps=(0, 1000))
