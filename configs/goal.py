"""GOAL fine-tuning configs, chosen by config string (big_vision style).

    python scripts/train.py --config configs/goal.py            # = :paper
    python scripts/train.py --config configs/goal.py:demo --workdir runs/demo
    python scripts/train.py --config configs/goal.py:paper,no_maalign --config.train.steps=100

The string after ":" is a comma-separated list: a base preset first, then any ablations.

Base presets:
  paper  GOAL as in the paper: GLIGEN SD-1.4 text-box pipeline (``train.model.pipeline``,
         a local diffusers folder or a hub id, default masterful/gligen-1-4-generation-text-box),
         CLIP ViT-L/14 for DSAlign (``train.model.clip``, default openai/clip-vit-large-patch14),
         α = 1e-2, β = 1e-3, AdamW 5e-5 constant, 14,000 steps, batch 1 per device, 512x512,
         MAAlign on the decoder 16x16 cross-attention maps, trainable GLIGEN fusers + attn1 +
         attn2, GOAL2K data (``data.source``: a folder in goal_jax's on-disk format, built once
         into the TFDS dir ``data.data_dir``).
  world  GOAL fine-tuning of the shipped shapes world (assets/shapes_world, docs/world.md):
         α = β = 0.1, AdamW 1e-4, 300 steps of batch 4 on 512 generated shapes items at 64x64,
         MAAlign on the decoder 8x8 maps (the world U-Net attends at 8x8 only); `make demo`.
  demo   Tiny random models written in-process by goal_jax.demo_models (no download; tokenizer
         from text.write_word_vocab over the shapes vocabulary), the synthetic shapes dataset
         generated on first use at 64x64, all three losses on; a few minutes on 2 CPU cores.

Ablations (the paper's tables; applied on top of the base):
  ldm_only        α = β = 0: plain LDM fine-tuning of the same layers ("LDM-only fine-tune").
  no_dsalign      α = 0 (LDM + MAAlign).
  no_maalign      β = 0 (LDM + DSAlign).
  dsalign_local   DSAlign with D_local only (Table 6).
  dsalign_global  DSAlign with D_global only (Table 6).
  maalign_mid8    MAAlign on the mid block, 8x8 maps (Table 7).
  maalign_up64    MAAlign on the decoder 64x64 maps (Table 7).
  maalign_up32    MAAlign on the decoder 32x32 maps (Table 7).
  maalign_up16    MAAlign on the decoder 16x16 maps (Table 7; the paper's choice = paper).
(The 8/16/32/64 resolutions are SD-1.4's latent grid at 512x512; for the demo models, whose
latents are 16x16, only mid8 and up16 exist, and validate_config says so.)

Per TPU kind, ``TPU_SETTINGS`` / :func:`tpu_settings` give the paper run's settings that fit one
core (batch per core, parameter sharding, frozen weights in bf16), from XLA:TPU's own compiles
(benchmarks/tpu_aot.py, benchmarks/RESULTS.md); notebooks/train_goal.ipynb applies them.

Every default lives in this file, in :func:`_base` (the paper's values); presets and ablations
change some of them. Every field can be overridden on the command line
(``--config.train.steps=100``); goal_jax.config_checks refuses fields that do not exist and
checks values before anything is loaded or compiled. This file imports only ml_collections
(and the standard library).

Fields:
  preset            str, the config string this config was built from (information only).
  demo_models       bool, write the tiny random demo models into ``<workdir>/demo_models`` and
                    use them as ``train.model.pipeline`` / ``train.model.clip``.
  num_devices       int, use the first N devices for the mesh (0 = all devices).
  compilation_cache str, JAX persistent compilation cache folder ('' = off).
  train             the train step (goal_jax.train reads this section):
    steps                  int, number of train steps (optimizer updates x grad_accum_steps).
    per_device_batch_size  int, batch per device; global batch = this x devices.
    seed                   int, PRNG seed of the train state (t, eps, dropout draws).
    alpha, beta            float, the weights α of L_DSA and β of L_MAA (eq. 15).
    dsa_local, dsa_global  bool, the Table 6 switches of D_local / D_global.
    dsa_region             "mask" (x̂0·M_i, the paper) or "crop" (crop-and-resize the box).
    clip_mean, clip_std    3-tuples, CLIP pixel normalisation for DSAlign.
    maa_part               "down" | "mid" | "up": the U-Net part of the MAAlign layers.
    maa_resolution         int, the side of their attention grid (16: SD-1.4 decoder 16x16).
    maa_layers             tuple of module-path prefixes; non-empty overrides part/resolution.
    caption_dropout        float in [0, 1), probability of the empty caption per item.
    grounding_dropout      float in [0, 1), probability of the null grounding per item.
    gligen_scale           float, multiplies the gated self-attention residuals (1 = on).
    encoded_box_slots      int K (0 = all N): the phrase encoders and the DSAlign CLIP run on
                           the first K box slots only; the loss is unchanged while every real
                           box sits in the first K slots, which the program checks over the
                           whole dataset at start (goal_jax.train.check_box_slots).
    encoded_phrase_tokens  int L (0 = all 77): the phrase encoders see the first L tokens; the
                           loss is unchanged while every phrase's EOS is within L (checked
                           likewise, goal_jax.train.check_phrase_tokens).
    dtype                  "float32" | "bfloat16": compute dtype (parameters stay float32).
    remat                  bool, gradient checkpointing of U-Net, VAE decoder and CLIP blocks.
    frozen_dtype           "float32" | "bfloat16": storage dtype of the frozen parameters (cast
                           once by goal_jax.train.create_train_state; trainable parameters and
                           AdamW state stay float32; with dtype="bfloat16" the modules cast
                           weights to bf16 anyway, so bf16 storage computes the same and halves
                           the frozen weights' memory).
    trainable_patterns     tuple of regexes (re.search) on "/"-joined U-Net parameter paths;
                           default the paper's fusers + attn1 + attn2.
    train_position_net     bool, also train the GLIGEN position net.
    optimizer              learning_rate (peak, constant after warmup_steps of linear warm-up),
                           weight_decay (AdamW, decoupled), b1, b2, eps, grad_clip_norm (> 0:
                           clip by global norm), grad_accum_steps (optax.MultiSteps; 1 = off).
    sharding               data, fsdp (mesh axis sizes; data=-1: all devices), params
                           ("replicated" | "fsdp"), fsdp_min_size (smaller arrays stay
                           replicated), distributed (jax.distributed.initialize, multi-host).
    model.pipeline         str, diffusers GLIGEN pipeline folder or hub id (either folder form:
                           safetensors or orbax, goal_jax.weights).
    model.clip             str, Hugging Face CLIPModel folder or hub id (the DSAlign CLIP).
  data
    source        str, a folder in the on-disk format (annotations.jsonl + images), built into
                  ``data_dir`` on first use; '' = use the goal2k dataset already in data_dir.
    data_dir      str, TFDS data dir ('' = <workdir>/tfds).
    shapes_items  int, > 0: generate the synthetic shapes dataset (this many items) into
                  ``source`` when it does not exist yet (demo).
    resolution    int, training image side in pixels.
    max_boxes     int, grounding slots (30 as GLIGEN).
    flip          bool, random horizontal flip with left/right swapped in the texts.
    random_crop   bool, random (else center) crop after resizing the short side.
    min_box_size  float, boxes with a smaller normalized area after cropping are dropped.
    shuffle       bool, reshuffle every epoch.
    seed          int, data order / flips / crops seed.
  checkpoint
    every_steps   int, save every K steps (and always at the end; 0 = only at the end).
    max_to_keep   int, keep the last N checkpoints.
    async_save    bool, write checkpoints in the background.
  log
    every_steps   int, write metrics (averaged over the interval) every K steps.
    progress      bool, a tqdm progress bar when stderr is a terminal.
    data_ids      bool, each process appends the item ids of every batch it reads to
                  ``<workdir>/data_ids/process_<i>.jsonl`` ({"step", "process", "ids"} lines).
  sample
    every_steps   int, sample ``layouts`` into TensorBoard every K steps (0 = off) and at the
                  end when > 0.
    layouts       tuple of JSON strings {"caption", "phrases", "boxes" (xyxy in [0,1]), "seed"}.
    num_steps, guidance_scale, beta (scheduled sampling), sampler: goal_jax.sampling options.
"""

