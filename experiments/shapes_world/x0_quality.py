"""What DSAlign sees: the quality of the one-step prediction x̂0 at each diffusion time.

DSAlign (eq. 4-10) scores x̂0 = D((z_t - √(1-ᾱ_t) ε̂) / √ᾱ_t), the U-Net's one-step guess of the
clean image, with CLIP; training draws t uniformly from [0, T). Where x̂0 is a blur, CLIP
cannot read the named colour or shape in a box, and DSAlign's gradient carries no binding
signal. This measures, on the held-out evaluation layouts and their ground-truth renders, for
each t of ``timesteps`` (the same noise for every t):

* ``psnr_db``: PSNR of x̂0 against the render (pixels in [0, 1]);
* ``oracle``: the world oracle on x̂0 (pixels only): graded score and the per-box rates
  (object present, named colour in the box, shape, texture, IoU);
* ``clip``: the world CLIP's zero-shot accuracy on each box's region of x̂0, exactly as
  DSAlign's local term forms it (x̂0 · M_box, ``objectives.masked_regions``): among the
  phrases that differ from the object's own in one attribute (9 colours / 6 shapes / 4
  textures), is the object's own the nearest? Plus the cosine of the region with its own
  phrase (what D_local pulls up) and the ``margin``: that cosine minus the mean cosine of the
  phrases with another colour (what makes the pull specific to the colour).

The row ``t = 0 (render)`` scores the renders themselves (the ceiling). Run::

    python -m experiments.shapes_world.x0_quality --world assets/shapes_world \\
        --out experiments/shapes_world/x0_quality

It writes ``<out>/x0_quality.json``, ``<out>/x0_quality.md`` (the table) and
``<out>/x0_quality.png`` (x̂0 of a few layouts at each t). ``--pipeline`` measures another
U-Net of the same world (e.g. ``assets/shapes_world/goal``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
ATTRIBUTES = ("color", "shape", "texture")


def _candidates(obj: dict) -> dict:
    """{attribute: (phrases that change only that attribute, index of the object's own)}:
    the world's object descriptions (goal_jax.world.clip_stage)."""
    from goal_jax.data import shapes
    from goal_jax.world import clip_stage

    vocab = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
             "texture": list(shapes.TEXTURES)}
    truth = {a: obj[a] for a in ATTRIBUTES}
    return {a: ([clip_stage._phrase(**dict(truth, **{a: v})) for v in vocab[a]],
                vocab[a].index(truth[a])) for a in ATTRIBUTES}


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image PSNR (dB) of float images in [0, 1] [N, H, W, 3]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


class X0Probe:
    """One-step predictions of a world pipeline and their CLIP region embeddings.

    Args:
      pipeline_dir: a diffusers GLIGEN pipeline folder of the world.
      clip_dir: the world's CLIPModel folder (DSAlign's CLIP).
      max_boxes: grounding slots.
    """

    def __init__(self, pipeline_dir: str, clip_dir: str, max_boxes: int = 4):
        import jax
        import jax.numpy as jnp

        from experiments.shapes_world import evaluate as eval_lib
        from goal_jax import objectives, weights
        from goal_jax import schedule as schedule_lib
        from goal_jax.world import unet_stage

        self.max_boxes = max_boxes
        p = self.pipe = weights.load_pipeline(pipeline_dir)
        self.clip, self.clip_params = weights.load_component(clip_dir, "clip")
        self.clip_tokenizer = eval_lib.clip_tokenizer(clip_dir, pipeline_dir)
        sched = schedule_lib.DDPMSchedule.from_config(p.scheduler_config)
        self.num_train_timesteps = sched.num_train_timesteps
        scaling = float(p.vae.config.scaling_factor)
        clip, size = self.clip, self.clip.config.vision_config.image_size

        @jax.jit
        def x0_hat(images, ids, phrase_ids, boxes, masks, t, noise):
            """images [B,H,W,3] in [-1,1] -> x̂0 [B,H,W,3] in [-1,1] at t [B] (t = 0: the
            VAE's reconstruction of the image, no U-Net)."""
            context = p.text_encoder.apply({"params": p.text_params}, ids).last_hidden_state
            g = unet_stage.phrase_grounding(p.text_encoder, p.text_params, phrase_ids, boxes,
                                            masks)
            z0 = unet_stage.latent_means(p.vae, p.vae_params, images)
            z_t = schedule_lib.add_noise(sched, z0, noise, t)
            eps = p.unet.apply({"params": p.unet_params}, z_t, t, context, g)
            z0_hat = schedule_lib.predict_x0(sched, z_t, eps, t)
            z0_hat = jnp.where((t == 0)[:, None, None, None], z0, z0_hat)
            return p.vae.apply({"params": p.vae_params}, z0_hat / scaling, method=p.vae.decode)

        @jax.jit
        def region_embeds(images, boxes):
            """images [B,H,W,3] in [-1,1], boxes [B,N,4] -> unit CLIP embeds of x · M_box
            [B,N,P] (DSAlign's local regions)."""
            regions = objectives.masked_regions(images, boxes)
            b, n = boxes.shape[:2]
            pixels = objectives.clip_pixels(regions, size)
            e = clip.apply({"params": self.clip_params},
                           pixels.reshape((b * n,) + pixels.shape[2:]),
                           method="encode_image").embeds
            e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
            return e.reshape(b, n, -1)

        @jax.jit
        def text_embeds(ids):
            e = clip.apply({"params": self.clip_params}, ids, method="encode_text").embeds
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        self._x0_hat, self._region_embeds, self._text_embeds = x0_hat, region_embeds, text_embeds
        self._text_cache: dict[str, np.ndarray] = {}

    def text_embeds(self, phrases: list[str]) -> np.ndarray:
        """Unit CLIP text embeds [len(phrases), P] (cached per phrase)."""
        from goal_jax import text as text_lib

        new = sorted({p for p in phrases if p not in self._text_cache})
        if new:
            ids = text_lib.tokenize(self.clip_tokenizer, new)
            for p, e in zip(new, np.asarray(self._text_embeds(ids))):
                self._text_cache[p] = e
        return np.stack([self._text_cache[p] for p in phrases])

    def inputs(self, items: list[dict]) -> dict:
        """Token ids, boxes and masks of ``items`` (padded to ``max_boxes`` slots)."""
        from goal_jax import text as text_lib

        b, m = len(items), self.max_boxes
        boxes = np.zeros((b, m, 4), np.float32)
        masks = np.zeros((b, m), np.float32)
        phrases = [[""] * m for _ in items]
        for i, it in enumerate(items):
            if len(it["boxes"]) > m:
                raise ValueError(f"item {it['id']}: {len(it['boxes'])} boxes, at most {m}")
            for j, (phrase, box) in enumerate(zip(it["phrases"], it["boxes"])):
                boxes[i, j], masks[i, j], phrases[i][j] = box, 1.0, phrase
        tok = self.pipe.tokenizer
        ids = text_lib.tokenize(tok, [it["caption"] for it in items])
        phrase_ids = text_lib.tokenize(tok, [p for row in phrases for p in row]).reshape(
            b, m, -1)
        return {"ids": ids, "phrase_ids": phrase_ids, "boxes": boxes, "masks": masks}

    def predict(self, images_uint8: np.ndarray, inputs: dict, t: int,
                noise: np.ndarray) -> np.ndarray:
        """float x̂0 in [0, 1] [B,H,W,3] of renders ``images_uint8`` at diffusion time t."""
        images = images_uint8.astype(np.float32) / 127.5 - 1.0
        b = images.shape[0]
        out = self._x0_hat(images, inputs["ids"], inputs["phrase_ids"], inputs["boxes"],
                           inputs["masks"], np.full((b,), t, np.int32), noise)
        return np.clip(np.asarray(out, np.float32) / 2 + 0.5, 0.0, 1.0)

    def clip_readings(self, images01: np.ndarray, items: list[dict],
                      boxes: np.ndarray) -> list[dict]:
        """Per box of ``items`` whose object is one thing (not a counted group): the zero-shot
        reading of its region of ``images01`` ([B,H,W,3] in [0, 1]) for each attribute, the
        cosine with its own phrase and the colour margin."""
        emb = np.asarray(self._region_embeds(images01 * 2 - 1, boxes))
        rows = []
        for i, it in enumerate(items):
            if it["category"] == "counting":
                continue  # plural phrases ("yellow stars"): no single-object description
            for j, obj in enumerate(it["objects"]):
                cands = _candidates(obj)
                row = {}
                for a, (phrases, own) in cands.items():
                    sims = self.text_embeds(phrases) @ emb[i, j]
                    row[a] = bool(int(np.argmax(sims)) == own)
                    if a == "color":
                        row["cosine"] = float(sims[own])
                        row["margin"] = float(sims[own] - np.mean(np.delete(sims, own)))
                rows.append(row)
        return rows


def _summary_row(label: str, t: int, x0: np.ndarray, truth01: np.ndarray, oracle_scored: dict,
                 clip_rows: list[dict]) -> dict:
    boxes = oracle_scored["summary"]["boxes"]
    return {"label": label, "t": t,
            "psnr_db": round(float(np.mean(_psnr(x0, truth01))), 2),
            "oracle": {"score": oracle_scored["summary"]["score"],
                       **{k: boxes[k] for k in ("present", "color_in_box", "shape", "texture",
                                                "iou")}},
            "clip": {**{a: round(float(np.mean([r[a] for r in clip_rows])), 4)
                        for a in ATTRIBUTES},
                     "cosine": round(float(np.mean([r["cosine"] for r in clip_rows])), 4),
                     "margin": round(float(np.mean([r["margin"] for r in clip_rows])), 4),
                     "boxes": len(clip_rows)}}


def measure(pipeline_dir: str, clip_dir: str, items: list[dict], truth: np.ndarray,
            timesteps=TIMESTEPS, max_boxes: int = 4, batch_size: int = 32, seed: int = 0,
            log=print) -> tuple[dict, dict]:
    """x̂0 quality of ``items`` (datasets.eval_layouts) with renders ``truth`` (uint8
    [N, R, R, 3]) at each t of ``timesteps`` (0 = the VAE reconstruction).

    Returns (result, pictures): result = {"rows": [{"label", "t", "psnr_db", "oracle",
    "clip"}], "items", "timesteps", "seed", "wall_s"}, with the renders' own row first
    (label "render"); pictures = {t: uint8 x̂0 [N, R, R, 3]}."""
    from goal_jax.evaluation import oracle as oracle_lib
    from goal_jax.world import evaluate as world_eval

    start = time.time()
    probe = X0Probe(pipeline_dir, clip_dir, max_boxes)
    oracle = oracle_lib.Oracle.load()
    bad = [t for t in timesteps if not 0 <= int(t) < probe.num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps {bad} are outside [0, {probe.num_train_timesteps})")
    truth01 = truth.astype(np.float32) / 255.0
    n = len(items)
    latent_hw = truth.shape[1] // world_eval._vae_factor(probe.pipe.vae)
    noise = np.random.default_rng([seed, 40]).standard_normal(
        (n, latent_hw, latent_hw, probe.pipe.unet.config.in_channels)).astype(np.float32)
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    inputs = [probe.inputs([items[i] for i in c]) for c in chunks]

    def clip_rows(images01):
        rows = []
        for c, inp in zip(chunks, inputs):
            rows += probe.clip_readings(images01[c], [items[i] for i in c], inp["boxes"])
        return rows

    rows = [_summary_row("render", 0, truth01, truth01, world_eval.score(truth, items, oracle),
                         clip_rows(truth01))]
    pictures = {}
    for k, t in enumerate(timesteps):
        x0 = np.concatenate([probe.predict(truth[c], inp, int(t), noise[c])
                             for c, inp in zip(chunks, inputs)])
        x0_uint8 = np.round(x0 * 255).astype(np.uint8)
        pictures[int(t)] = x0_uint8
        label = "VAE reconstruction" if t == 0 else f"x̂0 at t = {t}"
        rows.append(_summary_row(label, int(t), x0, truth01, world_eval.score(x0_uint8, items,
                                                                              oracle),
                                 clip_rows(x0_uint8.astype(np.float32) / 255.0)))
        r = rows[-1]
        log(f"[x0] t = {t:4d}: PSNR {r['psnr_db']:.1f} dB, oracle colour in box "
            f"{100 * r['oracle']['color_in_box']:.1f} %, CLIP colour {100 * r['clip']['color']:.1f}"
            f" %, shape {100 * r['clip']['shape']:.1f} % ({k + 1}/{len(timesteps)}, "
            f"{time.time() - start:.0f} s)")
    return {"rows": rows, "items": n, "timesteps": [int(t) for t in timesteps],
            "seed": seed, "pipeline": pipeline_dir, "clip_dir": clip_dir,
            "num_train_timesteps": probe.num_train_timesteps,
            "wall_s": round(time.time() - start, 1)}, pictures


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    """The table of :func:`measure`'s result (percentages; PSNR in dB; cosines × 100)."""
    chance = {"color": 1 / 9, "shape": 1 / 6, "texture": 1 / 4}
    lines = [
        f"{result['items']} held-out layouts, their renders noised to t and denoised in one "
        f"step by `{result['pipeline']}`; oracle on x̂0 (pixels only) and the world CLIP on "
        f"each box's region x̂0 · M_box ({result['rows'][0]['clip']['boxes']} single-object "
        "boxes; chance: colour "
        f"{100 * chance['color']:.1f}, shape {100 * chance['shape']:.1f}, texture "
        f"{100 * chance['texture']:.0f}).", "",
        "| | PSNR (dB) | oracle score | object in box | colour in box | shape | texture "
        "| CLIP colour | CLIP shape | CLIP texture | cos(region, phrase) | colour margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, c = r["oracle"], r["clip"]
        psnr = "∞" if r["label"] == "render" else f"{r['psnr_db']:.1f}"
        lines.append(
            f"| {r['label']} | {psnr} | {_pct(o['score'])} | {_pct(o['present'])} | "
            f"{_pct(o['color_in_box'])} | {_pct(o['shape'])} | {_pct(o['texture'])} | "
            f"{_pct(c['color'])} | {_pct(c['shape'])} | {_pct(c['texture'])} | "
            f"{100 * c['cosine']:.1f} | {100 * c['margin']:.1f} |")
    return "\n".join(lines) + "\n"


def picture(path: str, items: list[dict], truth: np.ndarray, pictures: dict,
            show: int = 6, max_rows: int = 6) -> str:
    """A PNG: the renders, then x̂0 at up to ``max_rows`` of the measured t (evenly picked,
    the first and last kept), for the first ``show`` items (boxes drawn)."""
    from goal_jax.world import evaluate as world_eval

    ts = sorted(pictures)
    if len(ts) > max_rows:
        ts = [ts[int(round(i))] for i in np.linspace(0, len(ts) - 1, max_rows)]
    rows = [("render", truth[:show])] + [(f"t = {t}" if t else "VAE recon.", pictures[t][:show])
                                          for t in ts]
    return world_eval.layout_grid(rows, items[:show], path, scale=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="assets/shapes_world", help="world folder (pipeline/, "
                   "clip/, world.json)")
    p.add_argument("--pipeline", default=None, help="GLIGEN pipeline folder whose U-Net is "
                   "measured (default: <world>/pipeline)")
    p.add_argument("--out", required=True, help="folder for x0_quality.json / .md / .png")
    p.add_argument("--per_category", type=int, default=16,
                   help="held-out layouts per category (6 categories)")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from experiments.shapes_world import datasets
    from experiments.shapes_world.run import world_info

    world = world_info(args.world)
    pipeline = os.path.abspath(args.pipeline) if args.pipeline else world["pipeline"]
    items = datasets.eval_layouts(args.per_category, world["resolution"])
    truth = datasets.eval_truth_images(items, world["resolution"])
    result, pictures = measure(pipeline, world["clip"], items, truth, args.timesteps,
                               world["max_boxes"], args.batch_size, args.seed)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for key in ("pipeline", "clip_dir"):
        result[key] = os.path.relpath(result[key], repo)
    result["command"] = "python -m experiments.shapes_world.x0_quality " + " ".join(
        sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "x0_quality.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "x0_quality.md"), "w", encoding="utf-8") as f:
        f.write("# One-step prediction x̂0 by diffusion time\n\n" + markdown(result))
    png = picture(os.path.join(args.out, "x0_quality.png"), items, truth, pictures)
    print(markdown(result))
    print(f"[x0] wrote {args.out}/x0_quality.json, x0_quality.md, {png} "
          f"({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
