"""Sampling every run on the evaluation layouts and scoring it (oracle + world CLIP).

One :class:`Evaluator` per experiment process: the base pipeline, one
``goal_jax.sampling.GLIGENPipeline`` (compiled once; each run only swaps the U-Net weights,
read from its training checkpoint as ``scripts/sample.py --checkpoint`` does), the oracle and
the world CLIP.

Scores per image:

* ``verdict`` (the primary metric): the oracle's category check
  (goal_jax.evaluation.oracle: pixels only, no CLIP, so DSAlign cannot game it);
* ``clip``: the cosine of the world CLIP's image embedding (``objectives.clip_pixels``, as in
  DSAlign) and caption embedding -- a second opinion, and NOT independent of DSAlign, which
  optimises exactly this kind of similarity.
"""

from __future__ import annotations

import os
import time

import numpy as np

from goal_jax import layout as layout_lib

# What the scores in an eval.json were computed with: stored scores of another scorer are
# recomputed from the stored samples (run.py), never mixed. "oracle-graded-1": the oracle's
# verdict plus its graded per-item score (goal_jax/evaluation/oracle.py) and per-box means.
SCORER = "oracle-graded-1"


def load_run_unet(checkpoint_dir: str, base_params):
    """The U-Net of a training run: the trainable leaves of its latest checkpoint over
    ``base_params`` (goal_jax.weights.load_trained_unet: params only, never the optimizer
    state). -> (params, {"step", "replaced", "total"}).

    Raises goal_jax.weights.CheckpointError (a ValueError) naming the directory when a leaf is
    not a U-Net parameter of the base, has another shape or is not finite."""
    from goal_jax import weights

    params, info = weights.load_trained_unet(checkpoint_dir, base_params)
    return params, {k: info[k] for k in ("step", "replaced", "total")}


def clip_tokenizer(clip_dir: str, pipeline_dir: str):
    """The world CLIP's tokenizer: its own folder's when it has one, else the pipeline's (the
    CLIP's text tower is the pipeline's text encoder)."""
    from goal_jax import text as text_lib

    has_tokenizer = any(os.path.isfile(os.path.join(clip_dir, f))
                        for f in ("vocab.json", "tokenizer.json"))
    return text_lib.load_tokenizer(clip_dir if has_tokenizer
                                   else os.path.join(pipeline_dir, "tokenizer"))


