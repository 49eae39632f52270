"""generate_images.py's local source: goal_jax's sampler (text only, no layout) on the tiny
demo pipeline (goal_jax.demo_models, 16x16 images, 2 DDIM steps)."""

import os

import numpy as np
from PIL import Image

from data_prep import common, generate_images


def test_local_source_generates_and_resumes(tmp_path):
    from goal_jax import demo_models, sampling
    from goal_jax.layout import Layout

    paths = demo_models.write_demo_models(str(tmp_path / "demo"), resolution=16)
    records = [{"id": "shape_0000", "prompt": "a red circle", "category": "shape",
                "phrases": [{"phrase": "a red circle", "count": 1}], "source": "template"},
               {"id": "color_0001", "prompt": "a blue star and a green square", "category": "color"}]
    source = generate_images.LocalSource(paths.pipeline, num_steps=2, guidance_scale=1.0,
                                         batch_size=2, num_devices=2)
    assert source._sampler is None  # nothing of goal_jax.sampling / jax is used before the first item
    work = str(tmp_path / "work")
    stats = generate_images.generate_all(records, source, work, base_seed=5, show_progress=False)
    assert stats == {"total": 2, "skipped": 0, "generated": 2, "failed": 0}
    lines = common.read_jsonl(os.path.join(work, "manifest.jsonl"))
    seeds = [generate_images.item_seed(5, r["id"]) for r in records]
    assert [l["seed"] for l in lines] == seeds and seeds[0] != seeds[1]
    assert lines[0]["source"] == "local:pipeline" and lines[0]["phrases"] == records[0]["phrases"]
    assert lines[0]["sampler_settings"]["num_steps"] == 2
    # The saved PNGs are exactly the sampler's text-only images for those seeds.
    out = source._sampler.sample([r["prompt"] for r in records], [Layout(), Layout()], seeds,
                                 sampling.SampleOptions(num_steps=2, guidance_scale=1.0))
    for line, expected in zip(lines, out.images):
        got = np.asarray(Image.open(os.path.join(work, line["image"])))
        assert got.shape == (16, 16, 3)
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(out.images[0], out.images[1])
    # Resume: a fresh source with everything done never loads the pipeline.
    again = generate_images.LocalSource(paths.pipeline, num_steps=2, guidance_scale=1.0)
    stats = generate_images.generate_all(records, again, work, base_seed=5, show_progress=False)
    assert stats["skipped"] == 2 and stats["generated"] == 0 and again._sampler is None
