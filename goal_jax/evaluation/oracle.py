"""The shapes-world oracle: what is really drawn in each box, from pixels alone (no CLIP).

For every layout box of a 64x64 shapes-world image the oracle reads

* ``present``: is an object there (a small CNN, :mod:`oracle_model`, on the box crop);
* ``color`` (a name of ``shapes.COLORS``), ``shape`` (``shapes.SHAPES``), ``texture``
  (``shapes.TEXTURES``): the CNN's heads; the colour either from the CNN or from a palette
  vote of the object's foreground pixels (whichever was more accurate on held-out renders
  when the oracle was trained: ``oracle.json`` -> ``color_method``);
* ``iou``: the IoU of the detected object's extent (the tight bounds of the foreground --
  pixels unlike the estimated background -- connected to the box, searched in the box widened
  by ``SEARCH_MARGIN``) with the box; its centre is used for spatial relations.

It compares them with what each phrase names (:func:`parse_phrase`: colour, texture, shape,
singular or plural, from the shapes vocabulary) and gives, per image, a verdict for the
item's T2I-CompBench-style category (inferred from the caption, :func:`parse_caption`):

* ``color`` / ``shape`` / ``texture`` (attribute binding) and ``complex``: every box holds an
  object with every attribute its phrase names;
* ``spatial``: both objects right and the relation holds between the detected centres
  (``left``: centre x of the first < centre x of the second; ``above``: centre y smaller);
* ``counting``: the number of boxes holding the named object (present, shape and colour
  right) equals the caption's number.

Unnamed attributes are not checked ("a star" may be any colour; "a red circle" any texture).

Besides the all-or-nothing verdict, each item gets a graded ``score`` in [0, 1] (the analogue of
T2I-CompBench's per-image scores, which average over the nouns instead of requiring all of
them; with a weak model the verdict is 0 almost everywhere and cannot tell two models apart):

* ``color`` / ``shape`` / ``texture``: the fraction of boxes whose object is present with the
  category's attribute as named (boxes whose phrase does not name it are left out);
* ``complex``: the fraction of boxes that are ``correct`` (present, every named attribute right);
* ``spatial``: the mean of (first object correct, second object correct, relation holds);
* ``counting``: ``max(0, 1 - |count - expected| / expected)``.

Python API (the shipped weights are ``assets/shapes_world/oracle``)::

    oracle = Oracle.load()                          # or Oracle.load(folder)
    readings = oracle.read_boxes(image, boxes)      # uint8 [H,W,3], boxes [K,4] in [0,1]
    result = oracle.score_item(image, caption, phrases, boxes, name="item 3")
    results = oracle.score_items(images, items)     # items: [{caption, phrases, boxes, id?}]
    results = score_folder("samples/", oracle)      # a folder written by scripts/sample.py
    write_results("out/", results)                  # results.json + results.md

Commands::

    python -m goal_jax.evaluation.oracle train --out assets/shapes_world/oracle
    python -m goal_jax.evaluation.oracle score samples/ --output_dir eval/oracle
    python -m goal_jax.evaluation.oracle layouts --out heldout.jsonl --n 36  # to sample from
    python -m goal_jax.evaluation.oracle validate --out assets/shapes_world/oracle \\
        --floor samples_random/            # ceiling (held-out renders) + floor, into oracle.json

(``scripts/evaluate.py oracle`` is the scoring command too.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from goal_jax.data import shapes
from goal_jax.evaluation import oracle_model

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "assets", "shapes_world", "oracle")
CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "complex")
SEARCH_MARGIN = 0.25   # the object's extent is searched in the box widened by this (each side)
BG_THRESHOLD = 24.0    # min RGB distance (0..255) from the background for a foreground pixel
PRESENT_THRESHOLD = 0.5


class OracleError(ValueError):
    """A caption / phrase / folder the oracle cannot read; the message names the item."""


# ----------------------------------------------------------------------------------------------
# Phrases and captions.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhraseSpec:
    """What a phrase names: ``shape`` (always), ``color`` / ``texture`` (None: not named),
    ``plural`` ("yellow stars")."""

    shape: str
    color: str | None = None
    texture: str | None = None
    plural: bool = False


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """A caption's category (one of CATEGORIES), its relation (a key of shapes.RELATIONS, for
    spatial: between box ``pair[0]`` and box ``pair[1]``) and its count (for counting)."""

    category: str
    relation: str | None = None
    pair: tuple[int, int] | None = None
    count: int | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _lexicon() -> list[tuple[tuple[str, ...], str, str, bool]]:
    """(word sequence, kind, value, plural) for every colour, texture and shape (singular and
    plural), longest first so multi-word names win."""
    entries = [(tuple(c.split()), "color", c, False) for c in shapes.COLORS]
    entries += [(tuple(t.split()), "texture", t, False) for t in shapes.TEXTURES]
    for s in shapes.SHAPES:
        entries.append((tuple(s.split()), "shape", s, False))
        entries.append((tuple(shapes._plural(s).split()), "shape", s, True))
    return sorted(entries, key=lambda e: -len(e[0]))


def parse_phrase(phrase: str, name: str = "phrase") -> PhraseSpec:
    """``"a red striped circle"`` / ``"yellow stars"`` / ``"an octagon"`` -> PhraseSpec.

    Words: an optional article (a / an), then colour, texture and shape names of the shapes
    vocabulary in any order, exactly one shape (singular or plural).

    Raises:
      OracleError: naming ``name`` and the phrase: a word outside the vocabulary, no shape,
        or two values of one attribute.
    """
    words = _words(phrase)
    if words and words[0] in ("a", "an"):
        words = words[1:]
    found: dict[str, tuple[str, bool]] = {}
    lexicon = _lexicon()
    i = 0
    while i < len(words):
        for seq, kind, value, plural in lexicon:
            if tuple(words[i:i + len(seq)]) == seq:
                if kind in found:
                    raise OracleError(f"{name}: phrase {phrase!r} names two {kind}s "
                                      f"({found[kind][0]!r} and {value!r})")
                found[kind] = (value, plural)
                i += len(seq)
                break
        else:
            raise OracleError(
                f"{name}: phrase {phrase!r} has the word {words[i]!r}, which is not in the shapes "
                f"vocabulary (colours {list(shapes.COLORS)}, textures {list(shapes.TEXTURES)}, "
                f"shapes {list(shapes.SHAPES)} and their plurals)")
    if "shape" not in found:
        raise OracleError(f"{name}: phrase {phrase!r} names no shape (one of {list(shapes.SHAPES)} "
                          "or a plural)")
    return PhraseSpec(shape=found["shape"][0], color=found.get("color", (None,))[0],
                      texture=found.get("texture", (None,))[0], plural=found["shape"][1])


def parse_caption(caption: str, phrases: Sequence[str], name: str = "item",
                  category: str | None = None) -> CaptionSpec:
    """The category (and relation / count) of a shapes-world caption.

    Inferred from the caption templates of :mod:`goal_jax.data.shapes` unless ``category``
    is given: a leading number word -> counting; a relation of ``shapes.RELATIONS`` ->
    spatial (its two sides must be phrases of the layout); 3+ phrases -> complex; a phrase
    without a colour -> shape; a texture word -> texture; else color.

    Raises:
      OracleError: naming ``name``: an unknown category, a spatial caption whose sides are
        not layout phrases, a counting caption whose number is not a number word.
    """
    if category is not None and category not in CATEGORIES:
        raise OracleError(f"{name}: unknown category {category!r}; choose from {CATEGORIES}")
    words = _words(caption)
    numbers = {v: k for k, v in shapes.NUMBERS.items()}
    specs = [parse_phrase(p, f"{name} phrase {i}") for i, p in enumerate(phrases)]
    if category in (None, "counting") and words and words[0] in numbers:
        return CaptionSpec("counting", count=numbers[words[0]])
    if category == "counting":
        raise OracleError(f"{name}: counting caption {caption!r} does not start with a number "
                          f"word ({sorted(numbers, key=numbers.get)})")
    text = " ".join(words)
    for relation, rel_words in sorted(shapes.RELATIONS.items(), key=lambda kv: -len(kv[1])):
        key = f" {rel_words} "
        if category not in (None, "spatial") or key not in f" {text} ":
            continue
        left, right = (f" {text} ").split(key, 1)
        pair = []
        for side in (left.strip(), right.strip()):
            idx = [i for i, p in enumerate(phrases) if " ".join(_words(p)) == side]
            if not idx:
                raise OracleError(f"{name}: spatial caption {caption!r}: {side!r} is not one of "
                                  f"the layout phrases {list(phrases)}")
            pair.append(next((i for i in idx if i not in pair), idx[0]))
        return CaptionSpec("spatial", relation=relation, pair=(pair[0], pair[1]))
    if category == "spatial":
        raise OracleError(f"{name}: spatial caption {caption!r} has none of the relations "
                          f"{list(shapes.RELATIONS.values())}")
    if category is not None:
        return CaptionSpec(category)
    if len(phrases) >= 3:
        return CaptionSpec("complex")
    if any(s.color is None for s in specs):
        return CaptionSpec("shape")
    if any(s.texture is not None for s in specs):
        return CaptionSpec("texture")
    return CaptionSpec("color")


# ----------------------------------------------------------------------------------------------
# Pixels: background, foreground extent, palette vote.
# ----------------------------------------------------------------------------------------------


def _palette() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb [2C, 3], colour index [2C], vote weight [2C]): each colour and the light tint the
    shapes renderer uses for texture marks (35 % colour + 65 % white; grey for white)."""
    names = list(shapes.COLORS)
    base = np.array([shapes.COLORS[n] for n in names], np.float32)
    light = base * 0.35 + 255 * 0.65
    if "white" in names:
        light[names.index("white")] = 150.0
    return (np.concatenate([base, light]), np.concatenate([np.arange(len(names))] * 2),
            np.concatenate([np.ones(len(names)), np.full(len(names), 0.5)]).astype(np.float32))


