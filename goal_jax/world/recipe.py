"""The shapes-world recipe: data, VAE, CLIP, U-Net (LDM), GLIGEN stage, export, evaluation.

``run(config, workdir, out)`` runs every stage in order; each stage resumes from its last save
under ``<workdir>/stages/<name>/`` and a finished stage is only reloaded, so rerunning the
command after an interruption (or after it finished) continues where it stopped. The result:

    <out>/pipeline/   diffusers StableDiffusionGLIGENPipeline folder (model_index.json, unet/
                      vae/ text_encoder/ tokenizer/ scheduler/), safetensors
    <out>/clip/       Hugging Face CLIPModel folder + tokenizer (the DSAlign CLIP)
    <out>/world.json  how each part was made: command, config, steps, wall time, metrics
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np

from goal_jax import text as text_lib, weights
from goal_jax.data import shapes
from goal_jax.world import clip_stage, data, models, unet_stage, vae_stage


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_pipeline(folder: str, workdir: str, unet, unet_params, text_config: dict,
                   text_params) -> None:
    """Writes the diffusers GLIGEN pipeline folder from the stages' outputs."""
    os.makedirs(folder, exist_ok=True)
    weights.save_unet(os.path.join(folder, "unet"), unet, unet_params)
    for sub in ("vae", "tokenizer"):
        dst = os.path.join(folder, sub)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(workdir, sub), dst)
    weights.write_safetensors(os.path.join(folder, "text_encoder"),
                              weights.to_state_dict(text_params), text_config, "model")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                models.SCHEDULER_CONFIG)
    _write_json(os.path.join(folder, "model_index.json"), models.MODEL_INDEX)


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder)
               for f in files)


def run(config, workdir: str, out: str, command: str = "", log=print) -> dict:
    """Runs (or resumes) the whole recipe; returns the world.json record."""
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t0 = time.time()
    train_split = data.WorldSplit(data.render_split(
        os.path.join(workdir, "data", "train"), "train", config.data.train_items, config.seed,
        config.data.resolution, log))
    heldout = data.WorldSplit(data.render_split(
        os.path.join(workdir, "data", "heldout"), "heldout", config.data.heldout_items,
        config.seed, config.data.resolution, log))
    timings["data_s"] = time.time() - t0

    tok_dir = os.path.join(workdir, "tokenizer")
    text_lib.write_word_vocab(tok_dir, shapes.VOCABULARY)
    tokenizer = text_lib.load_tokenizer(tok_dir)

    vae_info = vae_stage.train(config, workdir, train_split, heldout, log)
    clip_info, clip_model, clip_params = clip_stage.train(config, workdir, tokenizer,
                                                          train_split, log)
    t = time.time()
    clip_info["zero_shot_heldout"] = clip_stage.zero_shot(clip_model, clip_params, tokenizer,
                                                          heldout)
    log(f"[clip] zero-shot on held-out regions: {clip_info['zero_shot_heldout']}")
    timings["clip_eval_s"] = time.time() - t

    clip_dict = weights.read_config(os.path.join(workdir, "clip"))
    text_config = models.text_encoder_config(clip_dict)
    text_encoder, _ = _text_encoder(text_config)
    text_params = {"text_model": clip_params["text_model"]}

    vae, vae_params = weights.load_vae(os.path.join(workdir, "vae"))
    t = time.time()
    latents = unet_stage.encode_latents(vae, vae_params, train_split,
                                        os.path.join(workdir, "latents.npy"), log)
    cache = unet_stage.TextCache(tokenizer, train_split, config.data.max_boxes)
    timings["latents_s"] = time.time() - t

    unet = unet_stage.build(config, text_config["hidden_size"])
    unet_params = models.init_params(unet, config.seed + 3)
    ldm_info, unet_params = unet_stage.train(config, workdir, "ldm", unet_params, text_encoder,
                                             text_params, latents, cache, log)
    gligen_info, unet_params = unet_stage.train(config, workdir, "gligen", unet_params,
                                                text_encoder, text_params, latents, cache, log)

    pipeline_dir = os.path.join(out, "pipeline")
    write_pipeline(pipeline_dir, workdir, unet, unet_params, text_config, text_params)
    clip_out = os.path.join(out, "clip")
    shutil.rmtree(clip_out, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "clip"), clip_out)

    t = time.time()
    evaluation = evaluate_world(config, pipeline_dir, heldout, unet_params=None,
                                init_unet_params=models.init_params(unet, config.seed + 3),
                                picture=os.path.join(out, "world_samples.png"), log=log)
    timings["eval_s"] = time.time() - t
    record = {
        "command": command,
        "evaluation": evaluation,
        "config": json.loads(config.to_json()),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "data": {"generator": "goal_jax.data.shapes.render_item_objects via "
                              "goal_jax.world.data.render_split",
                 "train_items": config.data.train_items,
                 "heldout_items": config.data.heldout_items,
                 "resolution": config.data.resolution, "seed": config.seed},
        "stages": {"vae": vae_info, "clip": clip_info, "ldm": ldm_info, "gligen": gligen_info},
        "timings_s": timings,
        "size_bytes": {"pipeline": folder_size(pipeline_dir), "clip": folder_size(clip_out)},
    }
    _write_json(os.path.join(out, "world.json"), record)
    log(f"[world] wrote {out} ({sum(record['size_bytes'].values()) / 2**20:.1f} MiB)")
    return record


