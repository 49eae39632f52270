"""Scores of layouts and images: NSR-1K counting / spatial metrics and CLIP similarity.

Layout (planner) metrics are those of LayoutGPT's ``eval_counting_layout.py`` and
``eval_spatial_layout.py`` (the numbers of the GOAL paper's Table 8). Which predicted boxes
denote which object name is set by ``matching``: ``"layoutgpt"`` (default: LayoutGPT's own
rules, so the numbers equal what its scripts print) or ``"goal_jax"`` (stricter whole-phrase
rules); both are defined in :mod:`goal_jax.evaluation.matching`.

* counting, per prediction with ground truth ``[(name, n), ...]`` (NSR-1K's ``num_object``):
  ``intersection = sum_name min(pred_n, gt_n)``; precision = intersection / (predicted boxes
  with a name), recall = intersection / (ground-truth objects), IoU = intersection /
  ``sum_name max(pred_n, gt_n)``, all three 0 when the intersection is 0; accuracy = every
  name's count exact; MAE = mean |pred_n - gt_n| over names. Comparison prompts
  (``sub-type == "comparison"``: "the number of X is more than that of Y") score accuracy
  only: right when all four counts are equal, or when X's count is exact and X - Y has the
  ground truth's sign. Averages are over predictions; precision / recall / IoU / MAE over the
  non-comparison ones (:func:`summarize_counting` reports each metric's n).
* spatial: the boxes standing for obj1 and obj2; right when some pair (b1, b2) has the
  ground-truth relation by the direction of their centres (:func:`spatial_relation`: left /
  right / top / bottom within 45 degrees of the axis; "next to" accepts left or right); a
  prediction without a box for obj1 or obj2 is wrong and counted as missing.

Image metrics follow LayoutGPT's GLIP scripts (``eval_models/GLIP/eval_counting.py`` /
``eval_spatial.py``): a detection counts for a name when its label is exactly that name
(the detector is prompted with the names). Counting accuracy = right categories / categories
over all images, where an image has one category per distinct ground-truth name (right when
its detected count is exact) except that a comparison prompt is right once (by the comparison
rule) but still has two categories in the denominator -- as LayoutGPT's script counts it.
Spatial accuracy = images with the relation found / images. CLIP image-text cosine similarity:
:class:`ClipScorer` (the Flax CLIP; T2I-CompBench's CLIPScore is this cosine with OpenAI CLIP
ViT-B/32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from goal_jax.evaluation import matching as matching_lib
from goal_jax.evaluation.matching import LAYOUTGPT

RELATIONS = ("left", "right", "top", "bottom", "next to")
_THETA = math.sqrt(2) / 2


# ----------------------------------------------------------------------------------------------
# Spatial relations.
# ----------------------------------------------------------------------------------------------


def spatial_relation(box1: Sequence[float], box2: Sequence[float]) -> str:
    """Relation of box1 to box2 (xyxy, y down) by the direction between their centres:
    ``"right"`` when cos > sqrt(2)/2 (box1's centre is right of box2's), ``"top"`` when
    sin > sqrt(2)/2 (above), ``"left"``, ``"bottom"``, else ``"diagonal"``; identical boxes
    and boxes with the same centre are ``"diagonal"`` (LayoutGPT's ``eval_spatial_relation``)."""
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


def _spatial_from_boxes(relation: str, b1, b2) -> dict[str, bool]:
    if not b1 or not b2:
        return {"correct": False, "missing": True}
    return {"correct": relation_holds(relation, b1, b2), "missing": False}


def spatial_score(obj1: str, obj2: str, relation: str, phrases: Sequence[str | None],
                  boxes: Sequence[Sequence[float]], matching: str = LAYOUTGPT
                  ) -> dict[str, bool]:
    """One spatial prompt on a predicted layout -> ``{"correct", "missing"}``.

    Args:
      phrases, boxes: the predicted boxes (xyxy, any common unit) and their names (None: a box
        without a name, left out).
      matching: "layoutgpt" or "goal_jax" (:mod:`goal_jax.evaluation.matching`).
    """
    b1 = matching_lib.spatial_boxes(obj1, phrases, boxes, matching)
    b2 = matching_lib.spatial_boxes(obj2, phrases, boxes, matching)
    return _spatial_from_boxes(relation, b1, b2)


# ----------------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------------


def _comparison_correct(gt: Sequence[tuple[str, int]], pred: dict[str, int]) -> bool:
    (n1, g1), (n2, g2) = gt[0], gt[1]
    p1, p2 = pred.get(n1, 0), pred.get(n2, 0)
    if g1 == g2 == p1 == p2:
        return True
    return p1 == g1 and (g1 - g2) * (p1 - p2) > 0


def counting_score(gt: Sequence[tuple[str, int]], phrases: Sequence[str | None],
                   comparison: bool = False, matching: str = LAYOUTGPT) -> dict[str, Any]:
    """One counting prediction -> ``{"precision", "recall", "iou", "mae", "accuracy",
    "comparison", "counts"}`` (precision / recall / iou / mae None for comparison prompts).

    Args:
      gt: ``[(name, count), ...]`` (NSR-1K's ``num_object``).
      phrases: the predicted boxes' names (None: a box without a name, not counted).
      comparison: score as a comparison prompt (needs exactly two names).
      matching: "layoutgpt" or "goal_jax" (:mod:`goal_jax.evaluation.matching`).
    """
    gt = [(str(n), int(c)) for n, c in gt]
    if not gt:
        raise ValueError("counting_score: the ground truth has no objects")
    names = [n for n, _ in gt]
    pred, total = matching_lib.count_by_name(names, phrases, matching)
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


# ----------------------------------------------------------------------------------------------
# Detections (LayoutGPT's GLIP evaluation).
# ----------------------------------------------------------------------------------------------


def detection_counting_score(gt: Sequence[tuple[str, int]], labels: Sequence[str],
                             comparison: bool = False) -> dict[str, Any]:
    """Counting on one image's detections: ``{"correct_categories", "categories",
    "all_correct", "counts"}``. A detection counts for a name when its label (stripped) is
    exactly the name; ``categories`` = distinct ground-truth names (2 for a comparison
    prompt, which has at most 1 right category: LayoutGPT's GLIP rule)."""
    gt = [(str(n), int(c)) for n, c in gt]
    stripped = [str(x).strip() for x in labels]
    wanted = dict(gt)
    pred = {n: stripped.count(n) for n in wanted}
    if comparison:
        ok = _comparison_correct(gt, pred)
        return {"correct_categories": int(ok), "categories": len(wanted),
                "all_correct": bool(ok), "counts": pred}
    right = sum(pred[n] == c for n, c in wanted.items())
    return {"correct_categories": right, "categories": len(wanted),
            "all_correct": right == len(wanted), "counts": pred}


def detection_spatial_score(obj1: str, obj2: str, relation: str, labels: Sequence[str],
                            boxes: Sequence[Sequence[float]]) -> dict[str, bool]:
    """Spatial on one image's detections (labels exactly obj1 / obj2) ->
    ``{"correct", "missing"}``."""
    stripped = [str(x).strip() for x in labels]
    b1 = [b for n, b in zip(stripped, boxes) if n == obj1]
    b2 = [b for n, b in zip(stripped, boxes) if n == obj2]
    return _spatial_from_boxes(relation, b1, b2)


def summarize_detection_counting(rows: Sequence[dict]) -> dict[str, Any]:
    """Per-image :func:`detection_counting_score` rows -> ``{"accuracy"`` (LayoutGPT's GLIP
    counting accuracy: right categories / categories), ``"image_accuracy"`` (images with
    every category right), ``"n"`` (images), ``"categories"}``."""
    cats = sum(r["categories"] for r in rows)
    return {"accuracy": (sum(r["correct_categories"] for r in rows) / cats) if cats else None,
            "image_accuracy": mean_of([{"c": float(r["all_correct"])} for r in rows], "c"),
            "n": len(rows), "categories": cats}


# ----------------------------------------------------------------------------------------------
# Averages.
# ----------------------------------------------------------------------------------------------


def mean_of(rows: Sequence[dict], key: str) -> float | None:
    """Mean of ``row[key]`` over rows where it is not None (None when there are none)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _by_type(rows: Sequence[dict], types: Sequence[str] | None, fn) -> dict[str, Any]:
    if types is None:
        return {}
    if len(types) != len(rows):
        raise ValueError(f"{len(types)} prompt types for {len(rows)} rows")
    out = {}
    for t in dict.fromkeys(types):
        out[t] = fn([r for r, rt in zip(rows, types) if rt == t], None)
    return {"by_type": out}


def summarize_counting(rows: Sequence[dict], types: Sequence[str] | None = None
                       ) -> dict[str, Any]:
    """Per-prediction :func:`counting_score` rows -> means with their sizes: ``n`` (all rows:
    accuracy's n), ``n_counted`` (non-comparison rows: the n of precision / recall / IoU /
    MAE), ``n_comparison``; with ``types`` (one NSR-1K ``type`` per row), the same per type
    under ``"by_type"``."""
    n_cmp = sum(bool(r["comparison"]) for r in rows)
    out = {"precision": mean_of(rows, "precision"), "recall": mean_of(rows, "recall"),
           "iou": mean_of(rows, "iou"), "mae": mean_of(rows, "mae"),
           "accuracy": mean_of(rows, "accuracy"), "n": len(rows),
           "n_counted": len(rows) - n_cmp, "n_comparison": n_cmp}
    out.update(_by_type(rows, types, summarize_counting))
    return out


def summarize_spatial(rows: Sequence[dict], types: Sequence[str] | None = None
                      ) -> dict[str, Any]:
    """Per-prediction :func:`spatial_score` rows -> ``{"accuracy", "missing", "n"}`` (and
    ``"by_type"`` with ``types``, as LayoutGPT prints per template / natural prompts)."""
    out = {"accuracy": mean_of([{"c": float(r["correct"])} for r in rows], "c"),
           "missing": sum(bool(r["missing"]) for r in rows), "n": len(rows)}
    out.update(_by_type(rows, types, summarize_spatial))
    return out


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
                    batch_size: int = 8, fallback_tokenizer: str | None = None
                    ) -> "ClipScorer":
        """A Hugging Face CLIPModel folder. Its tokenizer: ``tokenizer_folder`` when given,
        else the CLIP folder's own tokenizer files, else ``fallback_tokenizer`` (e.g. the
        pipeline's ``tokenizer/``; CLIP ViT-L/14 and SD-1.4 share one tokenizer).

        Raises:
          goal_jax.text.TokenizerError: naming every folder tried.
        """
        from goal_jax import text as text_lib
        from goal_jax import weights

        if tokenizer_folder is not None:
            tokenizer = text_lib.load_tokenizer(tokenizer_folder)
        else:
            try:
                tokenizer = text_lib.load_tokenizer(clip_folder)
            except text_lib.TokenizerError as e:
                if fallback_tokenizer is None:
                    raise text_lib.TokenizerError(
                        f"CLIP folder {clip_folder} has no tokenizer ({e}); give "
                        "--clip_tokenizer (or --pretrained, whose tokenizer/ is used)") from None
                try:
                    tokenizer = text_lib.load_tokenizer(fallback_tokenizer)
                except text_lib.TokenizerError as e2:
                    raise text_lib.TokenizerError(
                        f"no CLIP tokenizer: {clip_folder}: {e}; {fallback_tokenizer}: {e2}; "
                        "give --clip_tokenizer") from None
        model, params = weights.load_clip(clip_folder)
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
