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


def _render_splits(config, workdir: str, timings: dict, log):
    """(train, heldout) WorldSplits, rendered under ``<workdir>/data`` unless already there."""
    t0 = time.time()
    splits = tuple(data.WorldSplit(data.render_split(
        os.path.join(workdir, "data", name), name, n, config.seed, config.data.resolution, log))
        for name, n in (("train", config.data.train_items),
                        ("heldout", config.data.heldout_items)))
    timings["data_s"] = time.time() - t0
    return splits


def _latents_and_texts(config, workdir: str, vae, vae_params, tokenizer, train_split,
                       timings: dict, log):
    """The cached training latents and the tokenized captions / phrases (unet_stage)."""
    t = time.time()
    latents = unet_stage.encode_latents(vae, vae_params, train_split,
                                        os.path.join(workdir, "latents.npy"), log)
    cache = unet_stage.TextCache(tokenizer, train_split, config.data.max_boxes)
    timings["latents_s"] = time.time() - t
    return latents, cache


def run(config, workdir: str, out: str, command: str = "", log=print) -> dict:
    """Runs (or resumes) the whole recipe; returns the world.json record."""
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    train_split, heldout = _render_splits(config, workdir, timings, log)

    tok_dir = os.path.join(workdir, "tokenizer")
    text_lib.write_word_vocab(tok_dir, shapes.VOCABULARY)
    tokenizer = text_lib.load_tokenizer(tok_dir)

    vae_info = vae_stage.train(config, workdir, train_split, heldout, log)
    clip_info, text_encoder, text_config, text_params = _clip(config, workdir, tokenizer,
                                                              train_split, heldout, timings,
                                                              log)
    vae, vae_params = weights.load_vae(os.path.join(workdir, "vae"))
    latents, cache = _latents_and_texts(config, workdir, vae, vae_params, tokenizer,
                                        train_split, timings, log)

    unet = unet_stage.build(config, text_config["hidden_size"])
    unet_params = models.init_params(unet, config.seed + 3)
    ldm_info, unet_params = unet_stage.train(config, workdir, "ldm", unet_params, text_encoder,
                                             text_params, latents, cache, log)
    stages = {"vae": vae_info, "clip": clip_info, "ldm": ldm_info}
    return _gligen_and_export(config, workdir, out, unet, unet_params, text_encoder,
                              text_config, text_params, latents, cache, heldout, stages,
                              timings, command, log)


def _clip(config, workdir: str, tokenizer, train_split, heldout, timings: dict, log):
    """The CLIP stage and its zero-shot evaluation; returns (record, text encoder module,
    text encoder config dict, text encoder params): the pipeline's text encoder is the
    CLIP's text tower."""
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
    return clip_info, text_encoder, text_config, {"text_model": clip_params["text_model"]}


def _gligen_and_export(config, workdir: str, out: str, unet, unet_params, text_encoder,
                       text_config: dict, text_params, latents, cache, heldout, stages: dict,
                       timings: dict, command: str, log) -> dict:
    """The GLIGEN stage from ``unet_params`` (its GLIGEN layers untrained), the export of
    ``<out>/pipeline`` and ``<out>/clip``, the evaluation and ``<out>/world.json``."""
    unet_params = unet_stage.set_gates(unet_params, config.gligen.get("gate_init", 0.0))
    stages["gligen"], unet_params = unet_stage.train(config, workdir, "gligen", unet_params,
                                                     text_encoder, text_params, latents, cache,
                                                     log)

    pipeline_dir = os.path.join(out, "pipeline")
    write_pipeline(pipeline_dir, workdir, unet, unet_params, text_config, text_params)
    clip_out = os.path.join(out, "clip")
    if os.path.abspath(clip_out) != os.path.abspath(os.path.join(workdir, "clip")):
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
        "stages": stages,
        "timings_s": timings,
        "size_bytes": {"pipeline": folder_size(pipeline_dir), "clip": folder_size(clip_out)},
    }
    _write_json(os.path.join(out, "world.json"), record)
    log(f"[world] wrote {out} ({sum(record['size_bytes'].values()) / 2**20:.1f} MiB)")
    return record