def _text_encoder(text_config: dict):
    from goal_jax.models import clip as clip_lib

    cfg = clip_lib.CLIPTextConfig.from_dict(text_config)
    return clip_lib.CLIPTextModel(config=cfg), cfg


EVAL_CATEGORIES = ("color", "texture", "spatial", "shape")


def evaluate_world(config, pipeline_dir: str, heldout, unet_params=None, init_unet_params=None,
                   picture: str | None = None, log=print) -> dict:
    """Oracle scores of the exported world on ``config.eval.layouts`` held-out two-object
    layouts (categories colour / texture / spatial / shape): the ground-truth renders (the
    ceiling), samples of the pipeline (25 DDIM steps, CFG ``eval.guidance_scale``, grounding
    for the first ``eval.beta`` of the steps) and, when ``init_unet_params`` is given, samples
    of the same architecture with its random initial weights (the floor). Writes a picture
    grid of the first 8 layouts to ``picture``."""
    from goal_jax.world import evaluate as world_eval

    e = config.eval
    items = world_eval.heldout_items(heldout, e.layouts, EVAL_CATEGORIES, num_objects=2)
    pipe = weights.load_pipeline(pipeline_dir)
    truth = np.stack([np.asarray(heldout.images[it["index"]]) for it in items])
    rows = {"ground truth": truth}
    rows["world"] = world_eval.sample_items(pipe, items, unet_params, e.num_steps,
                                            e.guidance_scale, e.beta)
    if init_unet_params is not None:
        rows["random weights"] = world_eval.sample_items(pipe, items, init_unet_params,
                                                         e.num_steps, e.guidance_scale, e.beta)
    result = {"layouts": len(items), "categories": list(EVAL_CATEGORIES),
              "sampler": {"name": "ddim", "num_steps": e.num_steps,
                          "guidance_scale": e.guidance_scale, "beta": e.beta}}
    for name, images in rows.items():
        result[name] = world_eval.score(images, items)["summary"]
        b = result[name]["boxes"]
        log(f"[eval] {name}: object in box {b['present']:.3f}, named colour in box "
            f"{b['color_in_box']:.3f}, shape {b['shape']}, texture {b['texture']}, "
            f"IoU {b['iou']}, verdict {result[name]['verdict']}")
    if picture:
        order = ["ground truth", "world", "random weights"]
        world_eval.layout_grid([(k, rows[k][:8]) for k in order if k in rows], items[:8],
                               picture)
    return result