from __future__ import annotations

import json
import os
import re

import ml_collections

BASES = ("paper", "demo", "world")
ABLATIONS = {
    "ldm_only": "α = β = 0 (plain LDM fine-tuning of the same layers)",
    "no_dsalign": "α = 0",
    "no_maalign": "β = 0",
    "dsalign_local": "D_local only",
    "dsalign_global": "D_global only",
    "maalign_mid8": "MAAlign on the mid block 8x8 maps",
    "maalign_up64": "MAAlign on the decoder 64x64 maps",
    "maalign_up32": "MAAlign on the decoder 32x32 maps",
    "maalign_up16": "MAAlign on the decoder 16x16 maps (the paper's choice)",
}
# The paper run per TPU kind: settings that fit one core's HBM per XLA:TPU's own buffer
# assignment (benchmarks/RESULTS.md "XLA:TPU compiles", benchmarks/tpu_aot.py), with
# train.dtype = "bfloat16" and train.remat = True. Keys: (jax device_kind, device count).
# "evidence" says which compile the row rests on.
TPU_SETTINGS = {
    ("TPU v2", 8): dict(kind="v2-8", per_device_batch_size=2, params="fsdp",
                        frozen_dtype="bfloat16", evidence="compiled: FSDP, 2 images per core "
                        "with the activation constraints (ops.shard_batch): peak 6.35 of 7.48 "
                        "GiB per core with the fused attention and float32 frozen weights "
                        "(einsum 5.92; trimmed slots and tokens with bf16 frozen weights "
                        "5.16); refused at 13.0 GiB before the constraints"),
    ("TPU v3", 8): dict(kind="v3-8", per_device_batch_size=1, params="fsdp",
                        frozen_dtype="bfloat16", evidence="not compiled: the v2-8 program on "
                        "16 GiB cores"),
    ("TPU v5 lite", 1): dict(kind="v5e-1", per_device_batch_size=4, params="replicated",
                             frozen_dtype="bfloat16", evidence="compiled: batch 4, peak 14.17 "
                             "of 15.75 GiB (fused attention, bfloat16 frozen); with float32 "
                             "frozen weights batch 4 does not fit (XLA asks 15.87 GiB)"),
    ("TPU v5 lite", 8): dict(kind="v5e-8", per_device_batch_size=1, params="fsdp",
                             frozen_dtype="bfloat16", evidence="not compiled: the v2-8 program "
                             "on 16 GiB chips"),
    ("TPU v6 lite", 1): dict(kind="v6e-1", per_device_batch_size=1, params="replicated",
                             frozen_dtype="bfloat16", evidence="not compiled: the v5e-1 "
                             "program on a 32 GiB chip"),
}


