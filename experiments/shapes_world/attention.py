"""MAAlign's cross-attention maps per phrase (the analogue of the paper's Figure 4).

For a few evaluation layouts (default 4: two-object colour and shape layouts among the
picture grid's), each model's cross-attention maps of the MAAlign layer -- the decoder's 8x8
cross-attention of the world U-Net (4x4 for the 32 px smoke world), mean over heads and over
the layer's transformer blocks -- for each phrase's caption tokens, computed exactly as
MAAlign computes them in training (goal_jax.train: the U-Net built with ``attention_maps`` =
the MAAlign layers by ``train.load_models``, text by ``train.encode_text``, latents by
``train.encode_latents``; maps by ``objectives.collect_attention_probs`` ->
``mean_attention_map`` -> ``phrase_attention_maps``).

The choice (fixed, documented here): the U-Net input is the world's own render of the
layout (the evaluation ground truth), VAE-encoded (posterior mean) and noised to the fixed
mid timestep ``t`` = 500 (of 1000) with ``NOISE_DRAWS`` = 4 standard-normal draws
(``PRNGKey(layout seed)`` folded with the draw index), the caption and the boxes as the
condition; the maps are averaged over the draws. Every model sees the same inputs, so the
maps differ only by the model (this is the situation MAAlign trains in: a noised data image).

The number: the fraction of a phrase's attention mass inside its own box,
``sum(A * M) / sum(A)`` on the map grid (M: ``objectives.box_masks``, cell centres inside the
box), mean over the phrases and layouts; next to it the chance level (the same fraction for a
uniform map: the box's share of the cells).

Models (:func:`for_experiment`): the base world and, from the experiment's workdir, the
seed-0 (lowest-seed) checkpoints of ``ldm_only`` and of the best GOAL arm
(``report.best_goal_arm``). The maps are stored in results.json (``results["attention"]``)
so the figure and the numbers survive without the checkpoints; a model whose entry there
matches (arm, seed, final training losses, layouts, t, draws, layer) is not recomputed.
"""

from __future__ import annotations

import os

import numpy as np

DEFAULT_T = 500
NOISE_DRAWS = 4
PICTURE = "attention.png"
CATEGORIES = ("color", "shape")


