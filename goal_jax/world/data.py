"""The world's data: shapes-dataset items rendered once into memory-mapped arrays.

A split lives in one folder::

    <folder>/images.npy    uint8 [N, R, R, 3], written and read memory-mapped (never loaded whole)
    <folder>/items.jsonl   one JSON object per item, in order: {"id", "category", "caption",
                           "objects": [{"phrase", "shape", "color", "texture",
                                        "box": [x0, y0, x1, y1] in [0, 1]}]}
    <folder>/split.json    {"split", "num_items", "seed", "resolution", "done"}: what was asked
                           and how many items are written (rendering resumes from there)

Item ``i`` of split ``s`` is drawn by ``goal_jax.data.shapes.render_item_objects`` from numpy's
generator seeded ``[seed, SPLIT_IDS[s], i]``, so every item can be re-rendered alone, the splits
are disjoint random streams, and the same arguments give byte-identical arrays. Categories cycle
through ``shapes.CATEGORY_CYCLE`` (item i has category i mod 6).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from goal_jax.data import shapes

# Disjoint random streams: "train" (the world's pretraining), "heldout" (the recipe's evaluation),
# "test" (the demo's fixed layouts), "finetune" (GOAL2K-like fine-tuning sets), "eval"
# (experiment evaluation layouts).
SPLIT_IDS = {"train": 0, "heldout": 1, "test": 2, "finetune": 3, "eval": 4}
_CHUNK = 512


def render_one(split: str, index: int, seed: int, resolution: int):
    """-> (uint8 [R, R, 3] image, record dict) of item ``index`` of ``split``."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown world split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    category = shapes.CATEGORY_CYCLE[index % len(shapes.CATEGORY_CYCLE)]
    pixels, caption, objects = shapes.render_item_objects(rng, category, resolution)
    for o in objects:
        o["box"] = [round(v / resolution, 6) for v in o["box"]]
    return pixels, {"id": f"world-{split}-{index:06d}", "category": category,
                    "caption": caption, "objects": objects}


def _read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, "split.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_meta(folder: str, meta: dict) -> None:
    tmp = os.path.join(folder, "split.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "split.json"))


def render_split(folder: str, split: str, num_items: int, seed: int = 0,
                 resolution: int = 64, log=print) -> str:
    """Renders (or finishes rendering) ``num_items`` items of ``split`` into ``folder``.

    Resumable: items are written in chunks of 512 and ``split.json`` records how many are done;
    an existing folder made with other arguments is an error (delete it or pick another folder).
    Returns ``folder``.
    """
    if num_items < 1:
        raise ValueError(f"world split {split!r}: num_items must be >= 1, got {num_items}")
    os.makedirs(folder, exist_ok=True)
    want = {"split": split, "num_items": int(num_items), "seed": int(seed),
            "resolution": int(resolution)}
    meta = _read_meta(folder)
    images_path = os.path.join(folder, "images.npy")
    items_path = os.path.join(folder, "items.jsonl")
    if meta is not None and {k: meta.get(k) for k in want} != want:
        raise ValueError(f"world data folder {folder} was rendered with "
                         f"{ {k: meta.get(k) for k in want} }, not {want}: delete it or choose "
                         "another workdir")
    if meta is not None and meta["done"] == num_items:
        return folder
    shape = (num_items, resolution, resolution, 3)
    if meta is None or not os.path.isfile(images_path):
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
        done = 0
        open(items_path, "w").close()
    else:
        images = np.load(images_path, mmap_mode="r+")
        done = int(meta["done"])
        _truncate_lines(items_path, done)
    start = time.time()
    with open(items_path, "a", encoding="utf-8") as f:
        while done < num_items:
            end = min(done + _CHUNK, num_items)
            lines = []
            for i in range(done, end):
                pixels, record = render_one(split, i, seed, resolution)
                images[i] = pixels
                lines.append(json.dumps(record, sort_keys=True))
            images.flush()
            f.write("\n".join(lines) + "\n")
            f.flush()
            done = end
            _write_meta(folder, dict(want, done=done))
            rate = (done - int(meta["done"] if meta else 0)) / max(time.time() - start, 1e-9)
            log(f"world data {split}: {done}/{num_items} items rendered "
                f"({rate:.0f}/s, ETA {(num_items - done) / max(rate, 1e-9):.0f} s)")
    return folder


def _truncate_lines(path: str, n: int) -> None:
    """Keeps the first ``n`` lines of ``path`` (a chunk cut off by an interruption)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < n:
        raise ValueError(f"{path} has {len(lines)} items but split.json says {n} are done")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines[:n]))


class WorldSplit:
    """A rendered split: ``images`` (memory-mapped uint8 [N, R, R, 3]) and ``records``."""

    def __init__(self, folder: str):
        meta = _read_meta(folder)
        if meta is None:
            raise FileNotFoundError(f"no rendered world split in {folder} (split.json missing)")
        if meta["done"] != meta["num_items"]:
            raise ValueError(f"world split in {folder} is incomplete: {meta['done']} of "
                             f"{meta['num_items']} items rendered; rerun the recipe to finish it")
        self.folder = folder
        self.meta = meta
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        with open(os.path.join(folder, "items.jsonl"), encoding="utf-8") as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        if len(self.records) != len(self.images):
            raise ValueError(f"world split in {folder}: {len(self.records)} records for "
                             f"{len(self.images)} images")

    def __len__(self) -> int:
        return len(self.records)

    def images_float(self, indices: Sequence[int]) -> np.ndarray:
        """float32 [B, R, R, 3] in [-1, 1] of the items at ``indices``."""
        idx = np.sort(np.asarray(indices))
        order = np.argsort(np.argsort(np.asarray(indices)))
        x = self.images[idx][order].astype(np.float32)
        return x / 127.5 - 1.0


def grounding_arrays(records: Sequence[dict], max_boxes: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(boxes float32 [B, N, 4] xyxy in [0, 1], masks float32 [B, N], phrases [B][N] str with
    '' for padded slots) of ``records``; an item with more than ``max_boxes`` objects is an
    error naming it."""
    b = len(records)
    boxes = np.zeros((b, max_boxes, 4), np.float32)
    masks = np.zeros((b, max_boxes), np.float32)
    phrases = [[""] * max_boxes for _ in range(b)]
    for i, r in enumerate(records):
        objs = r["objects"]
        if len(objs) > max_boxes:
            raise ValueError(f"world item {r['id']} has {len(objs)} objects, more than the "
                             f"{max_boxes} grounding slots")
        for j, o in enumerate(objs):
            boxes[i, j] = o["box"]
            masks[i, j] = 1.0
            phrases[i][j] = o["phrase"]
    return boxes, masks, phrases


def progress(stage: str, step: int, total: int, start_time: float, start_step: int,
             metrics: dict, stream=sys.stdout) -> None:
    """One progress line: stage, step/total, metrics, steps/s and ETA."""
    rate = (step - start_step) / max(time.time() - start_time, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"[{stage}] step {step}/{total} {text} ({rate:.2f} steps/s, ETA {eta / 60:.1f} min)",
          file=stream, flush=True)
