"""Sampling and scoring the world: held-out layouts, the oracle, and picture grids.

* :func:`heldout_items` picks layouts from a rendered held-out split (disjoint from training).
* :func:`sample_items` samples them with a GLIGEN pipeline (goal_jax.sampling.GLIGENPipeline).
* :func:`score` scores images with the world oracle (goal_jax.evaluation.oracle), which reads
  pixels only (no CLIP), so it cannot be fooled by what DSAlign optimises.
* :func:`layout_grid` draws rows of images (one row per model) with boxes and phrases.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from goal_jax import layout as layout_lib

_BOX_COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))


def heldout_items(split, n: int, categories: Sequence[str] | None = None,
                  num_objects: int | None = None, seed_offset: int = 0) -> list[dict]:
    """The first ``n`` items of ``split`` (a world.data.WorldSplit) whose category is in
    ``categories`` and that have ``num_objects`` objects (None = any), as sampling items
    {"id", "caption", "phrases", "boxes" (xyxy in [0, 1]), "category", "seed", "objects"}."""
    out = []
    for i, r in enumerate(split.records):
        if categories is not None and r["category"] not in categories:
            continue
        if num_objects is not None and len(r["objects"]) != num_objects:
            continue
        out.append({"id": r["id"], "caption": r["caption"], "category": r["category"],
                    "phrases": [o["phrase"] for o in r["objects"]],
                    "boxes": [o["box"] for o in r["objects"]], "objects": r["objects"],
                    "seed": seed_offset + i, "index": i})
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"held-out split {split.folder} has only {len(out)} items with "
                         f"categories {categories} and {num_objects} objects; {n} asked")
    return out


def mirror_boxes(boxes):
    """xyxy boxes in [0, 1] mirrored left-right (x -> 1 - x): the same sizes, other places.
    ``boxes``: a list of [x0, y0, x1, y1] (returns a list) or an array [..., 4] (numpy or jax;
    returns the same kind)."""
    if isinstance(boxes, (list, tuple)):
        return [[1.0 - b[2], b[1], 1.0 - b[0], b[3]] for b in boxes]
    if isinstance(boxes, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    return xp.stack([1.0 - boxes[..., 2], boxes[..., 1], 1.0 - boxes[..., 0], boxes[..., 3]],
                    axis=-1)


def mirrored_items(items: Sequence[dict]) -> list[dict]:
    """``items`` with every box mirrored left-right (:func:`mirror_boxes`); captions, phrases
    and seeds unchanged: the control of a box-following test."""
    return [dict(it, boxes=mirror_boxes(it["boxes"])) for it in items]


def fixed_layouts(n: int, categories: Sequence[str] = ("color", "texture", "spatial"),
                  resolution: int = 64) -> list[dict]:
    """The first ``n`` two-object items of the world's ``test`` split (never trained on) in
    ``categories``, as sampling items {"id": "demo-<k>", "caption", "category", "seed",
    "phrases", "boxes"}: the layouts of ``make demo`` and of the shipped-world test."""
    from goal_jax.world import data

    out, i = [], 0
    while len(out) < n:
        _, r = data.render_one("test", i, 0, resolution)
        if r["category"] in categories and len(r["objects"]) == 2:
            out.append({"id": f"demo-{len(out):02d}", "caption": r["caption"],
                        "category": r["category"], "seed": i,
                        "phrases": [o["phrase"] for o in r["objects"]],
                        "boxes": [o["box"] for o in r["objects"]]})
        i += 1
    return out


def sample_items(pipeline, items: Sequence[dict], unet_params=None, num_steps: int = 25,
                 guidance_scale: float = 5.0, beta: float = 1.0, batch_size: int = 32,
                 max_boxes: int = 4) -> np.ndarray:
    """uint8 [len(items), H, W, 3] samples of ``items`` (each with its own ``seed``)."""
    from goal_jax import sampling

    sampler = sampling.GLIGENPipeline(pipeline, unet_params=unet_params, max_boxes=max_boxes)
    options = sampling.SampleOptions(sampler="ddim", num_steps=num_steps,
                                     guidance_scale=guidance_scale, beta=beta)
    images = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        pad = batch_size - len(chunk)  # fixed batch: one compiled program
        chunk_padded = chunk + [chunk[-1]] * pad
        out = sampler.sample([it["caption"] for it in chunk_padded],
                             [layout_lib.Layout(tuple(it["phrases"]),
                                                tuple(tuple(b) for b in it["boxes"]))
                              for it in chunk_padded],
                             [int(it["seed"]) for it in chunk_padded], options)
        images.append(np.asarray(out.images)[:len(chunk)])
    return np.concatenate(images)


def score(images: Sequence[np.ndarray], items: Sequence[dict], oracle=None) -> dict:
    """Oracle results of ``images`` for ``items`` -> {"summary", "items"}
    (goal_jax.evaluation.oracle.summarize / judge)."""
    from goal_jax.evaluation import oracle as oracle_lib

    oracle = oracle_lib.Oracle.load() if oracle is None else oracle
    fields = ("id", "caption", "phrases", "boxes", "category")
    results = oracle.score_items(list(images), [{k: it[k] for k in fields} for it in items])
    return {"summary": oracle_lib.summarize(results), "items": results}


def draw_layout(image: np.ndarray, phrases: Sequence[str], boxes, scale: int = 3,
                labels: bool = True):
    """uint8 [H, W, 3] -> PIL image upscaled ``scale``× (nearest) with each box outlined and,
    when ``labels``, its phrase written at the box's top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.asarray(image)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    w, h = img.size
    for i, (phrase, (x0, y0, x1, y1)) in enumerate(zip(phrases, boxes)):
        color = _BOX_COLORS[i % len(_BOX_COLORS)]
        box = [x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1)]
        draw.rectangle(box, outline=color, width=max(1, scale // 2))
        if labels:
            left, top, right, bottom = draw.textbbox((box[0] + 2, box[1] + 2), phrase, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
            draw.text((box[0] + 2, box[1] + 2), phrase, fill=(0, 0, 0), font=font)
    return img


def layout_grid(rows: Sequence[tuple[str, np.ndarray]], items: Sequence[dict], path: str,
                scale: int = 3) -> str:
    """Writes a PNG: one row per (label, uint8 images [N, H, W, 3]) with the boxes drawn, one
    column per item, the caption above each column and the row label on the left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = len(items)
    h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    label_w, caption_h, pad = 110, 28, 4
    canvas = Image.new("RGB", (label_w + n * (w + pad), caption_h + len(rows) * (h + pad)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, it in enumerate(items):
        x = label_w + j * (w + pad)
        words, lines, line = it["caption"].split(), [], ""
        for word in words:  # wrap the caption to the column width
            trial = (line + " " + word).strip()
            if draw.textlength(trial, font=font) > w and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        draw.multiline_text((x, 1), "\n".join(lines[:2]), fill=(0, 0, 0), font=font, spacing=1)
    for r, (label, images) in enumerate(rows):
        y = caption_h + r * (h + pad)
        draw.multiline_text((4, y + h // 2 - 12), label, fill=(0, 0, 0), font=font)
        for j, it in enumerate(items):
            canvas.paste(draw_layout(images[j], it["phrases"], it["boxes"], scale, labels=False),
                         (label_w + j * (w + pad), y))
    canvas.save(path)
    return path


def grounding_gap(pipeline, split, unet_params=None, num_items: int = 256,
                  timesteps: Sequence[int] = (200, 500, 800), max_boxes: int = 4,
                  seed: int = 0, batch_size: int = 64) -> dict:
    """Does the U-Net use its grounding, and its boxes' places? The epsilon MSE of the first
    ``num_items`` items of ``split`` (a world.data.WorldSplit) at each of ``timesteps``, with
    their boxes and phrases ("grounded"), with every box masked ("ungrounded") and with every
    box mirrored left-right ("mirrored": the same phrases and box sizes, other places), once
    with the captions and once with the empty caption; the same noise for all three.
    ``gap`` = 1 - grounded / ungrounded: what the grounding input is worth (0: nothing);
    ``position_gap`` = 1 - grounded / mirrored: what the boxes' *places* are worth (0: the
    phrases alone explain the gap; a U-Net that grounds its phrases in their boxes has a
    position gap close to its gap). -> {"t=<t>": {"caption" | "empty caption": {"grounded",
    "ungrounded", "mirrored", "gap", "position_gap"}}}."""
    import jax
    import jax.numpy as jnp

    from goal_jax import schedule as schedule_lib
    from goal_jax.world import models, unet_stage

    p = pipeline
    params = p.unet_params if unet_params is None else unet_params
    batch_size = min(batch_size, num_items, len(split))
    n = min(num_items, len(split)) // batch_size * batch_size
    cache = unet_stage.TextCache(p.tokenizer, split, max_boxes)
    sched = schedule_lib.DDPMSchedule.from_config(models.SCHEDULER_CONFIG)

    @jax.jit
    def losses(images, ids, phrase_ids, boxes, masks, t, noise):
        context = p.text_encoder.apply({"params": p.text_params}, ids).last_hidden_state
        grounded = unet_stage.phrase_grounding(p.text_encoder, p.text_params, phrase_ids,
                                               boxes, masks)
        ungrounded = {**grounded, "masks": jnp.zeros_like(masks),
                      "phrase_embeds": jnp.zeros_like(grounded["phrase_embeds"])}
        mirrored = {**grounded, "boxes": mirror_boxes(boxes)}
        z0 = unet_stage.latent_means(p.vae, p.vae_params, images)
        z_t = schedule_lib.add_noise(sched, z0, noise, t)
        out = []
        for g in (grounded, ungrounded, mirrored):
            eps = p.unet.apply({"params": params}, z_t, t, context, g)
            out.append(jnp.mean((eps - noise) ** 2))
        return jnp.stack(out)

    f = _vae_factor(p.vae)
    latent = (batch_size, split.images.shape[1] // f, split.images.shape[2] // f,
              p.unet.config.in_channels)
    rng = np.random.default_rng([seed, 7])
    result = {}
    for tv in timesteps:
        row = {}
        for label in ("caption", "empty caption"):
            sums = np.zeros(3)
            for s in range(0, n, batch_size):
                sl = slice(s, s + batch_size)
                ids = cache.captions[sl] if label == "caption" else np.broadcast_to(
                    cache.null, cache.captions[sl].shape)
                images = split.images_float(np.arange(s, s + batch_size))
                noise = rng.standard_normal(latent).astype(np.float32)
                sums += np.asarray(losses(jnp.asarray(images), jnp.asarray(ids),
                                          jnp.asarray(cache.phrases[sl]),
                                          jnp.asarray(cache.boxes[sl]),
                                          jnp.asarray(cache.masks[sl]),
                                          jnp.full((batch_size,), tv, jnp.int32),
                                          jnp.asarray(noise)))
            grounded, ungrounded, mirrored = sums / (n // batch_size)
            row[label] = {"grounded": round(float(grounded), 6),
                          "ungrounded": round(float(ungrounded), 6),
                          "mirrored": round(float(mirrored), 6),
                          "gap": round(float(1.0 - grounded / ungrounded), 5),
                          "position_gap": round(float(1.0 - grounded / mirrored), 5)}
        result[f"t={tv}"] = row
    return result


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