BASE_STAGES = ("clip", "ldm", "gligen")


class BaseWorldError(ValueError):
    """The ``--base`` world cannot serve a rerun (see :func:`check_base`)."""


def check_base(config, base: str, from_stage: str) -> dict:
    """The base world's world.json record, after checking that ``base`` holds a world
    (world.json, pipeline/, clip/) whose data and reused models match ``config`` for a rerun
    from ``from_stage`` (see :func:`run_from_base`); BaseWorldError naming what is wrong."""
    if from_stage not in BASE_STAGES:
        raise BaseWorldError(f"from_stage {from_stage!r}: expected one of {BASE_STAGES}")
    needed = ("world.json", "pipeline/unet", "pipeline/vae", "pipeline/text_encoder",
              "pipeline/tokenizer", "clip")
    missing = [p for p in needed if not os.path.exists(os.path.join(base, p))]
    if missing:
        raise BaseWorldError(f"base world {base} is not a world folder: it has no "
                             f"{', '.join(missing)}")
    with open(os.path.join(base, "world.json"), encoding="utf-8") as f:
        base_record = json.load(f)
    same = {"data": config.data, "model.vae": config.model.vae}
    if from_stage != "clip":
        same["model.clip"] = config.model.clip
    if from_stage == "gligen":
        same["model.unet"] = config.model.unet
    for key, value in same.items():
        theirs = base_record["config"]
        for part in key.split("."):
            theirs = theirs[part]
        ours = json.loads(value.to_json())
        if key == "model.unet":  # the fusers' embedding only acts in the (rerun) GLIGEN stage
            theirs, ours = ({k: v for k, v in d.items() if k != "fuser_position_embedding"}
                            for d in (theirs, ours))
        if json.dumps(theirs, sort_keys=True) != json.dumps(ours, sort_keys=True):
            raise BaseWorldError(f"config.{key} differs from the base world's "
                                 f"({base}/world.json): the stages from {from_stage!r} on can "
                                 f"only be rerun on the same {key}")
    return base_record


