"""weights.load_pipeline on a tiny diffusers StableDiffusionGLIGENPipeline folder: every part
loads (weights equal to the torch components'), the U-Net's outputs match diffusers', and a
missing subfolder is named in the error."""

import os
import shutil

import pytest
import torch

from goal_jax import weights
from test_unet import GATED2, inputs, make_torch_unet, max_diff, run_jax, run_torch

TOL = 1e-4


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, tokenizer_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionGLIGENPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=GATED2["cross_attention_dim"],
        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionGLIGENPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        unet=make_torch_unet(GATED2, seed=7), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = str(tmp_path_factory.mktemp("gligen_pipeline"))
    pipe.save_pretrained(folder)
    return folder, pipe


def _same_weights(params, folder, stem, ignore=()):
    """Our params, renamed to PyTorch names, equal the saved tensors of ``folder`` exactly
    (transformers >= 5 saves CLIPTextModel keys without the ``text_model.`` prefix)."""
    strip = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k  # noqa
    ours = {strip(k): v for k, v in weights.to_state_dict(params).items()}
    ref = {strip(k): v for k, v in weights.read_state_dict(folder, (stem,)).items()
           if not any(pattern in k for pattern in ignore)}
    assert set(ours) == set(ref)
    return max(max_diff(ours[k], ref[k]) for k in ref)


def test_load_pipeline_every_part(pipeline_folder):
    folder, torch_pipe = pipeline_folder
    pipe = weights.load_pipeline(folder)
    assert pipe.path == folder and pipe.unet.config.is_gligen

    sub = lambda name: os.path.join(folder, name)  # noqa: E731
    d_unet_w = _same_weights(pipe.unet_params, sub("unet"), "diffusion_pytorch_model")
    d_vae_w = _same_weights(pipe.vae_params, sub("vae"), "diffusion_pytorch_model")
    d_text_w = _same_weights(pipe.text_params, sub("text_encoder"), "model",
                             ignore=("position_ids",))
    assert d_unet_w == d_vae_w == d_text_w == 0.0

    caption = "a photo of a red cat left of a blue dog"
    ours = pipe.tokenizer(caption, padding="max_length", max_length=77).input_ids
    ref = torch_pipe.tokenizer(caption, padding="max_length", max_length=77).input_ids
    assert ours == ref
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    assert pipe.scheduler_config["_class_name"] == "DDIMScheduler"

    x, t, ctx, g = inputs(GATED2, seed=11)
    d_eps = max_diff(run_jax(pipe.unet, pipe.unet_params, x, t, ctx, g),
                     run_torch(torch_pipe.unet, x, t, ctx, g))
    print(f"pipeline: unet/vae/text weights identical; unet eps max abs diff {d_eps:.2e}")
    assert d_eps <= TOL


@pytest.mark.parametrize("missing", ["vae", "scheduler"])
def test_load_pipeline_missing_subfolder(pipeline_folder, tmp_path, missing):
    folder, _ = pipeline_folder
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken, ignore=lambda d, names: [missing] if d == folder else [])
    assert not os.path.exists(os.path.join(broken, missing))
    with pytest.raises(weights.CheckpointError, match=f"has no {missing}/ subfolder"):
        weights.load_pipeline(broken)


def test_load_pipeline_missing_folder(tmp_path):
    with pytest.raises(weights.CheckpointError, match="pipeline folder not found"):
        weights.load_pipeline(str(tmp_path / "nowhere"))
