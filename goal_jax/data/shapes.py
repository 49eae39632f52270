"""A deterministic synthetic compositional dataset: textured colored shapes with exact boxes.

Each item is a square image with 1-4 objects (circle, square, triangle, star, diamond,
hexagon) in one of 9 colors and 4 textures (solid, striped, dotted, checkered) on a plain or
noisy background, and a caption from one of six templates, one per category:

  color     "a red circle and a blue square"                 (1-2 solid objects)
  shape     "a star and a hexagon"                           (1-2 objects, colors unnamed)
  texture   "a green striped triangle"                       (1-2 objects)
  spatial   "a red circle to the left of a blue striped square"  (left of/right of/above/below)
  counting  "three yellow stars"                             (2-4 identical objects)
  complex   "a red circle, a blue dotted square and a white star"  (3-4 objects)

Every object gets one annotation: its phrase (as it appears in the caption; counted objects
all get the plural phrase, e.g. "yellow stars") and its exact box, the tight bounds of the
drawn shape in pixels (``xyxy_pixels``). Drawing is at 2x and downsampled (antialiasing);
boxes are in final pixels. Same arguments -> byte-identical files (numpy Generator seeded with
``seed`` for train, ``[seed, 1]`` for val; PNG written without timestamps).

``VOCABULARY`` lists every word a caption or phrase can contain (for text.write_word_vocab).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from goal_jax.data import format as fmt

COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (240, 210, 20), "purple": (130, 40, 170), "orange": (245, 130, 20),
    "white": (250, 250, 250), "black": (15, 15, 15), "pink": (245, 120, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
TEXTURES = ("solid", "striped", "dotted", "checkered")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
CATEGORY_CYCLE = ("color", "shape", "texture", "spatial", "counting", "complex")


def _plural(shape: str) -> str:
    return shape + "s"


VOCABULARY = tuple(sorted(set(
    ["a", "an", "and", "to", "the", "left", "right", "of", "above", "below"]
    + list(COLORS) + list(SHAPES) + [_plural(s) for s in SHAPES]
    + [t for t in TEXTURES if t != "solid"] + list(NUMBERS.values()))))

_SUPERSAMPLE = 2


def _polygon(shape: str, box: np.ndarray) -> list[tuple[float, float]] | None:
    """Outline of ``shape`` inside ``box`` (x0, y0, x1, y1); None for the circle (an ellipse)."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return [(x0 + w / 4, y0), (x1 - w / 4, y0), (x1, cy), (x1 - w / 4, y1), (x0 + w / 4, y1), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((math.cos(a) * r, math.sin(a) * r))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        # Stretch the star so its tight bounds are exactly the box.
        return [(x0 + (px - min(xs)) / (max(xs) - min(xs)) * w, y0 + (py - min(ys)) / (max(ys) - min(ys)) * h)
                for px, py in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, color, size: int, rng: np.random.Generator) -> Image.Image:
    """A size x size RGB fill for an object: its color, with light stripes / dots / checks."""
    img = Image.new("RGB", (size, size), color)
    light = tuple(int(c * 0.35 + 255 * 0.65) for c in color)
    if color == COLORS["white"]:
        light = (150, 150, 150)
    d = ImageDraw.Draw(img)
    period = max(4, size // 16) * _SUPERSAMPLE // 2 * 2
    if texture == "striped":
        for k in range(-size, size, period):
            d.polygon([(k, 0), (k + period / 2, 0), (k + period / 2 + size, size), (k + size, size)], fill=light)
    elif texture == "dotted":
        r = period / 4
        for yy in range(period // 2, size, period):
            for xx in range(period // 2, size, period):
                d.ellipse([xx - r, yy - r, xx + r, yy + r], fill=light)
    elif texture == "checkered":
        for yy in range(0, size, period):
            for xx in range(0, size, period):
                if (xx // period + yy // period) % 2:
                    d.rectangle([xx, yy, xx + period - 1, yy + period - 1], fill=light)
    elif texture != "solid":
        raise ValueError(f"unknown texture {texture!r}")
    return img


def _place(rng, n: int, res: int, relation: str | None = None, tries: int = 200) -> list[np.ndarray]:
    """n non-overlapping integer boxes (pixels) with sides in [0.2, 0.4] x res; for a relation,
    box 0 is strictly left of / right of / above / below box 1 (no overlap on that axis).
    When ``tries`` draws all fail (rare, 4 large objects), further draws use sides in
    [0.2, 0.3] x res (the draws before that are unchanged, so existing items stay identical)."""
    for attempt in range(2 * tries):
        high = 0.4 if attempt < tries else 0.3
        boxes = []
        for _k in range(n):
            w = int(rng.integers(int(0.2 * res), int(high * res) + 1))
            h = int(rng.integers(int(0.2 * res), int(high * res) + 1))
            x = int(rng.integers(1, res - w))
            y = int(rng.integers(1, res - h))
            boxes.append(np.array([x, y, x + w, y + h], dtype=np.float64))
        ok = all(b1[2] <= b2[0] or b2[2] <= b1[0] or b1[3] <= b2[1] or b2[3] <= b1[1]
                 for i, b1 in enumerate(boxes) for b2 in boxes[i + 1:])
        if ok and relation is not None:
            a, b = boxes
            ok = {"left": a[2] <= b[0], "right": b[2] <= a[0],
                  "above": a[3] <= b[1], "below": b[3] <= a[1]}[relation]
        if ok:
            return boxes
    raise RuntimeError(f"could not place {n} objects on a {res}px canvas")


def _article(words: list[str]) -> str:
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _make_item(rng: np.random.Generator, category: str, res: int):
    """-> (caption, objects [(phrase, shape, color, texture, box)])."""
    color_names = list(COLORS)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if category in ("color", "shape", "texture", "complex"):
        n = int(rng.integers(1, 3)) if category != "complex" else int(rng.integers(3, 5))
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        objs = []
        for s in shapes:
            c = pick(color_names)
            t = "solid" if category in ("color", "shape") else pick(TEXTURES)
            if category == "texture" and t == "solid":
                t = pick(TEXTURES[1:])
            words = {"color": [c, s], "shape": [s]}.get(category, [c] + ([t] if t != "solid" else []) + [s])
            objs.append((_article(words), s, c, t))
        phrases = [o[0] for o in objs]
        caption = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        boxes = _place(rng, n, res)
        return caption, [(*o, b) for o, b in zip(objs, boxes)]
    if category == "spatial":
        relation = pick(list(RELATIONS))
        objs = []
        for s in [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]:
            c, t = pick(color_names), pick(TEXTURES)
            objs.append((_article([c] + ([t] if t != "solid" else []) + [s]), s, c, t))
        caption = f"{objs[0][0]} {RELATIONS[relation]} {objs[1][0]}"
        boxes = _place(rng, 2, res, relation)
        return caption, [(*o, b) for o, b in zip(objs, boxes)]
    if category == "counting":
        n = int(rng.integers(2, 5))
        s, c = pick(list(SHAPES)), pick(color_names)
        phrase = f"{c} {_plural(s)}"
        caption = f"{NUMBERS[n]} {phrase}"
        boxes = _place(rng, n, res)
        return caption, [(phrase, s, c, "solid", b) for b in boxes]
    raise ValueError(f"unknown category {category!r}")


def _background(rng, size: int) -> np.ndarray:
    base = rng.integers(150, 236, size=3)
    if rng.random() < 0.5:
        return np.broadcast_to(base, (size, size, 3)).astype(np.uint8)
    noise = rng.normal(0.0, 18.0, size=(size // _SUPERSAMPLE, size // _SUPERSAMPLE, 3))
    noise = np.repeat(np.repeat(noise, _SUPERSAMPLE, 0), _SUPERSAMPLE, 1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def render_item(rng: np.random.Generator, category: str, resolution: int):
    """Draws one item -> (uint8 [res, res, 3] image, caption, phrases, boxes (pixels, xyxy))."""
    pixels, caption, objects = render_item_objects(rng, category, resolution)
    return pixels, caption, [o["phrase"] for o in objects], [o["box"] for o in objects]


def render_item_objects(rng: np.random.Generator, category: str, resolution: int):
    """Draws one item -> (uint8 [res, res, 3] image, caption, objects).

    ``objects`` is a list with one dict per drawn object: ``phrase`` (str), ``shape`` (one of
    SHAPES), ``color`` (a key of COLORS), ``texture`` (one of TEXTURES) and ``box`` (xyxy in
    pixels, the tight bounds of the drawn shape). Same rng state -> same item as render_item.
    """
    caption, objects = _make_item(rng, category, resolution)
    size = resolution * _SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, size))
    drawn = []
    for phrase, shape, color, texture, box in objects:
        big = box * _SUPERSAMPLE
        mask = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(mask)
        # PIL fills the pixels whose index lies in [x0, x1 - 1]: drawing into big - (0, 0, 1, 1)
        # covers exactly the continuous box [x0, x1) x [y0, y1) (tight bounds = box).
        inner = big - np.array([0, 0, 1, 1])
        poly = _polygon(shape, inner)
        if poly is None:
            d.ellipse(inner.tolist(), fill=255)
        else:
            d.polygon(poly, fill=255)
        canvas.paste(_texture(texture, COLORS[color], size, rng), (0, 0), mask)
        drawn.append({"phrase": phrase, "shape": shape, "color": color, "texture": texture,
                      "box": [float(v) for v in box]})
    image = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(image), caption, drawn


def write_shapes_dataset(folder: str, num_items: int, resolution: int = 64, seed: int = 0,
                         val_items: int = 0) -> dict[str, int]:
    """Writes ``num_items`` train (+ ``val_items`` val) items in the on-disk format.

    Files: ``images/train_000000.png`` ..., ``annotations.jsonl`` and, when val_items > 0,
    ``images/val_000000.png`` ... and ``annotations_val.jsonl``. Categories cycle through
    color, shape, texture, spatial, counting, complex. Item ids: ``shapes-train-000000``.

    Returns:
      {"train": num_items, "val": val_items}.
    """
    if num_items < 1 or val_items < 0:
        raise ValueError(f"write_shapes_dataset: need num_items >= 1 and val_items >= 0, got {num_items}, {val_items}")
    if resolution < 32:
        raise ValueError(f"write_shapes_dataset: resolution must be >= 32 pixels, got {resolution}")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for split, count, rng_seed, file in (("train", num_items, [seed], fmt.ANNOTATIONS_FILE),
                                         ("val", val_items, [seed, 1], fmt.VAL_ANNOTATIONS_FILE)):
        if count == 0:
            continue
        rng = np.random.default_rng(rng_seed)
        records = []
        for i in range(count):
            category = CATEGORY_CYCLE[i % len(CATEGORY_CYCLE)]
            pixels, caption, phrases, boxes = render_item(rng, category, resolution)
            rel = f"images/{split}_{i:06d}.png"
            Image.fromarray(pixels).save(os.path.join(folder, rel), format="PNG", optimize=False)
            records.append(fmt.Record(id=f"shapes-{split}-{i:06d}", image=rel, caption=caption,
                                      phrases=phrases, boxes=boxes, box_format="xyxy_pixels",
                                      category=category, source="template", split=split))
        fmt.write_annotations(os.path.join(folder, file), records)
    return {"train": num_items, "val": val_items}