def in_box_fraction(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fraction of attention mass inside the box.

    Args:
      maps: [..., h, w] non-negative attention maps (any scale).
      masks: [..., h, w] box masks (1 inside, 0 outside), broadcastable to ``maps``.
    Returns:
      [...] float64 sum(maps * masks) / sum(maps); NaN where a map sums to 0.
    """
    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks, np.float64)
    total = maps.sum(axis=(-2, -1))
    inside = (maps * masks).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def pick_layouts(items: list[dict], candidates: list[str], n: int) -> list[int]:
    """Indices into ``items`` of up to ``n`` two-object colour / shape layouts whose id is in
    ``candidates`` (the picture grid's), alternating colour, shape, colour, ..."""
    by_cat = {c: [i for i, it in enumerate(items) if it["category"] == c
                  and len(it["phrases"]) == 2 and it["id"] in candidates] for c in CATEGORIES}
    out = []
    for k in range(max((len(v) for v in by_cat.values()), default=0)):
        out += [by_cat[c][k] for c in CATEGORIES if k < len(by_cat[c])]
    return out[:n]


class AttentionProbe:
    """The MAAlign layer's per-phrase maps of any U-Net weights of one world.

    Args:
      world: run.world_info's dict (pipeline, clip, max_boxes, maa_resolution).
      part: the MAAlign part ("up": the decoder, the GOAL arm's).
    """

    def __init__(self, world: dict, part: str = "up"):
        import jax

        from experiments.shapes_world import arms
        from goal_jax import train as train_lib

        config = arms.load_goal_config("demo")
        arms.apply_overrides(config, {
            "demo_models": False, "train.model.pipeline": world["pipeline"],
            "train.model.clip": world["clip"], "train.beta": 1.0, "train.maa_part": part,
            "train.maa_resolution": world["maa_resolution"], "train.dtype": "float32",
            "train.remat": False, "train.gligen_scale": 1.0})
        self.config = config.train
        self.models, self.params = train_lib.load_models(self.config)
        self.layers = train_lib.maa_layers(self.config, self.models.unet.config)
        self.part, self.resolution = part, int(world["maa_resolution"])
        self.max_boxes = int(world["max_boxes"])
        self.base_unet = self.params["unet"]
        self._fn = jax.jit(self._maps)

    def _maps(self, unet_params, batch, noise, t):
        """[B, N, h, w] phrase maps for images [B, H, W, 3] in [-1, 1], noise [B, h', w', c]
        (latent shape), t int32 [B]."""
        import jax.numpy as jnp

        from goal_jax import objectives
        from goal_jax import schedule as schedule_lib
        from goal_jax import train as train_lib

        m, p = self.models, self.params
        frozen = {"vae": p["vae"], "text_encoder": p["text_encoder"], "clip": p["clip"]}
        context, phrase_feats, _, _ = train_lib.encode_text(m, frozen, batch["input_ids"],
                                                            batch["phrase_input_ids"])
        z0 = train_lib.encode_latents(m, frozen, batch["images"], jnp.zeros_like(noise))
        z_t = schedule_lib.add_noise(m.schedule, z0, noise, t)
        grounding = {"boxes": batch["boxes"], "phrase_embeds": phrase_feats,
                     "masks": batch["masks"]}
        _, state = m.unet.apply({"params": unet_params}, z_t, t, context, grounding=grounding,
                                gligen_scale=self.config.gligen_scale,
                                mutable=["intermediates"])
        attention = objectives.mean_attention_map(
            objectives.collect_attention_probs(state["intermediates"]))  # [B, h*w, T]
        h, w = objectives.grid_shape(attention.shape[1], z_t.shape[1:3])
        maps = objectives.phrase_attention_maps(attention, batch["phrase_token_masks"])
        return maps.reshape(batch["boxes"].shape[:2] + (h, w))

    def batch(self, items: list[dict], images: np.ndarray) -> dict:
        """The model inputs of ``items`` (captions, phrases, boxes) with ``images`` uint8
        [B, H, W, 3]: the training batch's keys (goal_jax.data.pipeline)."""
        from goal_jax import text as text_lib

        tok = self.models_tokenizer
        n = self.max_boxes
        empty = text_lib.tokenize(tok, [""])[0]
        out = {k: [] for k in ("input_ids", "phrase_input_ids", "boxes", "masks",
                               "phrase_token_masks")}
        for it in items:
            k = len(it["phrases"])
            ids = text_lib.tokenize(tok, [it["caption"], *it["phrases"]])
            phrase_ids = np.tile(empty, (n, 1))
            phrase_ids[:k] = ids[1:]
            spans = text_lib.phrase_token_spans(tok, it["caption"], it["phrases"])
            boxes = np.zeros((n, 4), np.float32)
            boxes[:k] = np.asarray(it["boxes"], np.float32)
            out["input_ids"].append(ids[0])
            out["phrase_input_ids"].append(phrase_ids)
            out["boxes"].append(boxes)
            out["masks"].append((np.arange(n) < k).astype(np.float32))
            out["phrase_token_masks"].append(text_lib.phrase_token_mask(spans, n)
                                             .astype(np.float32))
        batch = {k: np.stack(v) for k, v in out.items()}
        batch["images"] = np.asarray(images, np.float32) / 127.5 - 1.0
        return batch

    @property
    def models_tokenizer(self):
        if not hasattr(self, "_tokenizer"):
            from goal_jax import text as text_lib

            self._tokenizer = text_lib.load_tokenizer(
                os.path.join(self.config.model.pipeline, "tokenizer"))
        return self._tokenizer

    def maps(self, unet_params, items: list[dict], images: np.ndarray,
             timestep: int = DEFAULT_T, draws: int = NOISE_DRAWS) -> np.ndarray:
        """float32 [len(items), max_boxes, h, w]: each phrase's map, mean over ``draws``
        noise draws at ``timestep`` (rows past an item's phrases are 0)."""
        import jax
        import jax.numpy as jnp

        batch = self.batch(items, images)
        vae = self.models.vae.config
        f = int(vae.downsample_factor)
        shape = (images.shape[1] // f, images.shape[2] // f, int(vae.latent_channels))
        noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(
            jax.random.PRNGKey(int(it["seed"])), d), shape, jnp.float32))
            for d in range(draws) for it in items])
        tiled = {k: np.concatenate([v] * draws) for k, v in batch.items()}
        t = np.full((len(noise),), timestep, np.int32)
        maps = np.asarray(self._fn(unet_params, tiled, noise, t))
        return maps.reshape((draws, len(items)) + maps.shape[1:]).mean(axis=0)


