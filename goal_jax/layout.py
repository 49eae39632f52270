"""Layouts: phrases with boxes, their validation, padding and parsing.

A :class:`Layout` is caption-independent: ``phrases[i]`` describes the object in ``boxes[i]``,
a box is ``(x0, y0, x1, y1)`` in image-relative units (fractions of the width / height, in
``[0, 1]``, origin at the top-left corner, ``x0 < x1`` and ``y0 < y1``). GLIGEN takes at most
``MAX_BOXES = 30`` boxes; a layout may be empty (the U-Net then sees only null grounding tokens).

A sampling request (:class:`LayoutItem`) adds the caption, an optional seed and an optional id.
As JSON (one object, or one per line of a JSONL file)::

    {"caption": "a red cat left of a blue dog", "phrases": ["a red cat", "a blue dog"],
     "boxes": [[0.05, 0.3, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]], "seed": 7, "id": "cats-1"}

Every error is a :class:`LayoutError` whose message starts with the name of the item
(e.g. ``prompts.jsonl line 3``) and says which phrase / box is wrong and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

import numpy as np

MAX_BOXES = 30
ITEM_KEYS = ("caption", "phrases", "boxes", "seed", "id")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LayoutError(ValueError):
    """A layout or sampling request is malformed; the message names the item."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def validate(phrases: Sequence[str], boxes: Sequence[Sequence[float]], name: str = "layout",
             max_boxes: int = MAX_BOXES) -> tuple[tuple[str, ...], tuple[tuple[float, ...], ...]]:
    """Checks a layout and returns it normalised (tuples; phrases stripped; boxes as floats).

    Raises:
      LayoutError: naming ``name`` and the offending phrase or box: not a list, lengths differ,
        more than ``max_boxes`` boxes, empty or non-string phrase, a box that is not 4 finite
        numbers, a coordinate outside [0, 1], ``x0 >= x1`` or ``y0 >= y1``.
    """
    if isinstance(phrases, (str, bytes)) or not isinstance(phrases, Sequence):
        raise LayoutError(f"{name}: 'phrases' must be a list of strings, got {phrases!r}")
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, (Sequence, np.ndarray)):
        raise LayoutError(f"{name}: 'boxes' must be a list of [x0, y0, x1, y1], got {boxes!r}")
    if len(phrases) != len(boxes):
        raise LayoutError(
            f"{name}: {len(phrases)} phrases but {len(boxes)} boxes (one phrase per box)")
    if len(boxes) > max_boxes:
        raise LayoutError(f"{name}: {len(boxes)} boxes, at most {max_boxes} are supported")
    out_phrases = []
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise LayoutError(f"{name}: phrase {i} must be a string, got {phrase!r}")
        if not phrase.strip():
            raise LayoutError(f"{name}: phrase {i} is empty")
        out_phrases.append(phrase.strip())
    out_boxes = []
    for i, box in enumerate(boxes):
        label = f"{name}: box {i} ({out_phrases[i]!r})"
        if isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, np.ndarray)) \
                or len(box) != 4 or not all(_is_number(v) for v in box):
            raise LayoutError(f"{label} must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise LayoutError(f"{label} has a non-finite coordinate: {list(box)}")
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise LayoutError(
                f"{label} is outside [0, 1]: {[x0, y0, x1, y1]} (coordinates are fractions of "
                "the image width and height)")
        if x0 >= x1:
            raise LayoutError(f"{label} has x0 >= x1: {[x0, y0, x1, y1]}")
        if y0 >= y1:
            raise LayoutError(f"{label} has y0 >= y1: {[x0, y0, x1, y1]}")
        out_boxes.append((x0, y0, x1, y1))
    return tuple(out_phrases), tuple(out_boxes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Phrases and their boxes (xyxy, fractions of the image size in [0, 1]); validated on
    construction (:func:`validate`)."""

    phrases: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def __post_init__(self):
        phrases, boxes = validate(self.phrases, self.boxes)
        object.__setattr__(self, "phrases", phrases)
        object.__setattr__(self, "boxes", boxes)

    @classmethod
    def create(cls, phrases, boxes, name: str = "layout") -> "Layout":
        """Validates with errors naming ``name`` and builds the layout."""
        phrases, boxes = validate(phrases, boxes, name)
        return cls(phrases, boxes)

    def __len__(self) -> int:
        return len(self.boxes)

    def padded(self, max_boxes: int = MAX_BOXES):
        """The layout padded to ``max_boxes`` slots, as GLIGEN takes it.

        Returns:
          boxes: float32 [max_boxes, 4], xyxy in [0, 1], zeros in padded slots;
          masks: float32 [max_boxes], 1 for real boxes, 0 for padding;
          phrases: list of ``max_boxes`` strings, ``""`` in padded slots.
        """
        if len(self) > max_boxes:
            raise LayoutError(f"layout: {len(self)} boxes, at most {max_boxes} are supported")
        boxes = np.zeros((max_boxes, 4), np.float32)
        masks = np.zeros((max_boxes,), np.float32)
        if len(self):
            boxes[: len(self)] = np.asarray(self.boxes, np.float32)
            masks[: len(self)] = 1.0
        phrases = list(self.phrases) + [""] * (max_boxes - len(self))
        return boxes, masks, phrases

    def to_dict(self) -> dict:
        return {"phrases": list(self.phrases), "boxes": [list(b) for b in self.boxes]}


def pad_layouts(layouts: Sequence[Layout], max_boxes: int = MAX_BOXES):
    """Batch of layouts -> (boxes float32 [B, N, 4], masks float32 [B, N], phrases [B][N] str)
    with N = ``max_boxes``; see :meth:`Layout.padded`."""
    padded = [layout.padded(max_boxes) for layout in layouts]
    if not padded:
        return (np.zeros((0, max_boxes, 4), np.float32), np.zeros((0, max_boxes), np.float32), [])
    boxes, masks, phrases = zip(*padded)
    return np.stack(boxes), np.stack(masks), [list(p) for p in phrases]


@dataclasses.dataclass(frozen=True)
class LayoutItem:
    """One sampling request: caption, layout, seed (None: the caller picks) and id (None: the
    caller names it)."""

    caption: str | None
    layout: Layout
    seed: int | None = None
    id: str | None = None

    def to_dict(self) -> dict:
        out = {"caption": self.caption, **self.layout.to_dict(), "seed": self.seed}
        if self.id is not None:
            out["id"] = self.id
        return out


def parse_item(obj: Any, name: str = "layout", require_caption: bool = True) -> LayoutItem:
    """A decoded JSON object -> :class:`LayoutItem`.

    Keys: ``caption`` (string; may be absent when ``require_caption`` is False), ``phrases``
    and ``boxes`` (required, may be empty lists), ``seed`` (int in [0, 2**32), optional),
    ``id`` (letters, digits, ``._-``, optional). Unknown keys are errors (a typo must not
    silently drop a layout).
    """
    if not isinstance(obj, dict):
        raise LayoutError(f"{name}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ITEM_KEYS))
    if unknown:
        raise LayoutError(f"{name}: unknown key(s) {unknown}; allowed keys are {list(ITEM_KEYS)}")
    for key in ("phrases", "boxes"):
        if key not in obj:
            raise LayoutError(f"{name}: missing key {key!r}")
    caption = obj.get("caption")
    if caption is None and require_caption:
        raise LayoutError(f"{name}: missing key 'caption'")
    if caption is not None and not isinstance(caption, str):
        raise LayoutError(f"{name}: 'caption' must be a string, got {caption!r}")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2**32):
        raise LayoutError(f"{name}: 'seed' must be an integer in [0, 2**32), got {seed!r}")
    item_id = obj.get("id")
    if item_id is not None:
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or not _ID_RE.match(item_id):
            raise LayoutError(
                f"{name}: 'id' must be 1-128 characters of letters, digits, '.', '_' or '-' "
                f"starting with a letter or digit, got {item_id!r}")
    layout = Layout.create(obj["phrases"], obj["boxes"], name)
    return LayoutItem(caption, layout, seed, item_id)


def parse_json(text: str, name: str = "layout", require_caption: bool = True) -> LayoutItem:
    """JSON text of one item -> :class:`LayoutItem` (errors name ``name``)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{name}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
    return parse_item(obj, name, require_caption)


def read_jsonl(path: str) -> list[tuple[int, LayoutItem]]:
    """Reads a JSONL file of items -> [(line number, item)]; blank lines are skipped.

    Errors name ``path line N``; ids must be unique within the file.
    """
    items = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            item = parse_json(line, f"{path} line {lineno}")
            if item.id is not None:
                if item.id in seen:
                    raise LayoutError(
                        f"{path} line {lineno}: id {item.id!r} already used on line "
                        f"{seen[item.id]}")
                seen[item.id] = lineno
            items.append((lineno, item))
    return items