def run_from_base(config, workdir: str, out: str, base: str, from_stage: str = "gligen",
                  command: str = "", log=print) -> dict:
    """Reruns the recipe from stage ``from_stage`` (then the export and evaluation) on the
    earlier stages of the world at ``base`` (a folder with ``pipeline/``, ``clip/`` and
    ``world.json``, e.g. assets/shapes_world), for a change of the later stages' settings
    without the cost of the earlier ones:

    * ``gligen``: only the GLIGEN stage, on the base's VAE, CLIP and LDM-pretrained U-Net (its
      GLIGEN layers are discarded and restart from the same initialisation as in :func:`run`);
      ``config.model.unet`` must equal the base's.
    * ``ldm``: the LDM and GLIGEN stages from the initialisation, on the base's VAE and CLIP;
      ``config.model.unet`` and the ``ldm`` / ``gligen`` settings may differ from the base's.
    * ``clip``: the CLIP, LDM and GLIGEN stages, on the base's VAE (and its tokenizer); the
      pipeline's text encoder is the new CLIP's text tower, so the U-Net is trained again.

    ``config.data`` and ``model.vae`` must equal the base's, and ``model.clip`` unless the CLIP
    is rerun. world.json keeps the base's records of the reused stages under ``stages`` (each
    with ``"reused_from": base``)."""
    base_record = check_base(config, base, from_stage)
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    train_split, heldout = _render_splits(config, workdir, timings, log)
    pipeline = os.path.join(base, "pipeline")
    copies = [(os.path.join(pipeline, "tokenizer"), "tokenizer"),
              (os.path.join(pipeline, "vae"), "vae")]
    if from_stage != "clip":
        copies.append((os.path.join(base, "clip"), "clip"))
    for src, dst in copies:
        shutil.rmtree(os.path.join(workdir, dst), ignore_errors=True)
        shutil.copytree(src, os.path.join(workdir, dst))
    tokenizer = text_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
    reused = {"clip": ("vae",), "ldm": ("vae", "clip")}.get(from_stage, ("vae", "clip", "ldm"))
    stages = {k: dict(base_record["stages"][k], reused_from=base) for k in reused}
    if from_stage == "clip":
        stages["clip"], text_encoder, text_config, text_params = _clip(
            config, workdir, tokenizer, train_split, heldout, timings, log)
    else:
        text_encoder, text_params = weights.load_component(
            os.path.join(pipeline, "text_encoder"), "text_encoder")
        text_config = weights.read_config(os.path.join(pipeline, "text_encoder"))
    vae, vae_params = weights.load_vae(os.path.join(workdir, "vae"))
    latents, cache = _latents_and_texts(config, workdir, vae, vae_params, tokenizer,
                                        train_split, timings, log)
    unet = unet_stage.build(config, text_config["hidden_size"])
    init = models.init_params(unet, config.seed + 3)
    if from_stage in ("clip", "ldm"):
        stages["ldm"], unet_params = unet_stage.train(config, workdir, "ldm", init,
                                                      text_encoder, text_params, latents,
                                                      cache, log)
    else:
        _, base_unet_params = weights.load_component(os.path.join(pipeline, "unet"), "unet")
        unet_params = unet_stage.fresh_gligen(base_unet_params, init)
    return _gligen_and_export(config, workdir, out, unet, unet_params, text_encoder,
                              text_config, text_params, latents, cache, heldout, stages,
                              timings, command, log)


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
    of the same architecture with its random initial weights (the floor); the box-following
    control: samples of the same seeds with every box mirrored left-right, scored against the
    *true* boxes ("world, boxes mirrored"; the renders flipped left-right and so scored are
    "ground truth, boxes mirrored": what a world that follows its boxes exactly would score
    there); and the grounding gap on held-out items (world.evaluate.grounding_gap: how much
    the boxes, and their places, lower the denoising loss). Writes a picture grid of the first
    8 layouts to ``picture``."""
    from goal_jax.world import evaluate as world_eval

    e = config.eval
    items = world_eval.heldout_items(heldout, e.layouts, EVAL_CATEGORIES, num_objects=2)
    pipe = weights.load_pipeline(pipeline_dir)
    truth = np.stack([np.asarray(heldout.images[it["index"]]) for it in items])
    rows = {"ground truth": truth}
    rows["world"] = world_eval.sample_items(pipe, items, unet_params, e.num_steps,
                                            e.guidance_scale, e.beta)
    mirrored = world_eval.mirrored_items(items)
    rows["world, boxes mirrored"] = world_eval.sample_items(pipe, mirrored, unet_params,
                                                            e.num_steps, e.guidance_scale, e.beta)
    if init_unet_params is not None:
        rows["random weights"] = world_eval.sample_items(pipe, items, init_unet_params,
                                                         e.num_steps, e.guidance_scale, e.beta)
    result = {"layouts": len(items), "categories": list(EVAL_CATEGORIES),
              "sampler": {"name": "ddim", "num_steps": e.num_steps,
                          "guidance_scale": e.guidance_scale, "beta": e.beta}}
    result["grounding_gap"] = world_eval.grounding_gap(pipe, heldout, unet_params,
                                                       max_boxes=config.data.max_boxes)
    g = result["grounding_gap"]
    log("[eval] grounding gap (1 - eps MSE with boxes / without; in brackets with the boxes "
        "mirrored, the places' share): " + ", ".join(
            f"{t}: {v['caption']['gap']:+.4f} ({v['caption']['position_gap']:+.4f}), empty "
            f"caption {v['empty caption']['gap']:+.4f} ({v['empty caption']['position_gap']:+.4f})"
            for t, v in g.items()))
    # The renders flipped left-right hold their objects exactly in the mirrored boxes.
    rows["ground truth, boxes mirrored"] = truth[:, :, ::-1]
    for name, images in rows.items():  # every row against the true boxes
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