def to_work_image(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W, 4] / [H, W]) -> float32 [64, 64, 3] 0..255 (box-resampled
    when the size differs: the oracle reads images at the world's resolution)."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise OracleError(f"image must be [H, W, 3] RGB, got shape {img.shape}")
    img = img[..., :3]
    res = oracle_model.WORK_RESOLUTION
    if img.shape[:2] != (res, res):
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((res, res),
                                                                      Image.Resampling.BOX))
    return img.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Extent:
    """The foreground found for a box: ``box`` (xyxy pixels, None when nothing differs from
    the background), ``iou`` with the layout box, palette vote ``color`` (None without
    foreground pixels) and its vote share."""

    box: tuple[float, float, float, float] | None
    iou: float
    color: str | None
    color_share: float


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def find_extents(img: np.ndarray, boxes_px: np.ndarray) -> list[Extent]:
    """Foreground extents and palette votes of all boxes of one image.

    Args:
      img: float32 [64, 64, 3], 0..255.
      boxes_px: [K, 4] xyxy in pixels.

    The background colour is the median of the (3x3 median-filtered) pixels outside every box
    (the image border when boxes cover most of it); a pixel is foreground when its RGB
    distance to it exceeds max(BG_THRESHOLD, 2.5 x the median distance of background pixels
    + 12). In the box widened by SEARCH_MARGIN, the 8-connected foreground components lying
    mostly (>= 50 %) inside the box and at least 10 % the size of the largest one form the
    object; its tight bounds are the extent.
    """
    h, w = img.shape[:2]
    smooth = ndimage.median_filter(img, size=(3, 3, 1), mode="nearest")
    outside = np.ones((h, w), bool)
    for x0, y0, x1, y1 in boxes_px:
        outside[max(0, int(np.floor(y0)) - 1):int(np.ceil(y1)) + 1,
                max(0, int(np.floor(x0)) - 1):int(np.ceil(x1)) + 1] = False
    if outside.sum() < 0.05 * h * w:
        outside = np.zeros((h, w), bool)
        outside[:2], outside[-2:], outside[:, :2], outside[:, -2:] = True, True, True, True
    bg = np.median(smooth[outside], axis=0)
    dist = np.linalg.norm(smooth - bg, axis=-1)
    threshold = max(BG_THRESHOLD, 2.5 * float(np.median(dist[outside])) + 12.0)
    fg = dist > threshold
    # Hysteresis: the median filter shaves thin parts (star tips); raw pixels next to the
    # foreground that differ from the background by 1.2x the threshold rejoin it.
    raw = np.linalg.norm(img - bg, axis=-1) > 1.2 * threshold
    fg |= ndimage.binary_dilation(fg, np.ones((3, 3))) & raw
    palette, palette_index, palette_weight = _palette()
    names = list(shapes.COLORS)
    out = []
    masks = []
    for x0, y0, x1, y1 in boxes_px:
        m = np.zeros((h, w), bool)
        m[max(0, int(np.floor(y0))):int(np.ceil(y1)), max(0, int(np.floor(x0))):int(np.ceil(x1))] = True
        masks.append(m)
    for k, box in enumerate(boxes_px):
        x0, y0, x1, y1 = (float(v) for v in box)
        mw, mh = SEARCH_MARGIN * (x1 - x0), SEARCH_MARGIN * (y1 - y0)
        sx0, sy0 = max(0, int(np.floor(x0 - mw))), max(0, int(np.floor(y0 - mh)))
        sx1, sy1 = min(w, int(np.ceil(x1 + mw))), min(h, int(np.ceil(y1 + mh)))
        # Pixels inside another box (and not this one) belong to that box's object.
        others = np.zeros((h, w), bool)
        for j, m in enumerate(masks):
            if j != k:
                others |= m
        region = (fg & ~(others & ~masks[k]))[sy0:sy1, sx0:sx1]
        inside = masks[k][sy0:sy1, sx0:sx1]
        labels, n = ndimage.label(region, structure=np.ones((3, 3)))
        keep = np.zeros_like(region)
        if n:
            idx = np.arange(1, n + 1)
            area = ndimage.sum(np.ones_like(region, np.float32), labels, idx)
            area_in = ndimage.sum(inside.astype(np.float32), labels, idx)
            ok = area_in >= 0.5 * area
            if ok.any():
                ok &= area >= max(2.0, 0.1 * area[ok].max())
                keep = np.isin(labels, idx[ok])
        if not keep.any():
            out.append(Extent(None, 0.0, None, 0.0))
            continue
        ys, xs = np.nonzero(keep)
        ext = (float(xs.min() + sx0), float(ys.min() + sy0), float(xs.max() + 1 + sx0),
               float(ys.max() + 1 + sy0))
        # Palette vote of the object's pixels inside the box; the eroded mask drops the
        # antialiased rim (mixed with the background) when enough pixels remain.
        obj = keep & inside
        core = ndimage.binary_erosion(obj)
        pix = img[sy0:sy1, sx0:sx1][core if core.sum() >= 6 else obj]
        if len(pix) == 0:
            out.append(Extent(ext, _iou(ext, box), None, 0.0))
            continue
        nearest = np.argmin(((pix[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        votes = np.bincount(palette_index[nearest], weights=palette_weight[nearest],
                            minlength=len(names))
        best = int(np.argmax(votes))
        out.append(Extent(ext, _iou(ext, box), names[best], float(votes[best] / votes.sum())))
    return out


# ----------------------------------------------------------------------------------------------
# The oracle.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoxReading:
    """What the oracle reads in one box (see the module docstring). ``detected_box`` and
    ``center`` are in [0, 1] image units (None without foreground); probabilities are the
    CNN's softmax of the chosen class."""

    present: bool
    present_prob: float
    color: str
    color_cnn: str
    color_vote: str | None
    shape: str
    shape_prob: float
    texture: str
    texture_prob: float
    iou: float
    detected_box: tuple[float, float, float, float] | None
    center: tuple[float, float] | None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("present_prob", "shape_prob", "texture_prob", "iou"):
            d[k] = round(d[k], 4)
        for k in ("detected_box", "center"):
            if d[k] is not None:
                d[k] = [round(v, 4) for v in d[k]]
        return d


def _check_boxes(boxes, name: str) -> np.ndarray:
    """Relative xyxy boxes -> float64 [K, 4]; OracleError naming ``name`` and the box if not
    [K, 4], outside [0, 1] or empty (x0 >= x1 or y0 >= y1)."""
    arr = np.asarray(boxes, np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise OracleError(f"{name}: boxes must be [K, 4] (x0, y0, x1, y1 in [0, 1]), got shape "
                          f"{arr.shape}")
    for k, (x0, y0, x1, y1) in enumerate(arr):
        if not (np.isfinite(arr[k]).all() and (0 <= arr[k]).all() and (arr[k] <= 1).all()):
            raise OracleError(f"{name}: box {k} {arr[k].tolist()} is outside [0, 1] (boxes are "
                              "fractions of the image width / height)")
        if x0 >= x1 or y0 >= y1:
            raise OracleError(f"{name}: box {k} {arr[k].tolist()} has x0 >= x1 or y0 >= y1")
    return arr


class Oracle:
    """The trained oracle: ``Oracle.load(folder)``; see the module docstring for the API."""

    def __init__(self, model, params, config: dict, folder: str | None = None):
        import jax

        self.model, self.params, self.config, self.folder = model, params, config, folder
        self.color_method = config.get("color_method", "cnn")
        if self.color_method not in ("cnn", "vote"):
            raise ValueError(f"oracle config: color_method must be 'cnn' or 'vote', got "
                             f"{self.color_method!r}")
        self._apply = jax.jit(lambda p, x: {k: jax.nn.softmax(v, -1)
                                            for k, v in model.apply({"params": p}, x).items()})

    @classmethod
    def load(cls, folder: str | None = None) -> "Oracle":
        folder = DEFAULT_DIR if folder is None else folder
        model, params, config = oracle_model.load(folder)
        return cls(model, params, config, folder)

    def probabilities(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """float32 crops [N, S, S, 3] -> softmax probabilities per head (numpy [N, classes]);
        batches are padded to a multiple of 64 (few compiled shapes)."""
        n = len(crops)
        if n == 0:
            return {k: np.zeros((0, v), np.float32) for k, v in oracle_model.head_sizes().items()}
        pad = -(-n // 64) * 64
        x = np.zeros((pad,) + crops.shape[1:], np.float32)
        x[:n] = crops
        return {k: np.asarray(v)[:n] for k, v in self._apply(self.params, x).items()}

    def read_boxes(self, image: np.ndarray, boxes) -> list[BoxReading]:
        """One image (uint8 [H, W, 3]) and its boxes ([K, 4], xyxy in [0, 1]) -> K readings."""
        return self.read_batch([image], [boxes])[0]

    def read_batch(self, images: Sequence[np.ndarray], boxes: Sequence,
                   names: Sequence[str] | None = None) -> list[list[BoxReading]]:
        """Images and their boxes (relative xyxy) -> readings per image (one CNN call).

        Raises:
          OracleError: naming the image (``names[i]``, else ``image i``) and the box: not
            [K, 4], a coordinate outside [0, 1], or x0 >= x1 / y0 >= y1.
        """
        if len(images) != len(boxes):
            raise OracleError(f"{len(images)} images but {len(boxes)} box lists")
        res = oracle_model.WORK_RESOLUTION
        works, pixel_boxes, crops = [], [], []
        for i, (image, bxs) in enumerate(zip(images, boxes)):
            name = names[i] if names is not None else f"image {i}"
            work = to_work_image(image)
            bp = _check_boxes(bxs, name) * res
            works.append(work)
            pixel_boxes.append(bp)
            crops.append(oracle_model.crops_for_boxes(work, bp))
        all_crops = np.concatenate(crops) if crops else np.zeros((0,) + (oracle_model.CROP_SIZE,) * 2 + (3,))
        probs = self.probabilities(all_crops.astype(np.float32))
        colors, shape_names, textures = list(shapes.COLORS), shapes.SHAPES, shapes.TEXTURES
        out, k = [], 0
        for work, bp in zip(works, pixel_boxes):
            readings = []
            for ext in find_extents(work, bp):
                p = {name: v[k] for name, v in probs.items()}
                k += 1
                color_cnn = colors[int(np.argmax(p["color"]))]
                color = color_cnn
                if self.color_method == "vote" and ext.color is not None:
                    color = ext.color
                s, t = int(np.argmax(p["shape"])), int(np.argmax(p["texture"]))
                det = center = None
                if ext.box is not None:
                    det = tuple(float(v) / res for v in ext.box)
                    center = ((det[0] + det[2]) / 2, (det[1] + det[3]) / 2)
                readings.append(BoxReading(
                    present=bool(p["present"][1] >= PRESENT_THRESHOLD),
                    present_prob=float(p["present"][1]), color=color, color_cnn=color_cnn,
                    color_vote=ext.color, shape=shape_names[s], shape_prob=float(p["shape"][s]),
                    texture=textures[t], texture_prob=float(p["texture"][t]), iou=ext.iou,
                    detected_box=det, center=center))
            out.append(readings)
        return out

    def score_item(self, image: np.ndarray, caption: str, phrases: Sequence[str], boxes,
                   name: str = "item", category: str | None = None) -> dict:
        """One image with its caption and layout -> the item's result (see :func:`judge`)."""
        return self.score_items([image], [dict(caption=caption, phrases=list(phrases),
                                               boxes=boxes, id=name, category=category)])[0]

    def score_items(self, images: Sequence[np.ndarray], items: Sequence[dict]) -> list[dict]:
        """Images and items ``{caption, phrases, boxes (relative xyxy), id?, category?}`` ->
        results (see :func:`judge`). Captions and phrases are parsed before any image is read
        (OracleError naming the item)."""
        if len(images) != len(items):
            raise OracleError(f"{len(images)} images but {len(items)} items")
        specs = []
        for i, it in enumerate(items):
            name = str(it.get("id") or f"item {i}")
            if len(it["phrases"]) != len(it["boxes"]):
                raise OracleError(f"{name}: {len(it['phrases'])} phrases but {len(it['boxes'])} boxes")
            specs.append((name, parse_caption(it["caption"], it["phrases"], name, it.get("category")),
                          [parse_phrase(p, f"{name} phrase {j}") for j, p in enumerate(it["phrases"])]))
        readings = self.read_batch(images, [it["boxes"] for it in items], [n for n, _, _ in specs])
        return [judge(name, it, cap, phr, r)
                for (name, cap, phr), it, r in zip(specs, items, readings)]


def _check(expected: str | None, got: str) -> bool | None:
    return None if expected is None else expected == got


def judge(name: str, item: dict, caption: CaptionSpec, phrases: Sequence[PhraseSpec],
          readings: Sequence[BoxReading]) -> dict:
    """Readings vs what the caption and phrases name -> the item's result dict.

    Keys: ``id``, ``caption``, ``category``, ``verdict`` (bool, the category's check),
    ``boxes`` (per box: the phrase, what it names, the reading, ``color_ok`` / ``shape_ok`` /
    ``texture_ok`` (None when the phrase does not name it) and ``correct``), ``relation``,
    ``relation_ok`` (spatial), ``count`` / ``expected_count`` (counting).
    """
    boxes = []
    for phrase, spec, r in zip(item["phrases"], phrases, readings):
        ok = {"color_ok": _check(spec.color, r.color), "shape_ok": r.shape == spec.shape,
              "texture_ok": _check(spec.texture, r.texture)}
        correct = r.present and all(v is not False for v in ok.values())
        boxes.append(dict(phrase=phrase, expected=dataclasses.asdict(spec), reading=r.to_dict(),
                          **ok, correct=bool(correct)))
    result: dict[str, Any] = {"id": name, "caption": item["caption"],
                              "category": caption.category, "boxes": boxes}
    all_correct = bool(boxes) and all(b["correct"] for b in boxes)
    if caption.category == "spatial":
        a, b = caption.pair
        ca, cb = readings[a].center, readings[b].center
        rel_ok = False
        if ca is not None and cb is not None and readings[a].present and readings[b].present:
            rel_ok = {"left": ca[0] < cb[0], "right": ca[0] > cb[0],
                      "above": ca[1] < cb[1], "below": ca[1] > cb[1]}[caption.relation]
        result.update(relation=caption.relation, relation_ok=bool(rel_ok),
                      boxes_pair_ok=[bool(boxes[a]["correct"]), bool(boxes[b]["correct"])],
                      verdict=bool(boxes[a]["correct"] and boxes[b]["correct"] and rel_ok))
    elif caption.category == "counting":
        count = sum(1 for b, r in zip(boxes, readings)
                    if r.present and b["shape_ok"] and b["color_ok"] is not False)
        result.update(count=count, expected_count=caption.count,
                      verdict=count == caption.count)
    else:
        result["verdict"] = all_correct
    result["score"] = graded_score(result)
    return result


_CATEGORY_ATTRIBUTE = {"color": "color_ok", "shape": "shape_ok", "texture": "texture_ok"}


def graded_score(result: dict) -> float:
    """The item's graded score in [0, 1] (module docstring) from :func:`judge`'s result."""
    boxes, cat = result["boxes"], result["category"]
    if cat == "spatial":
        first_ok, second_ok = result["boxes_pair_ok"]
        return float(np.mean([first_ok, second_ok, result["relation_ok"]]))
    if cat == "counting":
        expected = result["expected_count"]
        return float(max(0.0, 1.0 - abs(result["count"] - expected) / expected))
    key = _CATEGORY_ATTRIBUTE.get(cat)
    if key is None:  # complex (and anything without a single attribute)
        checks = [b["correct"] for b in boxes]
    else:
        checks = [b["reading"]["present"] and b[key] for b in boxes if b[key] is not None]
        if not checks:  # the category's attribute is named nowhere: every box must be right
            checks = [b["correct"] for b in boxes]
    return float(np.mean(checks)) if checks else 0.0


# ----------------------------------------------------------------------------------------------
# Summaries, folders, results files.
# ----------------------------------------------------------------------------------------------


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def summarize(results: Sequence[dict]) -> dict:
    """Per-box means over all items (:func:`box_summary`) and per category: the verdict mean
    (plus relation_ok for spatial) and the box means of its items."""
    cats = {}
    for cat in CATEGORIES:
        rs = [r for r in results if r["category"] == cat]
        if not rs:
            continue
        cats[cat] = {"n": len(rs), "verdict": _mean(r["verdict"] for r in rs),
                     "score": _mean(r["score"] for r in rs)}
        if cat == "spatial":
            cats[cat]["relation_ok"] = _mean(r["relation_ok"] for r in rs)
        cats[cat]["boxes"] = box_summary(rs)
    return {"items": len(results), "verdict": _mean(r["verdict"] for r in results),
            "score": _mean(r["score"] for r in results),
            "boxes": box_summary(results), "categories": cats}


def box_summary(results: Sequence[dict]) -> dict:
    """Means over the boxes of ``results``: present, color_in_box (present and the named
    colour right, over boxes whose phrase names a colour), color / shape / texture (accuracy
    over the boxes where an object was found and the phrase names it; None when none),
    correct (present and every named attribute right), iou (mean
    IoU of the detected object with the box; 0 where nothing was detected)."""
    boxes = [b for r in results for b in r["boxes"]]
    found = [b for b in boxes if b["reading"]["present"]]
    return {
        "n": len(boxes),
        "present": _mean(b["reading"]["present"] for b in boxes),
        "color_in_box": _mean(b["reading"]["present"] and b["color_ok"] for b in boxes
                              if b["color_ok"] is not None),
        "color": _mean(b["color_ok"] for b in found),
        "shape": _mean(b["shape_ok"] for b in found),
        "texture": _mean(b["texture_ok"] for b in found),
        "correct": _mean(b["correct"] for b in boxes),
        "iou": _mean(b["reading"]["iou"] for b in boxes),
    }


def read_folder(folder: str) -> tuple[list[np.ndarray], list[dict], list[str]]:
    """A folder written by scripts/sample.py -> (images, items, skipped). Items are its
    ``<id>.json`` metadata files (those with ``caption``, ``phrases``, ``boxes`` and
    ``image``), sorted by name; images their ``image`` PNG; ``skipped`` names the other JSON
    files (e.g. an earlier ``results.json``), which are not samples.

    Raises:
      OracleError: no such folder / no sample metadata in it / a metadata file without a
        field or whose image is missing (naming the file).
    """
    from PIL import Image

    if not os.path.isdir(folder):
        raise OracleError(f"no such folder: {folder}")
    images, items, skipped = [], [], []
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".json"):
            continue
        path = os.path.join(folder, fname)
        with open(path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise OracleError(f"{path}: not JSON ({e})") from None
        if not isinstance(meta, dict) or ("settings" not in meta and "image" not in meta):
            skipped.append(fname)  # not a sample's metadata (e.g. results.json)
            continue
        missing = [k for k in ("caption", "phrases", "boxes", "image") if k not in meta]
        if missing:
            raise OracleError(f"{path}: sample metadata without {missing}")
        img_path = os.path.join(folder, meta["image"])
        if not os.path.isfile(img_path):
            raise OracleError(f"{path}: its image {meta['image']} is missing")
        images.append(np.asarray(Image.open(img_path).convert("RGB")))
        items.append({"id": meta.get("id", fname[:-5]), "caption": meta["caption"],
                      "phrases": meta["phrases"], "boxes": meta["boxes"],
                      "category": meta.get("category")})
    if not items:
        raise OracleError(f"{folder}: no sample metadata (<id>.json with caption, phrases, "
                          "boxes, image) found; is it a scripts/sample.py output folder?")
    return images, items, skipped


def score_folder(folder: str, oracle: Oracle | None = None, batch_size: int = 64) -> dict:
    """Scores every sample of a scripts/sample.py folder -> {"folder", "oracle",
    "skipped_files", "summary", "items"} (items: :func:`judge` results, in name order)."""
    oracle = Oracle.load() if oracle is None else oracle
    images, items, skipped = read_folder(folder)
    results = []
    for start in range(0, len(items), batch_size):
        results += oracle.score_items(images[start:start + batch_size],
                                      items[start:start + batch_size])
    return {"folder": os.path.abspath(folder),
            "oracle": os.path.abspath(oracle.folder) if oracle.folder else None,
            "skipped_files": skipped, "summary": summarize(results), "items": results}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def results_markdown(scored: dict, title: str = "Shapes-world oracle") -> str:
    s = scored["summary"]
    b = s["boxes"]
    iou = "-" if b["iou"] is None else f"{b['iou']:.3f}"
    lines = [f"# {title}", "", f"Folder: `{scored.get('folder')}`; {s['items']} images, "
             f"{b['n']} boxes; all-categories verdict {_pct(s['verdict'])}, graded score "
             f"{_pct(s.get('score'))} (module docstring of goal_jax/evaluation/oracle.py).", "",
             "| per box | present | colour in box | colour | shape | texture (of objects found) "
             "| all named right | mean IoU |", "|---|---|---|---|---|---|---|---|",
             f"| | {_pct(b['present'])} | {_pct(b['color_in_box'])} | {_pct(b['color'])} | "
             f"{_pct(b['shape'])} | {_pct(b['texture'])} | {_pct(b['correct'])} | "
             f"{iou} |", "",
             "| category | images | graded score | verdict | boxes: present | colour in box "
             "| all named right |", "|---|---|---|---|---|---|---|"]
    for cat, c in s["categories"].items():
        extra = f" (relation {_pct(c['relation_ok'])})" if "relation_ok" in c else ""
        cb = c["boxes"]
        lines.append(f"| {cat} | {c['n']} | {_pct(c.get('score'))} | {_pct(c['verdict'])}{extra} "
                     f"| {_pct(cb['present'])} "
                     f"| {_pct(cb['color_in_box'])} | {_pct(cb['correct'])} |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str, scored: dict) -> tuple[str, str]:
    """Writes ``results.json`` (summary + per item, per box) and ``results.md`` -> paths."""
    os.makedirs(output_dir, exist_ok=True)
    js, md = os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")
    with open(js, "w", encoding="utf-8") as f:
        json.dump(scored, f, indent=1)
    with open(md, "w", encoding="utf-8") as f:
        f.write(results_markdown(scored))
    return md, js


# ----------------------------------------------------------------------------------------------
# Validation on held-out renders (the ceiling) and training.
# ----------------------------------------------------------------------------------------------


def render_items(seed, n_items: int, augment: bool = False):
    """Held-out shapes items -> (images, items with ``category``, ground-truth objects).

    Categories cycle as in the dataset. ``augment``: the images get the training
    augmentations (blur, noise, colour jitter, resampling) and the layout boxes are jittered
    (imperfect generated images); the ground-truth objects keep the drawn boxes."""
    rng = np.random.default_rng(seed)
    aug_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 99])
    cfg = oracle_model.AugmentConfig()
    res = oracle_model.WORK_RESOLUTION
    images, items, truths = [], [], []
    for i in range(n_items):
        cat = shapes.CATEGORY_CYCLE[i % len(shapes.CATEGORY_CYCLE)]
        img, caption, objs = shapes.render_item_objects(rng, cat, res)
        boxes = [np.asarray(o["box"], np.float64) for o in objs]
        if augment:
            img = oracle_model.augment_image(aug_rng, img.astype(np.float32), cfg).astype(np.uint8)
            boxes = [np.clip(oracle_model.jitter_box(aug_rng, b, cfg), 0, res) for b in boxes]
        images.append(img)
        items.append({"id": f"render-{i:05d}", "caption": caption, "category": cat,
                      "phrases": [o["phrase"] for o in objs],
                      "boxes": [(b / res).tolist() for b in boxes]})
        truths.append(objs)
    return images, items, truths


def measure_renders(oracle: Oracle, seed, n_items: int, augment: bool = False) -> dict:
    """The oracle against the ground truth of held-out renders.

    Returns {"boxes": accuracy of every attribute vs the drawn object (present, color (the
    oracle's choice), color_cnn, color_vote, shape, texture, mean iou, color_in_box),
    "absent_boxes": how often an empty box (background only) reads present,
    "summary": :func:`summarize` of the verdicts (the ceiling per category)}."""
    images, items, truths = render_items(seed, n_items, augment)
    results = oracle.score_items(images, items)
    acc = {k: [] for k in ("present", "color", "color_cnn", "color_vote", "shape", "texture", "iou")}
    for r, objs in zip(results, truths):
        for b, o in zip(r["boxes"], objs):
            rd = b["reading"]
            acc["present"].append(rd["present"])
            acc["color"].append(rd["color"] == o["color"])
            acc["color_cnn"].append(rd["color_cnn"] == o["color"])
            acc["color_vote"].append(rd["color_vote"] == o["color"])
            acc["shape"].append(rd["shape"] == o["shape"])
            acc["texture"].append(rd["texture"] == o["texture"])
            acc["iou"].append(rd["iou"])
    # Empty boxes: a background region of each image (where one fits).
    sampler_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 7])
    res = oracle_model.WORK_RESOLUTION
    empty_images, empty_boxes = [], []
    for img, objs in zip(images, truths):
        for _ in range(30):
            w, h = sampler_rng.uniform(0.2, 0.4, 2) * res
            x, y = sampler_rng.uniform(0, res - w), sampler_rng.uniform(0, res - h)
            box = np.array([x, y, x + w, y + h])
            if all(oracle_model._overlap(box, o["box"]) == 0 for o in objs):
                empty_images.append(img)
                empty_boxes.append([(box / res).tolist()])
                break
    empty = [rd[0].present for rd in oracle.read_batch(empty_images, empty_boxes)]
    summary = summarize(results)
    return {"items": n_items, "seed": np.atleast_1d(seed).tolist(), "augmented": augment,
            "boxes": {**{k: _mean(v) for k, v in acc.items()},
                      "color_in_box": summary["boxes"]["color_in_box"], "n": len(acc["iou"])},
            "absent_boxes": {"n": len(empty), "read_present": _mean(empty)},
            "summary": summary}


TRAIN_SEED = 0
HELDOUT_SEED = (2026, 5)   # never used for training (training pools use seed [TRAIN_SEED])
SELECT_SEED = (2026, 6)    # colour-method selection
LAYOUT_SEED = (2027, 3)    # held-out layouts to sample from (the floor / benchmarks)


def heldout_layouts(n_items: int, seed=LAYOUT_SEED, prefix: str = "heldout",
                    categories: Sequence[str] = tuple(shapes.CATEGORY_CYCLE)) -> list[dict]:
    """Held-out sampling requests for scripts/sample.py: item i is the layout of the i-th
    shapes render of ``seed`` (categories cycling through ``categories``) as
    ``{"id": "<prefix>-<i:03d>", "caption", "phrases", "boxes" (relative), "seed": i}``."""
    rng = np.random.default_rng(seed)
    res = oracle_model.WORK_RESOLUTION
    out = []
    for i in range(n_items):
        _, caption, objs = shapes.render_item_objects(rng, categories[i % len(categories)], res)
        out.append({"id": f"{prefix}-{i:03d}", "caption": caption,
                    "phrases": [o["phrase"] for o in objs],
                    "boxes": [[v / res for v in o["box"]] for o in objs], "seed": i})
    return out


def train_command(out: str, cfg: oracle_model.TrainConfig, n_heldout: int, argv: list[str]) -> dict:
    """Trains, picks the colour method on SELECT_SEED renders (clean + augmented), measures
    the ceiling on HELDOUT_SEED renders and saves the oracle to ``out``."""
    start = time.time()
    model, params, info = oracle_model.train(cfg)
    config = {
        "about": "shapes-world oracle CNN (goal_jax.evaluation.oracle); independent of CLIP",
        "command": "python -m goal_jax.evaluation.oracle " + " ".join(argv),
        "model": {"features": list(cfg.features), "crop_size": oracle_model.CROP_SIZE,
                  "crop_margin": oracle_model.CROP_MARGIN,
                  "work_resolution": oracle_model.WORK_RESOLUTION,
                  "num_params": info["num_params"],
                  "classes": {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
                              "texture": list(shapes.TEXTURES)}},
        "train": {**dataclasses.asdict(cfg), "data": f"shapes.render_item_objects, rng seed "
                  f"[{cfg.seed}], {cfg.pool_items} items, categories cycling; crops with "
                  "oracle_model.AugmentConfig() augmentations", "augment":
                  dataclasses.asdict(oracle_model.AugmentConfig()), **info},
        "color_method": "cnn",
    }
    oracle = Oracle(model, params, config, out)
    select_color_method(oracle, n_heldout)
    config["validation"] = {
        "ceiling": measure_renders(oracle, HELDOUT_SEED, n_heldout, False),
        "ceiling_augmented": measure_renders(oracle, HELDOUT_SEED, n_heldout, True)}
    config["wall_seconds"] = round(time.time() - start, 1)
    oracle_model.save(out, params, config)
    _print_validation(config["validation"])
    print(f"wrote {out} ({os.path.getsize(os.path.join(out, oracle_model.WEIGHTS_FILE)) / 1e3:.0f} "
          f"kB weights, {info['num_params']} parameters) in {config['wall_seconds']:.0f} s")
    return config


def select_color_method(oracle: Oracle, n_items: int) -> str:
    """Sets ``oracle.color_method`` (and its config's ``color_method`` /
    ``color_method_selection``) to the more accurate of the CNN and the palette vote on
    SELECT_SEED renders, clean and augmented (mean of both); returns it."""
    print("choosing the colour method on held-out renders ...", flush=True)
    choice = {}
    for method in ("cnn", "vote"):
        oracle.color_method = method
        accs = [measure_renders(oracle, SELECT_SEED, n_items, aug)["boxes"]["color"]
                for aug in (False, True)]
        choice[method] = {"clean": accs[0], "augmented": accs[1], "mean": _mean(accs)}
    best = max(choice, key=lambda m: choice[m]["mean"])
    oracle.color_method = oracle.config["color_method"] = best
    oracle.config["color_method_selection"] = {"seed": list(SELECT_SEED), "items": n_items,
                                               **choice}
    print(f"colour accuracy: {choice}; using {best}", flush=True)
    return best


def _print_validation(validation: dict) -> None:
    for name, v in validation.items():
        if "boxes" in v and "summary" in v:
            b, cats = v["boxes"], v["summary"]["categories"]
            print(f"{name}: " + ", ".join(f"{k} {b[k]}" for k in b if k != "n")
                  + f"; empty boxes read present {v.get('absent_boxes', {}).get('read_present')}"
                  + "; verdicts " + ", ".join(f"{c} {x['verdict']}" for c, x in cats.items()))


def _train_cfg(args) -> oracle_model.TrainConfig:
    return oracle_model.TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                    seed=args.seed, pool_items=args.pool_items)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m goal_jax.evaluation.oracle",
                                description="The shapes-world oracle: train, validate, score.")
    sub = p.add_subparsers(dest="command", required=True)
    d = oracle_model.TrainConfig()
    t = sub.add_parser("train", help="train the oracle CNN and measure its ceiling")
    t.add_argument("--out", required=True, help="output folder (oracle.safetensors + oracle.json)")
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch_size", type=int, default=d.batch_size)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--pool_items", type=int, default=d.pool_items)
    t.add_argument("--heldout_items", type=int, default=600,
                   help="held-out renders for the colour-method choice and the ceiling")
    v = sub.add_parser("validate", help="re-choose the colour method, re-measure the ceiling "
                       "(held-out renders) and, with --floor, score a folder of random-weight "
                       "samples; stored in oracle.json")
    v.add_argument("--out", default=DEFAULT_DIR, help="oracle folder")
    v.add_argument("--heldout_items", type=int, default=600)
    v.add_argument("--floor", default=None, help="scripts/sample.py folder of random-weight samples")
    v.add_argument("--floor_about", default="", help="how the floor samples were made")
    lay = sub.add_parser("layouts", help="write held-out layouts (JSONL for scripts/sample.py)")
    lay.add_argument("--out", required=True, help="JSONL file")
    lay.add_argument("--n", type=int, default=36, help="number of layouts (categories cycle)")
    lay.add_argument("--prefix", default="heldout", help="item id prefix")
    s = sub.add_parser("score", help="score a scripts/sample.py output folder")
    s.add_argument("folder")
    s.add_argument("--output_dir", default=None, help="where results.json/.md go (default: folder)")
    s.add_argument("--oracle", default=None, help=f"oracle folder (default {DEFAULT_DIR})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train_command(args.out, _train_cfg(args), args.heldout_items, argv)
        return 0
    if args.command == "layouts":
        with open(args.out, "w", encoding="utf-8") as f:
            for item in heldout_layouts(args.n, prefix=args.prefix):
                f.write(json.dumps(item) + "\n")
        print(f"wrote {args.n} layouts to {args.out}")
        return 0
    if args.command == "validate":
        oracle = Oracle.load(args.out)
        select_color_method(oracle, args.heldout_items)
        config = oracle.config
        validation = dict(config.get("validation", {}))
        validation["ceiling"] = measure_renders(oracle, HELDOUT_SEED, args.heldout_items, False)
        validation["ceiling_augmented"] = measure_renders(oracle, HELDOUT_SEED,
                                                          args.heldout_items, True)
        if args.floor is not None:
            scored = score_folder(args.floor, oracle)
            validation["floor"] = {"about": args.floor_about, **scored["summary"]}
        config["validation"] = validation
        config["validate_command"] = "python -m goal_jax.evaluation.oracle " + " ".join(argv)
        oracle_model.save(args.out, oracle.params, config)
        _print_validation(validation)
        if "floor" in validation:
            print("floor: " + json.dumps(validation["floor"]))
        return 0
    try:
        oracle = Oracle.load(args.oracle)
        scored = score_folder(args.folder, oracle)
    except (ValueError, FileNotFoundError) as e:  # OracleError names the item / file
        print(f"error: {e}", file=sys.stderr)
        return 2
    md, js = write_results(args.output_dir or args.folder, scored)
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
