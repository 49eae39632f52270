"""Scores of layouts and images: NSR-1K counting / spatial metrics and CLIP similarity.

Layout (planner) metrics follow LayoutGPT's ``eval_counting_layout.py`` and
``eval_spatial_layout.py`` (the numbers of the GOAL paper's Table 8):

* counting, per prompt with ground truth ``[(name, n), ...]`` and predicted phrases: each
  predicted box counts for the first ground-truth name it denotes (:func:`name_matches`);
  ``intersection = sum_name min(pred_n, gt_n)``; precision = intersection / (all predicted
  boxes), recall = intersection / (all ground-truth objects), both 0 when the intersection is
  0; accuracy = every name's count exact; MAE = mean |pred_n - gt_n| over names.
  Comparison prompts (``sub-type == "comparison"``: "the number of X is more than that of
  Y") score accuracy only: correct when the counts equal the ground truth's when it is a tie,
  else when X's count is exact and the sign of X - Y agrees. Averages are over prompts
  (precision / recall / MAE over non-comparison prompts).
* spatial: the boxes denoting obj1 and obj2 (:func:`name_matches`); correct when some pair
  (b1, b2) has the ground-truth relation by the direction of their centres
  (:func:`spatial_relation`: left / right / top / bottom within 45 degrees of the axis;
  "next to" accepts left or right); a prompt whose obj1 or obj2 has no box is wrong and
  counted as missing.

Name matching differs from LayoutGPT in one way: LayoutGPT strips article characters with
``str.lstrip`` and matches substrings, and uses ``difflib.get_close_matches`` for spatial
names; here both use :func:`goal_jax.planner.name_matches` (whole words, plural-insensitive),
so "car" matches "a red car" but not "carpet".

Image metrics: detections (``goal_jax.evaluation.detector``) scored as LayoutGPT's GLIP
evaluation (a category is right when its detected count equals the ground truth; comparison
prompts by the same rule as layouts; spatial as above on detected boxes), and CLIP
image-text cosine similarity (:class:`ClipScorer`, the Flax CLIP; T2I-CompBench's CLIPScore
is this cosine with OpenAI CLIP ViT-B/32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np

from goal_jax.planner import name_matches

RELATIONS = ("left", "right", "top", "bottom", "next to")
_THETA = math.sqrt(2) / 2


# ----------------------------------------------------------------------------------------------
# Spatial relations.
# ----------------------------------------------------------------------------------------------


def spatial_relation(box1: Sequence[float], box2: Sequence[float]) -> str:
    """Relation of box1 to box2 (xyxy, y down) by the direction between their centres:
    ``"right"`` when cos > sqrt(2)/2 (box1's centre is right of box2's), ``"top"`` when
    sin > sqrt(2)/2 (above), ``"left"``, ``"bottom"``, else ``"diagonal"``; identical boxes
    are ``"diagonal"`` (LayoutGPT's ``eval_spatial_relation``)."""
    b1 = [float(v) for v in box1]
    b2 = [float(v) for v in box2]
    if b1 == b2:
        return "diagonal"
    xa, ya = (b1[0] + b1[2]) / 2, (b1[1] + b1[3]) / 2
    xb, yb = (b2[0] + b2[2]) / 2, (b2[1] + b2[3]) / 2
    dist = math.hypot(xa - xb, ya - yb)
    if dist == 0:
        return "diagonal"
    cos, sin = (xa - xb) / dist, (yb - ya) / dist
    if cos > _THETA:
        return "right"
    if sin > _THETA:
        return "top"
    if cos < -_THETA:
        return "left"
    if sin < -_THETA:
        return "bottom"
    return "diagonal"


def relation_holds(relation: str, boxes1: Sequence[Sequence[float]],
                   boxes2: Sequence[Sequence[float]]) -> bool:
    """Whether some (b1, b2) pair has ``relation`` ("next to": left or right)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    found = {spatial_relation(b1, b2) for b1 in boxes1 for b2 in boxes2}
    if relation == "next to":
        return bool(found & {"left", "right"})
    return relation in found


def spatial_score(obj1: str, obj2: str, relation: str, phrases: Sequence[str],
                  boxes: Sequence[Sequence[float]]) -> dict[str, bool]:
    """One spatial prompt on a layout (or detections as phrases + boxes) ->
    ``{"correct", "missing"}``."""
    b1 = [b for p, b in zip(phrases, boxes) if name_matches(obj1, p)]
    b2 = [b for p, b in zip(phrases, boxes) if name_matches(obj2, p)]
    if not b1 or not b2:
        return {"correct": False, "missing": True}
    return {"correct": relation_holds(relation, b1, b2), "missing": False}


# ----------------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------------


def count_by_name(names: Sequence[str], phrases: Iterable[str]) -> tuple[dict[str, int], int]:
    """Predicted boxes per ground-truth name (each phrase counts for the first name it
    denotes) and the total number of phrases."""
    counts = {n: 0 for n in names}
    total = 0
    for phrase in phrases:
        total += 1
        for n in names:
            if name_matches(n, phrase):
                counts[n] += 1
                break
    return counts, total


def _comparison_correct(gt: Sequence[tuple[str, int]], pred: dict[str, int]) -> bool:
    (n1, g1), (n2, g2) = gt[0], gt[1]
    p1, p2 = pred[n1], pred[n2]
    if g1 == g2:
        return p1 == g1 and p2 == g2
    return p1 == g1 and (g1 - g2) * (p1 - p2) > 0


def counting_score(gt: Sequence[tuple[str, int]], phrases: Sequence[str],
                   comparison: bool = False) -> dict[str, Any]:
    """One counting prompt -> ``{"precision", "recall", "iou", "mae", "accuracy",
    "comparison", "counts"}`` (precision / recall / iou / mae None for comparison prompts).

    Args:
      gt: ``[(name, count), ...]`` (NSR-1K's ``num_object``).
      phrases: the predicted boxes' phrases (a layout's, or detected labels).
      comparison: score as a comparison prompt (needs exactly two names).
    """
    gt = [(str(n), int(c)) for n, c in gt]
    if not gt:
        raise ValueError("counting_score: the ground truth has no objects")
    names = [n for n, _ in gt]
    pred, total = count_by_name(names, phrases)
    out: dict[str, Any] = {"comparison": bool(comparison), "counts": dict(pred)}
    if comparison:
        if len(gt) != 2:
            raise ValueError(f"counting_score: a comparison prompt needs 2 names, got {names}")
        out.update(precision=None, recall=None, iou=None, mae=None,
                   accuracy=float(_comparison_correct(gt, pred)))
        return out
    inter = sum(min(pred[n], c) for n, c in gt)
    union = sum(max(pred[n], c) for n, c in gt)
    gt_total = sum(c for _, c in gt)
    out.update(
        precision=inter / total if inter else 0.0,
        recall=inter / gt_total if inter else 0.0,
        iou=inter / union if inter else 0.0,
        mae=sum(abs(pred[n] - c) for n, c in gt) / len(gt),
        accuracy=float(all(pred[n] == c for n, c in gt)),
    )
    return out


def detection_counting_score(gt: Sequence[tuple[str, int]], labels: Sequence[str],
                             comparison: bool = False) -> dict[str, Any]:
    """Counting on detections (LayoutGPT's GLIP rule): ``{"correct_categories",
    "categories", "accuracy"}``; a comparison prompt is one category, right by the
    comparison rule; otherwise each name is right when its detected count is exact."""
    gt = [(str(n), int(c)) for n, c in gt]
    pred, _ = count_by_name([n for n, _ in gt], labels)
    if comparison:
        ok = _comparison_correct(gt, pred)
        return {"correct_categories": int(ok), "categories": 1, "accuracy": float(ok),
                "counts": pred}
    right = sum(pred[n] == c for n, c in gt)
    return {"correct_categories": right, "categories": len(gt),
            "accuracy": float(right == len(gt)), "counts": pred}


def mean_of(rows: Sequence[dict], key: str) -> float | None:
    """Mean of ``row[key]`` over rows where it is not None (None when there are none)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def summarize_counting(rows: Sequence[dict]) -> dict[str, Any]:
    """Per-prompt :func:`counting_score` rows -> means and sizes."""
    return {"precision": mean_of(rows, "precision"), "recall": mean_of(rows, "recall"),
            "iou": mean_of(rows, "iou"), "mae": mean_of(rows, "mae"),
            "accuracy": mean_of(rows, "accuracy"), "n": len(rows),
            "n_comparison": sum(bool(r["comparison"]) for r in rows)}


def summarize_spatial(rows: Sequence[dict]) -> dict[str, Any]:
    """Per-prompt :func:`spatial_score` rows -> accuracy, missing count, size."""
    return {"accuracy": mean_of([{"c": float(r["correct"])} for r in rows], "c"),
            "missing": sum(bool(r["missing"]) for r in rows), "n": len(rows)}


# ----------------------------------------------------------------------------------------------
# CLIP similarity.
# ----------------------------------------------------------------------------------------------


class ClipScorer:
    """Cosine similarity of CLIP image and text embeddings with the Flax CLIP.

    ``score(images, texts)``: uint8 images [B, H, W, 3] (any size; resized and centre-cropped
    as CLIPImageProcessor does, ``goal_jax.models.clip.preprocess``) and B texts -> float
    [B] cosine(visual_projection(image), text_projection(text)) in [-1, 1].

    Args:
      model, params: ``goal_jax.weights.load_clip`` output.
      tokenizer: a CLIP tokenizer (``goal_jax.text.load_tokenizer``).
      batch_size: images per jit call (batches are padded to it: one compile).
    """

    def __init__(self, model, params, tokenizer, batch_size: int = 8):
        import jax
        import jax.numpy as jnp

        from goal_jax.models import clip as clip_lib

        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = int(batch_size)
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

        def embed(params, images_u8, input_ids):
            x = images_u8.astype(jnp.float32) / 127.5 - 1.0
            pixels = clip_lib.preprocess(x, self.image_size)
            v = model.apply({"params": params}, pixels, method="encode_image").embeds
            t = model.apply({"params": params}, input_ids, method="encode_text").embeds
            v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
            t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
            return jnp.sum(v * t, axis=-1)

        self._embed = jax.jit(embed)

    @classmethod
    def from_folder(cls, clip_folder: str, tokenizer_folder: str | None = None,
                    batch_size: int = 8) -> "ClipScorer":
        """A Hugging Face CLIPModel folder (its own tokenizer files, or ``tokenizer_folder``)."""
        from goal_jax import text as text_lib
        from goal_jax import weights

        model, params = weights.load_clip(clip_folder)
        tokenizer = text_lib.load_tokenizer(tokenizer_folder or clip_folder)
        return cls(model, params, tokenizer, batch_size)

    def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        from goal_jax import text as text_lib

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"ClipScorer: images must be uint8 [B, H, W, 3], got "
                             f"{images.dtype} {images.shape}")
        texts = list(texts)
        if len(texts) != len(images):
            raise ValueError(f"ClipScorer: {len(images)} images but {len(texts)} texts")
        out = []
        for start in range(0, len(texts), self.batch_size):
            imgs = images[start:start + self.batch_size]
            ids = text_lib.tokenize(self.tokenizer, texts[start:start + self.batch_size],
                                    self.max_length)
            n = len(imgs)
            pad = self.batch_size - n
            if pad:
                imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, 0)])
                ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            out.append(np.asarray(self._embed(self.params, imgs, ids))[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@dataclasses.dataclass
class Summary:
    """Mean, standard deviation and count of a list of numbers (None when empty)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        if not len(values):
            return cls(None, None, 0)
        v = np.asarray(values, np.float64)
        return cls(float(v.mean()), float(v.std()), int(v.size))
