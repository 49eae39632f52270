"""The experiment's data: the GOAL2K-like fine-tuning set and the held-out evaluation layouts.

* :func:`write_finetune_set` renders items of the world's ``finetune`` split
  (``goal_jax.world.data``: its own random stream, disjoint from the world's pretraining data)
  into goal_jax's on-disk format (docs/data_format.md: ``images/*.png`` +
  ``annotations.jsonl``, boxes ``xyxy_normalized``), keeping items in the category mix
  ``arms.FINETUNE_MIX`` (binding-weighted like GOAL2K: colour, shape, texture, spatial,
  multi-object). scripts/train.py reads it with ``--config.data.source``.
* :func:`eval_layouts` picks the first ``n`` items of each T2I-CompBench-like category from
  the world's ``eval`` split (another disjoint stream), with fixed sampling seeds.
* :func:`check_disjoint` fails when an evaluation layout (caption and boxes) also occurs in
  the fine-tuning set, and reports how many evaluation captions the set contains.
"""

from __future__ import annotations

import json
import os

import numpy as np

from goal_jax.data import shapes
from goal_jax.world import data as world_data

MANIFEST = "finetune.json"
# Attribute binding needs two objects: single-object colour / shape / texture items of the
# world's stream are skipped (by both the fine-tuning set and the evaluation layouts).
MIN_OBJECTS = {"color": 2, "shape": 2, "texture": 2}


def category_quotas(n: int, mix: dict) -> dict:
    """Items per category for ``n`` items in proportions ``mix`` (largest remainders; the
    quotas sum to ``n``; every category of ``mix`` with weight > 0 gets at least one)."""
    total = sum(mix.values())
    raw = {c: n * w / total for c, w in mix.items()}
    quota = {c: int(np.floor(v)) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: raw[c] - quota[c], reverse=True)[:n - sum(quota.values())]:
        quota[c] += 1
    for c, w in mix.items():
        if w > 0 and quota[c] == 0:
            donor = max(quota, key=quota.get)
            quota[donor] -= 1
            quota[c] = 1
    return quota


def write_finetune_set(folder: str, n: int, mix: dict, resolution: int, seed: int = 0,
                       log=print) -> dict:
    """Writes (or finds written) the fine-tuning set; returns its manifest.

    Item ``i`` of the world's ``finetune`` stream has category ``i mod 6``
    (``shapes.CATEGORY_CYCLE``); items are taken in stream order while their category's
    quota is open (colour / shape / texture items need two objects, ``MIN_OBJECTS``), so the
    same arguments give the same files. ``<folder>/finetune.json``
    (written last) records the arguments and counts; a folder made with other arguments is
    an error naming the difference.
    """
    want = {"items": int(n), "mix": dict(mix), "resolution": int(resolution),
            "seed": int(seed), "split": "finetune", "min_objects": dict(MIN_OBJECTS)}
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        have = {k: manifest.get(k) for k in want}
        if have != want:
            raise ValueError(f"fine-tuning set {folder} was written with {have}, not {want}: "
                             "delete it or use another --workdir")
        return manifest
    from PIL import Image

    quota = category_quotas(n, mix)
    left = dict(quota)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines, i = [], 0
    while sum(left.values()):
        category = shapes.CATEGORY_CYCLE[i % len(shapes.CATEGORY_CYCLE)]
        if left.get(category, 0) > 0:
            pixels, record = world_data.render_one("finetune", i, seed, resolution)
            if len(record["objects"]) < MIN_OBJECTS.get(category, 1):
                i += 1
                continue
            rel = f"images/{record['id']}.png"
            Image.fromarray(pixels).save(os.path.join(folder, rel))
            lines.append({"id": record["id"], "image": rel, "caption": record["caption"],
                          "box_format": "xyxy_normalized",
                          "annotations": [{"phrase": o["phrase"], "box": o["box"]}
                                          for o in record["objects"]],
                          "category": record["category"], "source": "shapes_world:finetune"})
            left[category] -= 1
            if len(lines) % 500 == 0:
                log(f"fine-tuning set: {len(lines)}/{n} items")
        i += 1
    with open(os.path.join(folder, "annotations.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    manifest = dict(want, quotas=quota, stream_items_read=i,
                    objects=sum(len(x["annotations"]) for x in lines))
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    log(f"fine-tuning set: wrote {n} items to {folder} ({quota})")
    return manifest


def read_finetune_items(folder: str) -> list[dict]:
    with open(os.path.join(folder, "annotations.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_layouts(per_category: int, resolution: int, seed: int = 0,
                 categories=tuple(shapes.CATEGORY_CYCLE)) -> list[dict]:
    """The first ``per_category`` items of each category of the world's ``eval`` split (with
    at least ``MIN_OBJECTS`` objects: two for the attribute-binding categories) as
    sampling items {"id", "caption", "phrases", "boxes" (xyxy in [0, 1]), "category",
    "seed" (the sampling seed: the item's stream index), "objects"}, grouped by category in
    ``categories`` order."""
    out = []
    for category in categories:
        i, m = shapes.CATEGORY_CYCLE.index(category), 0
        while m < per_category:
            _, r = world_data.render_one("eval", i, seed, resolution)
            if len(r["objects"]) >= MIN_OBJECTS.get(category, 1):
                out.append({"id": f"eval-{category}-{m:03d}", "caption": r["caption"],
                            "category": category, "seed": i,
                            "phrases": [o["phrase"] for o in r["objects"]],
                            "boxes": [o["box"] for o in r["objects"]], "objects": r["objects"],
                            "stream_index": i})
                m += 1
            i += len(shapes.CATEGORY_CYCLE)  # item i has category CATEGORY_CYCLE[i % 6]
    return out


def eval_truth_images(items: list[dict], resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, R, R, 3]: the world's own renders of the evaluation layouts (the ceiling)."""
    return np.stack([world_data.render_one("eval", it["stream_index"], seed, resolution)[0]
                     for it in items])


def _layout_key(caption: str, boxes) -> tuple:
    return (caption, tuple(tuple(round(float(v), 4) for v in b) for b in boxes))


def check_disjoint(finetune_items: list[dict], eval_items: list[dict]) -> dict:
    """Raises ValueError naming the items when an evaluation layout (caption and boxes)
    occurs in the fine-tuning set; returns {"eval_layouts", "finetune_items",
    "shared_layouts": 0, "eval_captions_in_finetune": how many evaluation captions occur
    (with other boxes) in the fine-tuning set}."""
    ft_keys = {_layout_key(x["caption"], [a["box"] for a in x["annotations"]]): x["id"]
               for x in finetune_items}
    ft_captions = {x["caption"] for x in finetune_items}
    shared = [(it["id"], ft_keys[k]) for it in eval_items
              if (k := _layout_key(it["caption"], it["boxes"])) in ft_keys]
    if shared:
        raise ValueError(f"evaluation layouts occur in the fine-tuning set: {shared[:10]}")
    return {"eval_layouts": len(eval_items), "finetune_items": len(finetune_items),
            "shared_layouts": 0,
            "eval_captions_in_finetune": sum(it["caption"] in ft_captions for it in eval_items)}
