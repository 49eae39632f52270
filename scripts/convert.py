"""Checkpoint conversion between Hugging Face / diffusers folders and orbax.

Hugging Face / diffusers folder -> orbax params (fast start-up: no safetensors parsing, no
PyTorch-layout transposes; goal_jax.weights.load_pipeline / load_component read it, and so do
scripts/train.py, sample.py and evaluate.py)::

    python scripts/convert.py to-orbax --src /models/gligen-1-4-generation-text-box \\
        --dst /models/gligen-orbax
    python scripts/convert.py to-orbax --src /models/clip-vit-large-patch14 --dst /models/clip-orbax

Orbax folder, diffusers folder, or a GOAL training checkpoint -> a diffusers GLIGEN pipeline
folder that diffusers' ``StableDiffusionGLIGENPipeline.from_pretrained`` loads::

    python scripts/convert.py to-diffusers --src /models/gligen-orbax --dst /models/gligen-back
    python scripts/convert.py to-diffusers --checkpoint runs/goal/checkpoints [--step 14000] \\
        [--src /models/gligen-1-4-generation-text-box] --dst /models/goal-gligen

With ``--checkpoint`` the U-Net is the base pipeline's (``--src``, default: the pipeline the
run trained from, found from the checkpoint folder as ``weights.base_pipeline_of`` says, so a
moved workdir still works) with the trained parameters of the checkpoint put in
(``weights.load_trained_unet``: params only, never the optimizer state); the VAE, text encoder, tokenizer, scheduler and
model_index.json are copied unchanged (safetensors folders byte for byte; orbax components are
written back as safetensors).

Folder forms: a pipeline folder has ``unet/``; a single model folder has ``config.json`` (kind
from its ``model_type`` / ``_class_name``: CLIPModel, CLIPTextModel, UNet2DConditionModel,
AutoencoderKL). In orbax form each model folder holds ``config.json`` + ``params/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make goal_jax importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
         "text_encoder": "model", "clip": "model"}


class ConvertError(ValueError):
    """A folder or checkpoint that cannot be converted; the message names it."""


def model_kind(folder: str) -> str:
    """"unet" | "vae" | "text_encoder" | "clip" from a model folder's config.json."""
    from goal_jax import weights

    config = weights.read_config(folder)
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    model_type = config.get("model_type")
    if name == "UNet2DConditionModel":
        return "unet"
    if name == "AutoencoderKL":
        return "vae"
    if model_type == "clip" or name == "CLIPModel":
        return "clip"
    if model_type == "clip_text_model" or name == "CLIPTextModel":
        return "text_encoder"
    raise ConvertError(
        f"{folder}/config.json: cannot tell the model kind (_class_name={name!r}, "
        f"model_type={model_type!r}); supported: UNet2DConditionModel, AutoencoderKL, "
        "CLIPModel, CLIPTextModel")


def is_pipeline(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "unet"))


def _copy_extras(src: str, dst: str, skip: Sequence[str]) -> None:
    """Copies every file and subfolder of ``src`` not in ``skip`` (tokenizer/, scheduler/,
    model_index.json, ...) to ``dst``."""
    for name in sorted(os.listdir(src)):
        if name in skip or name.startswith("."):
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)


def _check_dst(dst: str) -> None:
    if os.path.exists(dst) and os.listdir(dst):
        raise ConvertError(f"--dst {dst} exists and is not empty; choose a new folder")
    os.makedirs(dst, exist_ok=True)


def _config_files(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".json")
            and ".safetensors" not in n and not n.endswith(".index.json")]


def model_to_orbax(src: str, dst: str, kind: str | None = None) -> str:
    """One model folder (safetensors) -> ``dst`` with its JSON configs + orbax ``params/``."""
    from goal_jax import weights

    kind = kind or model_kind(src)
    _, params = weights.load_component(src, kind)
    os.makedirs(dst, exist_ok=True)
    for name in _config_files(src):
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    weights.save_params(os.path.join(dst, weights.PARAMS_DIR), params)
    return kind


