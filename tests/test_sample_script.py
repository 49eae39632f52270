"""scripts/sample.py end to end on the tiny diffusers GLIGEN pipeline, in-process."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from goal_jax import sampling, weights
from goal_jax.layout import Layout
from test_sampling import STEPS, tiny_pipeline

_SPEC = importlib.util.spec_from_file_location(
    "sample_script", os.path.join(os.path.dirname(__file__), "..", "scripts", "sample.py"))
sample_script = importlib.util.module_from_spec(_SPEC)
sys.modules["sample_script"] = sample_script
_SPEC.loader.exec_module(sample_script)

ITEMS = [
    {"caption": "a red cat left of a blue dog", "phrases": ["a red cat", "a blue dog"],
     "boxes": [[0.05, 0.1, 0.5, 0.9], [0.55, 0.2, 0.95, 0.7]], "seed": 3, "id": "cats"},
    {"caption": "a green tree", "phrases": ["a green tree"], "boxes": [[0.2, 0.0, 0.8, 0.6]]},
    {"caption": "a yellow star", "phrases": [], "boxes": []},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_dir):
    return tiny_pipeline(tmp_path_factory, tokenizer_dir)[0]


def _args(folder, out, *extra):
    # Same settings as the parity test's guided run (2 devices, batch 2): one compiled program.
    return ["--pretrained", folder, "--output_dir", str(out), "--steps", str(STEPS),
            "--cfg", "7.5", "--beta", "0.3", "--batch_size", "2", "--num_devices", "2",
            "--no_progress", *extra]


def _write_jsonl(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))


def test_jsonl_run_resume_and_outputs(folder, tmp_path, capsys):
    jsonl, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    _write_jsonl(jsonl, ITEMS)
    assert sample_script.main(_args(folder, out, "--jsonl", str(jsonl), "--seed", "100")) == 0
    names = ["cats", "line00002", "line00003"]
    assert sorted(os.listdir(out)) == sorted(
        f"{n}{suffix}" for n in names for suffix in (".png", "_boxes.png", ".json"))
    assert "3 item(s); skipping 0" in capsys.readouterr().out

    meta = json.loads((out / "line00002.json").read_text())
    assert meta["seed"] == 101  # --seed + line - 1
    assert meta["caption"] == "a green tree" and meta["phrases"] == ["a green tree"]
    assert meta["boxes"] == [[0.2, 0.0, 0.8, 0.6]] and meta["source"].endswith("line 2")
    settings = meta["settings"]
    assert (settings["num_steps"], settings["guidance_scale"], settings["beta"]) == (STEPS, 7.5,
                                                                                      0.3)
    assert settings["sampler"] == "ddim" and settings["num_grounding_steps"] == 2
    assert (settings["height"], settings["width"]) == (16, 16)
    assert meta["pretrained"] == os.path.abspath(folder) and meta["checkpoint"] is None
    assert json.loads((out / "cats.json").read_text())["seed"] == 3

    # The PNGs hold exactly the sampler's uint8 images for the same seeds.
    sampler = sampling.GLIGENPipeline(weights.load_pipeline(folder), devices=jax.devices()[:2])
    options = sampling.SampleOptions(num_steps=STEPS, guidance_scale=7.5, beta=0.3)
    layouts = [Layout(it["phrases"], it["boxes"]) for it in ITEMS[:2]]
    expected = sampler.sample([it["caption"] for it in ITEMS[:2]], layouts, [3, 101], options)
    for name, image in zip(names, expected.images):
        png = np.asarray(Image.open(out / f"{name}.png"))
        assert png.shape == (16, 16, 3) and png.dtype == np.uint8
        np.testing.assert_array_equal(png, image)
    boxes_png = np.asarray(Image.open(out / "cats_boxes.png"))
    assert boxes_png.shape == (256, 256, 3)
    # The boxes are drawn: the red outline's top edge of box 0 is in the drawn image.
    assert (boxes_png[int(0.1 * 255), int(0.3 * 255)] == (230, 25, 75)).all()

    # Rerun: everything is skipped, nothing rewritten.
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    assert sample_script.main(_args(folder, out, "--jsonl", str(jsonl))) == 0
    assert "3 item(s); skipping 3 whose outputs exist" in capsys.readouterr().out
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == mtimes

    # A new line: only it is sampled; a partly written item (no metadata) is redone.
    os.remove(out / "line00003.json")
    _write_jsonl(jsonl, ITEMS + [{"caption": "a cat", "phrases": ["a cat"],
                                  "boxes": [[0, 0, 1, 1]], "id": "new"}])
    assert sample_script.main(_args(folder, out, "--jsonl", str(jsonl))) == 0
    assert "4 item(s); skipping 2 whose outputs exist" in capsys.readouterr().out
    assert (out / "new.png").exists() and (out / "line00003.json").exists()
    assert os.stat(out / "cats.png").st_mtime_ns == mtimes["cats.png"]


def test_single_caption_inline_layout(folder, tmp_path, capsys):
    out = tmp_path / "one"
    layout = json.dumps({"phrases": ["a blue dog"], "boxes": [[0.1, 0.1, 0.9, 0.9]], "seed": 9})
    assert sample_script.main(_args(folder, out, "--caption", "a blue dog",
                                    "--layout", layout)) == 0
    meta = json.loads((out / "sample.json").read_text())
    assert meta["seed"] == 9 and meta["caption"] == "a blue dog"
    assert meta["source"] == "--layout"
    assert (out / "sample.png").exists() and (out / "sample_boxes.png").exists()


BAD_LINES = [
    ({"caption": "x", "phrases": ["a cat"], "boxes": [[0.1, 0.1, 0.6, 1.5]]},
     "prompts.jsonl line 2: box 0 ('a cat') is outside [0, 1]"),
    ({"caption": "x", "phrases": ["a cat"], "boxes": [[0.6, 0.1, 0.2, 0.5]]},
     "prompts.jsonl line 3: box 0 ('a cat') has x0 >= x1"),
    ({"caption": "x", "phrases": [""], "boxes": [[0.1, 0.1, 0.2, 0.5]]},
     "prompts.jsonl line 4: phrase 0 is empty"),
    ({"caption": "x", "phrases": ["o"] * 31, "boxes": [[0.1, 0.1, 0.2, 0.5]] * 31},
     "prompts.jsonl line 5: 31 boxes, at most 30 are supported"),
    ('{"caption": "x"', "prompts.jsonl line 6: malformed JSON: Expecting ',' delimiter at "
                        "column 16"),
    ({"caption": "x", "phrases": [], "boxes": [], "id": "cats"},
     "prompts.jsonl line 7: id 'cats' already used on line 1"),
]


def test_bad_jsonl_lines_listed_and_good_lines_sampled(folder, tmp_path, capsys):
    """Every bad line is listed with its number (the JSON column is the line's own), the good
    lines are sampled, and the exit status is 2."""
    jsonl, out = tmp_path / "prompts.jsonl", tmp_path / "o"
    lines = [json.dumps(ITEMS[0])] + [x if isinstance(x, str) else json.dumps(x)
                                      for x, _ in BAD_LINES]
    jsonl.write_text("\n".join(lines) + "\n")
    assert sample_script.main(_args(folder, out, "--jsonl", str(jsonl))) == 2
    err = capsys.readouterr().err
    assert "6 bad line(s) in" in err
    for _, message in BAD_LINES:
        assert message in err
    assert "line 2 column" not in err
    assert sorted(os.listdir(out)) == ["cats.json", "cats.png", "cats_boxes.png"]


def test_jsonl_without_good_line_writes_nothing(folder, tmp_path, capsys):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps(BAD_LINES[0][0]) + "\n")
    assert sample_script.main(_args(folder, tmp_path / "o", "--jsonl", str(jsonl))) == 2
    assert "prompts.jsonl line 1: box 0 ('a cat') is outside [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_single_layout(folder, tmp_path, capsys):
    args = _args(folder, tmp_path / "o", "--caption", "a cat", "--layout",
                 '{"phrases": ["a cat"], "boxes": [[0.1, 0.5, 0.3, 0.2]]}')
    assert sample_script.main(args) == 2
    assert "--layout: box 0 ('a cat') has y0 >= y1: [0.1, 0.5, 0.3, 0.2]" in \
        capsys.readouterr().err
    layout_file = tmp_path / "layout.json"
    layout_file.write_text('{"caption": "a dog", "phrases": [], "boxes": []}')
    args = _args(folder, tmp_path / "o", "--caption", "a cat", "--layout", str(layout_file))
    assert sample_script.main(args) == 2
    assert "has caption 'a dog' but --caption is 'a cat'" in capsys.readouterr().err


def test_checkpoint_unet(folder, tmp_path):
    """--checkpoint: the U-Net leaves stored in a training checkpoint replace the base ones."""
    import jax.numpy as jnp
    import optax

    from goal_jax import checkpoints, train

    pipe = weights.load_pipeline(folder)
    bias = np.asarray(pipe.unet_params["conv_out"]["bias"]) + 0.5
    ckpt = str(tmp_path / "ckpt")
    # What the training loop saves: a TrainState whose params are the trainable U-Net leaves.
    trainable = {"conv_out": {"bias": jnp.asarray(bias)}}
    state = train.TrainState(step=jnp.int32(7), params=trainable,
                             opt_state=optax.adam(1e-3).init(trainable),
                             rng=jax.random.key(1))
    manager = checkpoints.CheckpointManager(ckpt, async_save=False)
    manager.save(7, state)
    manager.close()

    params, info = weights.load_trained_unet(ckpt, pipe.unet_params)
    assert (info["step"], info["replaced"]) == (7, 1)
    assert info["total"] == len(jax.tree_util.tree_leaves(pipe.unet_params))
    np.testing.assert_array_equal(params["conv_out"]["bias"], bias)
    np.testing.assert_array_equal(params["conv_in"]["kernel"],
                                  pipe.unet_params["conv_in"]["kernel"])

    out = tmp_path / "out"
    layout = json.dumps({"phrases": ["a cat"], "boxes": [[0.1, 0.1, 0.9, 0.9]]})
    assert sample_script.main(_args(folder, out, "--caption", "a cat", "--layout", layout,
                                    "--checkpoint", ckpt)) == 0
    meta = json.loads((out / "sample.json").read_text())
    assert meta["checkpoint"] == os.path.abspath(ckpt)
    assert meta["checkpoint_info"]["step"] == 7 and meta["checkpoint_info"]["replaced"] == 1

    for name, tree, message in (
            ("shape", {"params": {"conv_out": {"bias": np.zeros(3, np.float32)}}},
             r"conv_out/bias: checkpoint \(3,\), U-Net \(4,\)"),
            ("noparams", {"unet": {"conv_out": {"bias": np.zeros(4, np.float32)}}},
             r"holds no 'params' tree; it holds \['unet'\]")):
        bad = str(tmp_path / name)
        manager = checkpoints.CheckpointManager(bad, async_save=False)
        manager.save(1, tree)
        manager.close()
        with pytest.raises(weights.CheckpointError, match=message):
            weights.load_trained_unet(bad, pipe.unet_params)
    with pytest.raises(weights.CheckpointError, match="checkpoint folder not found"):
        weights.load_trained_unet(str(tmp_path / "missing"), pipe.unet_params)


@pytest.mark.parametrize("extra,message", [
    (["--beta", "1.5"], "beta (scheduled sampling) must be in [0, 1], got 1.5"),
    (["--sampler", "pndm", "--eta", "0.5"], "eta is a DDIM option"),
    (["--steps", "0"], "num_steps must be an integer >= 1, got 0"),
])
def test_bad_settings_exit_before_sampling(folder, tmp_path, capsys, extra, message):
    args = _args(folder, tmp_path / "o", "--caption", "a cat", *extra)
    assert sample_script.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