def summarize(maps: np.ndarray, items: list[dict]) -> dict:
    """In-box numbers of maps [L, N, h, w] for ``items`` (L layouts): {"in_box" (mean over
    phrases and layouts), "chance" (mean box share of the cells), "per_phrase": [[fraction per
    phrase] per layout]}."""
    from goal_jax import objectives

    h, w = maps.shape[-2:]
    fracs, chances = [], []
    for it, m in zip(items, maps):
        k = len(it["phrases"])
        masks = np.asarray(objectives.box_masks(np.asarray(it["boxes"], np.float32), h, w))
        fracs.append([float(x) for x in in_box_fraction(m[:k], masks)])
        chances += [float(x) for x in masks.reshape(k, -1).mean(-1)]
    flat = [x for row in fracs for x in row if np.isfinite(x)]
    return {"in_box": float(np.mean(flat)) if flat else None,
            "chance": float(np.mean(chances)), "per_phrase": fracs}


# ----------------------------------------------------------------------------------------------
# The figure (PIL: no plotting dependency).
# ----------------------------------------------------------------------------------------------


def heat_colors(values: np.ndarray) -> np.ndarray:
    """float [...] in [0, 1] -> uint8 [..., 3]: black -> red -> yellow -> white."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)[..., None]
    r = np.clip(3 * v, 0, 1)
    g = np.clip(3 * v - 1, 0, 1)
    b = np.clip(3 * v - 2, 0, 1)
    return np.round(255 * np.concatenate([r, g, b], -1)).astype(np.uint8)


def draw(path: str, items: list[dict], inputs: np.ndarray, models: list[dict],
         images: dict, timestep: int, cell: int = 128) -> str:
    """Writes the PNG: per layout, its caption, a row with the world render (the noised input)
    and one row per model: its sample with the boxes (when ``images`` has it), then one heat map
    per phrase (colours span the map's own min to max; the phrase's box outlined; its in-box
    fraction written under it).

    Args:
      items: the layouts (L). inputs: uint8 [L, H, W, 3] world renders.
      models: the ``results["attention"]["models"]`` entries ({"label", "key", "maps"
        [L][N][h][w], "per_phrase"}).
      images: {row key: uint8 [L, H, W, 3]} samples of the models for these layouts.
    """
    from PIL import Image, ImageDraw, ImageFont

    from goal_jax.world import evaluate as world_eval

    font = ImageFont.load_default()
    phrases = max(len(it["phrases"]) for it in items)
    label_w, pad, text_h = 130, 4, 14
    block_h = text_h + (1 + len(models)) * (cell + text_h + pad) + 2 * pad
    canvas = Image.new("RGB", (max(label_w + (1 + phrases) * (cell + pad), 560),
                               2 * text_h + len(items) * block_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.multiline_text((4, 1), f"MAAlign layer maps per phrase at t = {timestep} (input: the "
                     "world render, noised).\nEach heat map spans its own min (black) to max "
                     "(white); the number: the phrase's attention mass inside its box.",
                     fill=(0, 0, 0), font=font, spacing=1)
    colors = world_eval._BOX_COLORS
    for li, it in enumerate(items):
        y = 2 * text_h + li * block_h + pad
        d.text((4, y), f"{it['id']}: {it['caption']}", fill=(0, 0, 0), font=font)
        y += text_h
        rows = [("world render (input)", inputs[li], None)] + [
            (m["label"], images.get(m["key"], [None] * len(items))[li], m) for m in models]
        for label, image, m in rows:
            d.multiline_text((4, y + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
            x = label_w
            if image is not None:
                scale = max(1, cell // image.shape[0])
                canvas.paste(world_eval.draw_layout(image, it["phrases"], it["boxes"], scale,
                                                    labels=False).resize((cell, cell)), (x, y))
            for k, phrase in enumerate(it["phrases"]):
                x = label_w + (k + 1) * (cell + pad)
                if m is None:
                    d.text((x, y + cell // 2), phrase, fill=colors[k % len(colors)], font=font)
                    continue
                a = np.asarray(m["maps"][li][k], np.float64)
                span = a.max() - a.min()
                heat = heat_colors((a - a.min()) / span if span > 0 else np.zeros_like(a))
                tile = Image.fromarray(heat).resize((cell, cell), Image.NEAREST)
                td = ImageDraw.Draw(tile)
                x0, y0, x1, y1 = it["boxes"][k]
                td.rectangle([x0 * (cell - 1), y0 * (cell - 1), x1 * (cell - 1), y1 * (cell - 1)],
                             outline=(0, 200, 255), width=2)
                canvas.paste(tile, (x, y))
                frac = m["per_phrase"][li][k]
                d.text((x, y + cell + 1), f"{phrase}: {100 * frac:.0f}% in box"
                       if frac == frac else phrase, fill=(0, 0, 0), font=font)
            y += cell + text_h + pad
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The experiment's hook (run.py).
# ----------------------------------------------------------------------------------------------


def _checkpoint(workdir: str, run: dict) -> str | None:
    for run_dir in (os.path.join(workdir, "runs", run["arm"], f"seed{run['seed']}"),
                    run.get("run_dir")):
        if run_dir and os.path.isdir(os.path.join(run_dir, "checkpoints")):
            return os.path.join(run_dir, "checkpoints")
    return None


def for_experiment(results: dict, items: list[dict], world: dict, grid_images: dict,
                   out: str, workdir: str, previous: dict | None = None,
                   num_layouts: int = 4, timestep: int = DEFAULT_T, draws: int = NOISE_DRAWS,
                   log=print) -> dict | None:
    """The experiment's attention figure and numbers -> the ``results["attention"]`` record
    {"t", "draws", "layer", "layouts", "models": [{"label", "arm", "seed", "key", "final",
    "in_box", "chance", "per_phrase", "maps"}], "picture"}, or None when no layout fits.

    Models: the base world, then the lowest seed of ``ldm_only`` and of the best GOAL arm
    (report.best_goal_arm) present in ``results["runs"]``; a run model is computed from its
    checkpoint under ``workdir`` unless ``previous`` (the old record) holds the same entry; one
    with neither is left out (printed). ``grid_images``: {row key: uint8 [n_grid, ...]} of the
    grid's layouts (persist.GRID_IMAGES), which the figure shows."""
    from experiments.shapes_world import datasets, persist, report
    from experiments.shapes_world import evaluate as eval_lib
    from experiments.shapes_world import run as run_lib

    grid_ids = [items[i]["id"] for i in run_lib.grid_indices(items)]
    chosen = pick_layouts(items, grid_ids, num_layouts)
    if not chosen:
        log("[experiment] attention: no two-object colour / shape layout in the grid; skipped")
        return None
    layouts = [items[i] for i in chosen]
    key = {"t": int(timestep), "draws": int(draws),
           "layer": {"part": "up", "resolution": int(world["maa_resolution"])},
           "layouts": [it["id"] for it in layouts]}
    old = {}
    if previous and all(previous.get(k) == v for k, v in key.items()):
        old = {(m["arm"], m["seed"]): m for m in previous["models"]}
    wanted = [{"label": "base world", "arm": None, "seed": None, "key": "base", "final": None}]
    for arm in ("ldm_only", report.best_goal_arm(results)):
        runs = sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["seed"])
        if arm is None or not runs:
            continue
        r = runs[0]
        wanted.append({"label": f"{arm} seed {r['seed']}", "arm": arm, "seed": r["seed"],
                       "key": persist.grid_key(arm, r["seed"]), "final": r["train"]["final"],
                       "run": r})
    models, probe, done = [], None, []
    for w in wanted:
        run_record = w.pop("run", None)
        prev = old.get((w["arm"], w["seed"]))
        if prev is not None and prev.get("final") == w["final"]:
            models.append(prev)
            continue
        if run_record is not None:
            ckpt = _checkpoint(workdir, run_record)
            if ckpt is None:
                log(f"[experiment] attention: no checkpoint of {w['label']} under {workdir} "
                    "and no stored maps; left out")
                continue
        if probe is None:
            probe = AttentionProbe(world)
            inputs = datasets.eval_truth_images(layouts, world["resolution"])
        params = probe.base_unet if run_record is None else eval_lib.load_run_unet(
            ckpt, probe.base_unet)[0]
        maps = probe.maps(params, layouts, inputs, timestep, draws)
        # Stored with 6 significant digits; the numbers are those of the stored maps.
        maps = np.vectorize(lambda v: float(f"{v:.6g}"))(
            maps[:, :max(len(it["phrases"]) for it in layouts)].astype(np.float64))
        entry = dict(w, **summarize(maps, layouts))
        entry["maps"] = maps.tolist()
        models.append(entry)
        done.append(w["label"])
    if probe is None:
        inputs = datasets.eval_truth_images(layouts, world["resolution"])
    pos = [grid_ids.index(it["id"]) for it in layouts]
    images = {k: v[pos] for k, v in grid_images.items() if k != "layout_ids"}
    picture = draw(os.path.join(out, PICTURE), layouts, inputs, models, images, timestep)
    computed = ", ".join(done) or "none, all from results.json"
    log(f"[experiment] attention maps (computed: {computed}): " + ", ".join(
        f"{m['label']} {100 * m['in_box']:.1f}% in box" for m in models if m["in_box"] is not None)
        + f" (chance {100 * models[0]['chance']:.1f}%) -> {picture}")
    return dict(key, models=models, picture=os.path.basename(picture))