def tpu_settings(device_kind: str, num_devices: int) -> dict | None:
    """The TPU_SETTINGS row of a runtime (``jax.devices()[0].device_kind``, device count), or
    None for any other runtime (CPU, GPU, a TPU kind not in the table)."""
    return TPU_SETTINGS.get((device_kind, num_devices))


PAPER_PIPELINE = "masterful/gligen-1-4-generation-text-box"
PAPER_CLIP = "openai/clip-vit-large-patch14"
# The paper's trainable layers: GLIGEN's gated self-attention (fuser), self- and cross-attention.
PAPER_TRAINABLE = (r"(^|/)fuser/", r"(^|/)attn1/", r"(^|/)attn2/")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEMO_LAYOUTS = (
    {"caption": "a red circle to the left of a blue square", "phrases": ["a red circle",
     "a blue square"], "boxes": [[0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]], "seed": 0},
    {"caption": "a green striped triangle above a yellow star", "phrases": [
     "a green striped triangle", "a yellow star"], "boxes": [[0.3, 0.05, 0.7, 0.45],
     [0.3, 0.55, 0.7, 0.95]], "seed": 1},
    {"caption": "two purple hexagons", "phrases": ["purple hexagons", "purple hexagons"],
     "boxes": [[0.1, 0.1, 0.45, 0.45], [0.55, 0.55, 0.9, 0.9]], "seed": 2},
)
PAPER_LAYOUTS = (
    {"caption": "a red apple to the left of a green book", "phrases": ["a red apple",
     "a green book"], "boxes": [[0.05, 0.35, 0.45, 0.75], [0.55, 0.3, 0.95, 0.8]], "seed": 0},
    {"caption": "a wooden chair and a metallic lamp", "phrases": ["a wooden chair",
     "a metallic lamp"], "boxes": [[0.1, 0.4, 0.5, 0.95], [0.6, 0.1, 0.9, 0.9]], "seed": 1},
)


def _train_section() -> ml_collections.ConfigDict:
    """The paper's train step (every field documented in the module docstring)."""
    return ml_collections.ConfigDict(dict(
        steps=14_000, per_device_batch_size=1, seed=0,
        alpha=1e-2, beta=1e-3, dsa_local=True, dsa_global=True, dsa_region="mask",
        clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
        maa_part="up", maa_resolution=16, maa_layers=(),
        caption_dropout=0.0, grounding_dropout=0.0, gligen_scale=1.0,
        encoded_box_slots=0, encoded_phrase_tokens=0, dtype="float32", remat=False,
        frozen_dtype="float32",
        trainable_patterns=PAPER_TRAINABLE, train_position_net=False,
        optimizer=dict(learning_rate=5e-5, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999,
                       eps=1e-8, grad_clip_norm=0.0, grad_accum_steps=1),
        sharding=dict(data=-1, fsdp=1, params="replicated", fsdp_min_size=2 ** 14,
                      distributed=False),
        model=dict(pipeline=PAPER_PIPELINE, clip=PAPER_CLIP)))