class Evaluator:
    """Samples and scores the evaluation ``items`` (datasets.eval_layouts) for any U-Net."""

    def __init__(self, pipeline_dir: str, clip_dir: str, items: list[dict], *,
                 num_steps: int, guidance_scale: float, beta: float, batch_size: int = 32,
                 max_boxes: int = 4, oracle_dir: str | None = None):
        import jax

        from goal_jax import sampling, weights
        from goal_jax import text as text_lib
        from goal_jax.evaluation import oracle as oracle_lib

        self.items = list(items)
        self.pipe = weights.load_pipeline(pipeline_dir)
        self.sampler = sampling.GLIGENPipeline(self.pipe, devices=jax.devices()[:1],
                                                max_boxes=max_boxes)
        self.options = sampling.SampleOptions(sampler="ddim", num_steps=num_steps,
                                              guidance_scale=guidance_scale, beta=beta)
        self.settings = {"sampler": "ddim", "num_steps": num_steps,
                         "guidance_scale": guidance_scale, "beta": beta}
        self.batch_size = min(batch_size, len(self.items))
        self.oracle = oracle_lib.Oracle.load(oracle_dir)
        clip, clip_params = weights.load_component(clip_dir, "clip")
        self.clip, self.clip_params = clip, clip_params
        ids = text_lib.tokenize(clip_tokenizer(clip_dir, pipeline_dir),
                                [it["caption"] for it in self.items])
        self._text = np.asarray(jax.jit(lambda p, x: clip.apply(
            {"params": p}, x, method="encode_text").embeds)(clip_params, ids))
        self._image_fn = jax.jit(self._image_embeds)

    def _image_embeds(self, params, images):
        from goal_jax import objectives

        size = int(self.clip.config.vision_config.image_size)
        pixels = objectives.clip_pixels(images.astype(np.float32) / 127.5 - 1.0, size)
        return self.clip.apply({"params": params}, pixels, method="encode_image").embeds

    def sample(self, unet_params=None) -> np.ndarray:
        """uint8 [N, H, W, 3] samples of the items (each with its own seed) with
        ``unet_params`` (None: the base world)."""
        self.sampler.set_unet_params(self.pipe.unet_params if unet_params is None
                                     else unet_params)
        out, b = [], self.batch_size
        for start in range(0, len(self.items), b):
            chunk = self.items[start:start + b]
            padded = chunk + [chunk[-1]] * (b - len(chunk))  # fixed batch: one program
            res = self.sampler.sample(
                [it["caption"] for it in padded],
                [layout_lib.Layout(tuple(it["phrases"]), tuple(tuple(x) for x in it["boxes"]))
                 for it in padded],
                [int(it["seed"]) for it in padded], self.options)
            out.append(np.asarray(res.images)[:len(chunk)])
        return np.concatenate(out)

    def clip_scores(self, images: np.ndarray) -> np.ndarray:
        """float [N]: cosine of the world CLIP's image and caption embeddings."""
        embeds = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            x = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
            embeds.append(np.asarray(self._image_fn(self.clip_params, x))[:len(chunk)])
        img = np.concatenate(embeds)
        img = img / np.linalg.norm(img, axis=-1, keepdims=True)
        txt = self._text / np.linalg.norm(self._text, axis=-1, keepdims=True)
        return np.sum(img * txt, axis=-1)

    def score(self, images: np.ndarray) -> dict:
        """Oracle + CLIP scores of ``images`` (aligned with the items) -> {"items": [{"id",
        "category", "verdict", "score", "clip"}], "boxes": oracle per-box summary,
        "categories": {cat: {"n", "score", "oracle", "clip", "boxes"}}, "score", "oracle",
        "clip" (means over all items)}. ``score`` is the oracle's graded per-item score (the
        experiment's primary number, like T2I-CompBench's per-category scores), ``oracle`` its
        all-or-nothing verdict rate, ``boxes`` the per-box means of the category's items."""
        from goal_jax.evaluation import oracle as oracle_lib

        fields = ("id", "caption", "phrases", "boxes", "category")
        results = []
        for start in range(0, len(images), 64):
            results += self.oracle.score_items(
                list(images[start:start + 64]),
                [{k: it[k] for k in fields} for it in self.items[start:start + 64]])
        clip = self.clip_scores(images)
        summary = oracle_lib.summarize(results)
        per_item = [{"id": it["id"], "category": it["category"], "verdict": bool(r["verdict"]),
                     "score": round(float(r["score"]), 5), "clip": round(float(c), 5)}
                    for it, r, c in zip(self.items, results, clip)]
        cats = {}
        for cat in dict.fromkeys(it["category"] for it in self.items):
            rows = [p for p in per_item if p["category"] == cat]
            cats[cat] = {"n": len(rows), "score": float(np.mean([p["score"] for p in rows])),
                         "oracle": float(np.mean([p["verdict"] for p in rows])),
                         "clip": float(np.mean([p["clip"] for p in rows])),
                         "boxes": oracle_lib.box_summary(
                             [r for r, it in zip(results, self.items) if it["category"] == cat])}
        return {"items": per_item, "boxes": summary["boxes"], "categories": cats,
                "scorer": SCORER, "score": float(np.mean([p["score"] for p in per_item])),
                "oracle": float(np.mean([p["verdict"] for p in per_item])),
                "clip": float(np.mean(clip))}

    def evaluate(self, unet_params=None) -> tuple[dict, np.ndarray]:
        """sample + score -> (scores with "wall_s", images)."""
        start = time.time()
        images = self.sample(unet_params)
        scores = self.score(images)
        scores["wall_s"] = round(time.time() - start, 1)
        return scores, images