def to_orbax(src: str, dst: str) -> list[str]:
    """A pipeline or model folder -> its orbax form in ``dst``; returns the converted parts."""
    if not os.path.isdir(src):
        raise ConvertError(f"--src folder not found: {src}")
    _check_dst(dst)
    if not is_pipeline(src):
        return [model_to_orbax(src, dst)]
    done = []
    for sub in MODEL_COMPONENTS:
        if not os.path.isdir(os.path.join(src, sub)):
            raise ConvertError(f"pipeline folder {src} has no {sub}/ subfolder")
        model_to_orbax(os.path.join(src, sub), os.path.join(dst, sub), sub)
        done.append(sub)
    _copy_extras(src, dst, skip=MODEL_COMPONENTS)
    return done


def model_to_diffusers(src: str, dst: str, kind: str | None = None, params=None) -> None:
    """One model folder (either form) -> safetensors folder ``dst``. ``params`` (Flax tree)
    replaces the folder's parameters (e.g. a trained U-Net)."""
    from goal_jax import weights

    kind = kind or model_kind(src)
    if params is None and not weights.is_orbax_folder(src):
        shutil.copytree(src, dst)  # already diffusers / HF: byte for byte
        return
    module, loaded = weights.load_component(src, kind)
    params = loaded if params is None else params
    os.makedirs(dst, exist_ok=True)
    for name in _config_files(src):
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    if kind == "unet":
        weights.save_unet(dst, module, params)  # writes config.json from the module config
    else:
        weights.write_safetensors(dst, weights.to_state_dict(params),
                                  weights.read_config(src), STEMS[kind])


def to_diffusers(src: str | None, dst: str, checkpoint: str | None = None,
                 step: int | None = None) -> dict:
    """Orbax / diffusers folder (or a training checkpoint over its base pipeline) -> a
    diffusers folder in ``dst``. Returns {"src", "step", "trained"} (trained = number of
    U-Net tensors taken from the checkpoint)."""
    from goal_jax import weights

    info = {"src": src, "step": None, "trained": 0}
    unet_params = None
    if checkpoint is not None:
        if src is None:
            src = info["src"] = weights.base_pipeline_of(checkpoint, step)
        if not os.path.isdir(src) or not is_pipeline(src):
            raise ConvertError(f"base pipeline folder not found or has no unet/: {src}")
        _, base = weights.load_component(os.path.join(src, "unet"), "unet")
        unet_params, found = weights.load_trained_unet(checkpoint, base, step)
        info["step"], info["trained"] = found["step"], found["replaced"]
    if src is None or not os.path.isdir(src):
        raise ConvertError(f"--src folder not found: {src}")
    _check_dst(dst)
    if not is_pipeline(src):
        shutil.rmtree(dst)  # model_to_diffusers creates it
        model_to_diffusers(src, dst)
        return info
    for sub in MODEL_COMPONENTS:
        if not os.path.isdir(os.path.join(src, sub)):
            raise ConvertError(f"pipeline folder {src} has no {sub}/ subfolder")
        model_to_diffusers(os.path.join(src, sub), os.path.join(dst, sub), sub,
                           params=unet_params if sub == "unet" else None)
    _copy_extras(src, dst, skip=MODEL_COMPONENTS)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-orbax", help="HF / diffusers folder -> orbax params folder")
    a.add_argument("--src", required=True)
    a.add_argument("--dst", required=True)
    b = sub.add_parser("to-diffusers",
                       help="orbax folder or training checkpoint -> diffusers folder")
    b.add_argument("--src", default=None,
                   help="orbax or diffusers folder; with --checkpoint the base pipeline "
                        "(default: the one named in the checkpoint)")
    b.add_argument("--checkpoint", default=None, help="training checkpoint directory")
    b.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    b.add_argument("--dst", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from goal_jax.weights import CheckpointError

    try:
        if args.command == "to-orbax":
            parts = to_orbax(args.src, args.dst)
            print(f"wrote orbax params of {parts} to {args.dst}")
        else:
            info = to_diffusers(args.src, args.dst, args.checkpoint, args.step)
            what = (f" with {info['trained']} trained U-Net tensors from step {info['step']}"
                    if args.checkpoint else "")
            print(f"wrote diffusers folder {args.dst} from {info['src']}{what}")
    except (ConvertError, CheckpointError, FileNotFoundError) as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