def _base(preset: str) -> ml_collections.ConfigDict:
    """Every default: the paper's setting."""
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.demo_models = False
    c.num_devices = 0
    c.compilation_cache = ""
    c.train = _train_section()
    c.data = ml_collections.ConfigDict(dict(
        source="", data_dir="", shapes_items=0, resolution=512, max_boxes=30, flip=False,
        random_crop=False, min_box_size=0.001, shuffle=True, seed=0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3,
                                                  async_save=True))
    c.log = ml_collections.ConfigDict(dict(every_steps=50, progress=True, data_ids=False))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=2000, layouts=tuple(json.dumps(x) for x in PAPER_LAYOUTS), num_steps=50,
        guidance_scale=7.5, beta=0.3, sampler="ddim"))
    return c


def _demo(c: ml_collections.ConfigDict) -> None:
    """The demo preset: tiny random models and the shapes dataset, minutes on a CPU."""
    c.demo_models = True
    c.train.model.pipeline = ""  # set to <workdir>/demo_models/pipeline at run time
    c.train.model.clip = ""
    c.train.steps = 40
    c.train.per_device_batch_size = 4
    c.train.optimizer.learning_rate = 1e-3
    # all three losses on, with weights large enough to move the tiny random models.
    c.train.alpha = 0.1
    c.train.beta = 0.1
    c.train.maa_part = "up"
    c.train.maa_resolution = 16
    c.data.source = ""  # '' = <workdir>/shapes
    c.data.shapes_items = 64
    c.data.resolution = 64
    c.data.flip = True
    c.data.max_boxes = 4  # the shapes dataset has 1-4 objects per image
    c.checkpoint.every_steps = 20
    c.log.every_steps = 10
    c.sample.every_steps = 0
    c.sample.layouts = tuple(json.dumps(x) for x in DEMO_LAYOUTS)
    c.sample.num_steps = 10


# The shipped shapes world (docs/world.md), next to this file's folder.
WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "shapes_world")


def _world(c: ml_collections.ConfigDict) -> None:
    """The world preset: GOAL fine-tuning of the shipped shapes world (make demo)."""
    c.train.model.pipeline = os.path.join(WORLD, "pipeline")
    c.train.model.clip = os.path.join(WORLD, "clip")
    c.train.steps = 300
    c.train.per_device_batch_size = 4
    c.train.optimizer.learning_rate = 1e-4
    c.train.alpha = 0.1
    c.train.beta = 0.1
    # The world's U-Net attends at the 8x8 level only: the decoder's 8x8 maps are the analogue
    # of SD-1.4's decoder 16x16.
    c.train.maa_part = "up"
    c.train.maa_resolution = 8
    c.data.source = ""  # '' = <workdir>/shapes (generated on first use)
    c.data.shapes_items = 512
    c.data.resolution = 64
    c.data.flip = True
    c.data.max_boxes = 4
    c.checkpoint.every_steps = 100
    c.log.every_steps = 25
    c.sample.every_steps = 0
    c.sample.layouts = tuple(json.dumps(x) for x in DEMO_LAYOUTS)
    c.sample.num_steps = 25


def _ablate(c: ml_collections.ConfigDict, name: str) -> None:
    t = c.train
    if name == "ldm_only":
        t.alpha, t.beta = 0.0, 0.0
    elif name == "no_dsalign":
        t.alpha = 0.0
    elif name == "no_maalign":
        t.beta = 0.0
    elif name == "dsalign_local":
        t.dsa_local, t.dsa_global = True, False
    elif name == "dsalign_global":
        t.dsa_local, t.dsa_global = False, True
    elif name.startswith("maalign_"):
        m = re.fullmatch(r"maalign_(mid|up)(\d+)", name)
        t.maa_part, t.maa_resolution, t.maa_layers = m.group(1), int(m.group(2)), ()
    else:  # pragma: no cover - names are checked by get_config
        raise ValueError(name)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for ``arg`` = "<base>[,<ablation>...]" (default "paper")."""
    arg = (arg or "paper").strip()
    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names or names[0] not in BASES:
        raise ValueError(
            f"unknown preset {names[0] if names else arg!r} in config string {arg!r}: it must "
            f"start with one of {list(BASES)}, then optional ablations {sorted(ABLATIONS)}")
    unknown = [n for n in names[1:] if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r} in config string {arg!r}; known: "
                         f"{sorted(ABLATIONS)}")
    c = _base(arg)
    if names[0] == "demo":
        _demo(c)
    elif names[0] == "world":
        _world(c)
    for name in names[1:]:
        _ablate(c, name)
    return c
