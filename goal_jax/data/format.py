"""The one on-disk layout dataset format (see docs/data_format.md) and its validation.

A dataset is a folder holding images and ``annotations.jsonl`` (optionally
``annotations_val.jsonl``), one JSON object per line::

    {"id": "0007", "image": "images/0007.png", "caption": "a red circle to the left of a blue square",
     "box_format": "xyxy_pixels",
     "annotations": [{"phrase": "a red circle", "box": [4, 20, 28, 44]},
                     {"phrase": "a blue square", "box": [36, 18, 60, 42]}],
     "category": "spatial", "source": "template", "split": "train"}

Boxes are ``[x0, y0, x1, y1]`` (left, top, right, bottom) in pixels of the stored image
(``xyxy_pixels``) or as fractions of its width / height (``xyxy_normalized``). ``id`` defaults
to the 1-based line number (``"line 12"``); it names the item in every error and build summary.

This module only reads/writes the text format and cleans one item's boxes
(:func:`clean_annotations`); images are decoded by the builder (goal2k.py). Pure Python + numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Sequence

BOX_FORMATS = ("xyxy_pixels", "xyxy_normalized")
CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "non_spatial", "complex")
SPLITS = ("train", "val")
ANNOTATIONS_FILE = "annotations.jsonl"
VAL_ANNOTATIONS_FILE = "annotations_val.jsonl"
MAX_BOXES = 30
OVERSHOOT_TOLERANCE_PX = 1.0  # boxes overshooting the image by less than this are clamped
MIN_BOX_SIDE_PX = 1.0  # boxes narrower or lower than this (after clamping) are degenerate


class DataFormatError(ValueError):
    """An annotation line or item that breaks the format; the message names the item."""


@dataclasses.dataclass
class Record:
    """One parsed line of an annotations file (boxes not yet checked against the image).

    Attributes:
      id: the item's id (the ``id`` field, or ``"line <n>"`` with 1-based line number n).
      image: image path relative to the dataset folder ("" for layout-only files).
      caption: the caption text.
      phrases: one phrase per annotation (as written, may be empty: cleaned later).
      boxes: one ``[x0, y0, x1, y1]`` list of floats per annotation, in ``box_format`` units.
      box_format: "xyxy_pixels" or "xyxy_normalized".
      category: one of CATEGORIES or "" when absent.
      source: free text ("template", "coco", ...) or "".
      split: "train" or "val".
    """

    id: str
    image: str
    caption: str
    phrases: list[str]
    boxes: list[list[float]]
    box_format: str
    category: str = ""
    source: str = ""
    split: str = "train"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "caption": self.caption,
            "box_format": self.box_format,
            "annotations": [
                {"phrase": p, "box": [float(v) for v in b]} for p, b in zip(self.phrases, self.boxes)
            ],
        }
        if self.category:
            d["category"] = self.category
        if self.source:
            d["source"] = self.source
        if self.split != "train":
            d["split"] = self.split
        return d


def _fail(item_id: str, what: str) -> DataFormatError:
    return DataFormatError(f"item {item_id}: {what}")


def parse_record(obj: Any, line_number: int, default_split: str = "train",
                 require_image: bool = True) -> Record:
    """Checks one decoded JSON object against the format -> Record.

    Raises:
      DataFormatError: naming the item id and the bad field.
    """
    if not isinstance(obj, dict):
        raise _fail(f"line {line_number}", f"expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id", None)
    if raw_id is None:
        item_id = f"line {line_number}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id):
        item_id = str(raw_id)
    else:
        raise _fail(f"line {line_number}", f"'id' must be a non-empty string or integer, got {raw_id!r}")

    image = obj.get("image", "")
    if require_image and (not isinstance(image, str) or not image):
        raise _fail(item_id, f"'image' must be a non-empty relative path, got {image!r}")
    if not isinstance(image, str):
        raise _fail(item_id, f"'image' must be a string, got {image!r}")
    if os.path.isabs(image):
        raise _fail(item_id, f"'image' must be relative to the dataset folder, got {image!r}")
    caption = obj.get("caption", None)
    if not isinstance(caption, str) or not caption.strip():
        raise _fail(item_id, f"'caption' must be a non-empty string, got {caption!r}")
    box_format = obj.get("box_format", None)
    if box_format not in BOX_FORMATS:
        raise _fail(item_id, f"'box_format' must be one of {BOX_FORMATS}, got {box_format!r}")
    annotations = obj.get("annotations", None)
    if not isinstance(annotations, list):
        raise _fail(item_id, f"'annotations' must be a list, got {type(annotations).__name__}")
    phrases, boxes = [], []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "phrase" not in ann or "box" not in ann:
            raise _fail(item_id, f"annotation {i} must be an object with 'phrase' and 'box', got {ann!r}")
        phrase, box = ann["phrase"], ann["box"]
        if not isinstance(phrase, str):
            raise _fail(item_id, f"annotation {i} 'phrase' must be a string, got {phrase!r}")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise _fail(item_id, f"annotation {i} 'box' must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        if not all(math.isfinite(v) for v in box):
            raise _fail(item_id, f"annotation {i} 'box' has a non-finite value: {box!r}")
        phrases.append(phrase)
        boxes.append([float(v) for v in box])
    category = obj.get("category", "") or ""
    if category and category not in CATEGORIES:
        raise _fail(item_id, f"'category' must be one of {CATEGORIES}, got {category!r}")
    source = obj.get("source", "") or ""
    if not isinstance(source, str):
        raise _fail(item_id, f"'source' must be a string, got {source!r}")
    split = obj.get("split", default_split)
    if split not in SPLITS:
        raise _fail(item_id, f"'split' must be one of {SPLITS}, got {split!r}")
    return Record(item_id, image, caption, phrases, boxes, box_format, category, source, split)


def read_annotations(path: str, default_split: str = "train", require_image: bool = True
                     ) -> tuple[list[Record], list[dict[str, str]]]:
    """Reads an annotations JSONL file.

    Blank lines are skipped. Lines that are not valid JSON or break the format do not stop the
    read: they are returned as errors ``{"id": ..., "reason": ...}`` (id = the line's ``id``
    when it can be read, else ``"line <n>"``).

    Returns:
      (records, errors); duplicate ids are errors for every repeat after the first.
    """
    records, errors, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append({"id": f"line {n}", "reason": f"malformed JSON ({e.msg} at column {e.colno})"})
                continue
            try:
                rec = parse_record(obj, n, default_split, require_image)
            except DataFormatError as e:
                item_id = obj.get("id", f"line {n}") if isinstance(obj, dict) else f"line {n}"
                errors.append({"id": str(item_id), "reason": str(e).split(": ", 1)[1]})
                continue
            if rec.id in seen:
                errors.append({"id": rec.id, "reason": f"duplicate id (line {n})"})
                continue
            seen.add(rec.id)
            records.append(rec)
    return records, errors


def write_annotations(path: str, records: Iterable[Record | dict]) -> int:
    """Writes records (Record or already-formatted dicts) as JSONL; returns the line count."""
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            obj = r.to_json() if isinstance(r, Record) else r
            f.write(json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n")
            n += 1
    return n


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def clean_annotations(record: Record, width: int, height: int, max_boxes: int = MAX_BOXES
                      ) -> tuple[list[str], list[list[float]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Validates one item's boxes against its image size; -> normalized xyxy boxes.

    Rules (applied in this order, per annotation ``i``):
      1. empty phrase (only whitespace) -> dropped, reason "empty phrase";
      2. the box in pixels (``xyxy_normalized`` is multiplied by width/height); a coordinate
         outside ``[0, width] x [0, height]`` by less than 1 px is clamped (listed in ``clamped``),
         by 1 px or more -> dropped, reason "out of bounds";
      3. width or height below 1 px (zero-area, inverted) -> dropped, reason "degenerate";
      4. more than ``max_boxes`` left -> the ``max_boxes`` largest (by area; ties keep the
         earlier box) are kept in their original order, the rest dropped, reason
         "over max_boxes".

    Returns:
      (phrases, boxes, dropped, clamped): kept phrases (stripped) and boxes ``[x0, y0, x1, y1]``
      in [0, 1]; dropped = [{"index", "phrase", "box", "reason"}]; clamped = [{"index", "box"}].
    """
    if width <= 0 or height <= 0:
        raise _fail(record.id, f"image size must be positive, got {width}x{height}")
    scale = (width, height, width, height) if record.box_format == "xyxy_normalized" else (1, 1, 1, 1)
    kept: list[tuple[int, str, list[float]]] = []
    dropped: list[dict[str, Any]] = []
    clamped: list[dict[str, Any]] = []
    for i, (phrase, box) in enumerate(zip(record.phrases, record.boxes)):
        if not phrase.strip():
            dropped.append({"index": i, "phrase": phrase, "box": box, "reason": "empty phrase"})
            continue
        px = [v * s for v, s in zip(box, scale)]
        limits = (width, height, width, height)
        over = max(max(-v, v - lim) for v, lim in zip(px, limits))
        if over >= OVERSHOOT_TOLERANCE_PX:
            dropped.append({"index": i, "phrase": phrase, "box": box,
                            "reason": f"out of bounds by {over:.3g} px (image {width}x{height})"})
            continue
        if over > 0:
            px = [min(max(v, 0.0), lim) for v, lim in zip(px, limits)]
            clamped.append({"index": i, "box": box})
        if px[2] - px[0] < MIN_BOX_SIDE_PX or px[3] - px[1] < MIN_BOX_SIDE_PX:
            dropped.append({"index": i, "phrase": phrase, "box": box,
                            "reason": f"degenerate (width {px[2] - px[0]:.3g} px, height {px[3] - px[1]:.3g} px)"})
            continue
        kept.append((i, phrase.strip(), [px[0] / width, px[1] / height, px[2] / width, px[3] / height]))
    if len(kept) > max_boxes:
        order = sorted(range(len(kept)), key=lambda k: (-box_area(kept[k][2]), k))
        keep = set(order[:max_boxes])
        for k in order[max_boxes:]:
            i, phrase, _ = kept[k]
            dropped.append({"index": i, "phrase": phrase, "box": record.boxes[i],
                            "reason": f"over max_boxes={max_boxes} (kept the largest)"})
        kept = [kept[k] for k in sorted(keep)]
    dropped.sort(key=lambda d: d["index"])
    return [k[1] for k in kept], [k[2] for k in kept], dropped, clamped
