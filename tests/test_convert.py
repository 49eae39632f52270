"""scripts/convert.py: diffusers folder -> orbax -> diffusers folder, and a training checkpoint
-> diffusers folder, checked by loading the results with diffusers' PyTorch GLIGEN pipeline."""

import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import convert  # noqa: E402

from goal_jax import checkpoints, weights  # noqa: E402

PHRASES = ["a red circle", "a blue square"]
BOXES = [[0.1, 0.2, 0.5, 0.6], [0.55, 0.3, 0.9, 0.8]]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, tokenizer_dir):
    """A tiny diffusers StableDiffusionGLIGENPipeline (GLIGEN gates non-zero) saved to disk."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionGLIGENPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, sample_size=16,
        attention_type="gated")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.7)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionGLIGENPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = str(tmp_path_factory.mktemp("gligen") / "pipeline")
    pipe.save_pretrained(folder)
    return folder


def run_pipeline(folder):
    from diffusers import StableDiffusionGLIGENPipeline

    pipe = StableDiffusionGLIGENPipeline.from_pretrained(folder, safety_checker=None,
                                                         feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a red circle and a blue square", gligen_phrases=PHRASES,
               gligen_boxes=BOXES, gligen_scheduled_sampling_beta=1.0, height=32, width=32,
               num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return pipe, np.asarray(out.images)


def state_dicts(pipe):
    return {name: {k: v.detach().numpy().copy() for k, v in getattr(pipe, name).state_dict()
                   .items()} for name in ("unet", "vae", "text_encoder")}


def test_round_trip_diffusers_orbax_diffusers(pipeline_folder, tmp_path):
    orbax_dir, back_dir = str(tmp_path / "orbax"), str(tmp_path / "back")
    assert convert.main(["to-orbax", "--src", pipeline_folder, "--dst", orbax_dir]) == 0
    for sub in ("unet", "vae", "text_encoder"):
        assert weights.is_orbax_folder(os.path.join(orbax_dir, sub))
        assert not any(n.endswith(".safetensors") for n in os.listdir(os.path.join(orbax_dir,
                                                                                   sub)))
    # the orbax form loads to exactly the parameters of the safetensors form
    a = weights.load_pipeline(pipeline_folder)
    b = weights.load_pipeline(orbax_dir)
    for name in ("unet_params", "vae_params", "text_params"):
        fa = weights.to_state_dict(getattr(a, name))
        fb = weights.to_state_dict(getattr(b, name))
        assert fa.keys() == fb.keys()
        assert all(np.array_equal(fa[k], fb[k]) for k in fa), name

    assert convert.main(["to-diffusers", "--src", orbax_dir, "--dst", back_dir]) == 0
    original, images = run_pipeline(pipeline_folder)
    restored, images_back = run_pipeline(back_dir)
    sa, sb = state_dicts(original), state_dicts(restored)
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        worst = max(float(np.max(np.abs(sa[name][k] - sb[name][k]))) for k in sa[name])
        assert worst == 0.0, (name, worst)
    diff = float(np.max(np.abs(images - images_back)))
    print(f"round trip: pipeline output max abs diff {diff}")
    assert images.shape == (1, 32, 32, 3) and diff == 0.0


def test_checkpoint_to_diffusers(pipeline_folder, tmp_path):
    """A training checkpoint (trainable U-Net subset in state['params']) over its base."""
    import jax
    from flax import traverse_util

    from goal_jax import train as train_lib

    _, base = weights.load_component(os.path.join(pipeline_folder, "unet"), "unet")
    trainable, _ = train_lib.partition_params(base, train_lib.PAPER_TRAINABLE)
    trained = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.25, trainable)
    state = {"step": np.int32(7), "params": trained, "rng": np.zeros(2, np.uint32)}
    ckpt_dir = str(tmp_path / "checkpoints")
    manager = checkpoints.CheckpointManager(ckpt_dir, async_save=False)
    manager.save(7, state, data_state={"epoch": 0, "batch": 7},
                 metadata={"pipeline": pipeline_folder})
    manager.close()

    out = str(tmp_path / "exported")
    assert convert.main(["to-diffusers", "--checkpoint", ckpt_dir, "--dst", out]) == 0
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for name in os.listdir(os.path.join(pipeline_folder, sub)):
            with open(os.path.join(pipeline_folder, sub, name), "rb") as f1, \
                    open(os.path.join(out, sub, name), "rb") as f2:
                assert f1.read() == f2.read(), (sub, name)  # copied untouched
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionGLIGENPipeline"

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    ref = UNet2DConditionModel.from_pretrained(os.path.join(pipeline_folder, "unet"))
    got = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    trained_keys = set(weights.to_state_dict(trained))
    assert len(trained_keys) > 0 and trained_keys < set(want)
    for k in want:
        delta = float(np.max(np.abs(got[k] - want[k])))
        expected = 0.25 if k in trained_keys else 0.0
        assert delta == pytest.approx(expected, abs=1e-6), k
    flat = traverse_util.flatten_dict(trained)
    assert any("fuser" in "/".join(p) for p in flat) and any("attn2" in "/".join(p) for p in flat)


def test_convert_errors(pipeline_folder, tmp_path, capsys):
    assert convert.main(["to-orbax", "--src", str(tmp_path / "nope"),
                         "--dst", str(tmp_path / "o")]) == 1
    assert "--src folder not found" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("1")
    assert convert.main(["to-orbax", "--src", pipeline_folder, "--dst", str(busy)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert convert.main(["to-diffusers", "--checkpoint", str(tmp_path / "none"),
                         "--src", pipeline_folder, "--dst", str(tmp_path / "d")]) == 1
    assert "checkpoint folder not found" in capsys.readouterr().err
