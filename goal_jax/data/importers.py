"""Importers from public layout datasets to the on-disk format (docs/data_format.md).

* GLIGEN grounding TSV (the ``tsv`` files read by GLIGEN's ``dataset/tsv_dataset.py``): one
  row per image, ``<key>\\t<json>``; the JSON holds ``data_id``, ``image`` (base64 JPEG/PNG
  bytes), ``caption`` and ``annos``, each with ``bbox`` = absolute ``[x, y, w, h]`` pixels
  and ``tokens_positive`` = ``[[start, end], ...]`` character spans of the phrase in the
  caption (the phrase is the spans' text, in order, joined by a space). Detection rows
  (``"is_det": true``) have no caption: as GLIGEN does, the caption is the ``", "``-joined
  ``category_name`` list and each phrase its category name. Other keys (precomputed CLIP
  embeddings) are ignored. Images are written as-is (no re-encoding) to ``images/``.
* LayoutGPT NSR-1K (``counting.*.json``: entries with ``object_list`` = ``[[name, [x, y, w,
  h]], ...]``; ``spatial.*.json``: entries with ``obj1``, ``obj2`` = ``[name, [x, y, w, h]]``
  and ``relation``), boxes normalized top-left ``x, y, w, h``. Layouts and prompts only: the
  result is a *layout JSONL* -- the same line format with ``"image": ""`` -- for evaluation
  and sampling, read with ``format.read_annotations(path, require_image=False)``; it cannot be
  built into goal2k (no images).

Both return a summary ``{"items_written": n, "items_dropped": [{"id", "reason"}]}``: rows
that cannot be converted are listed, never silently skipped.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any

from PIL import Image

from goal_jax.data import format as fmt

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}


def _safe_name(data_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in data_id)


def _gligen_row(line: str, n: int) -> tuple[str, dict[str, Any]]:
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) < 2:
        raise ValueError(f"expected 2 tab-separated columns (key, json), got {len(cols)}")
    try:
        item = json.loads(cols[-1])
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise ValueError("the JSON column is not an object")
    return str(item.get("data_id", cols[0] or f"row {n}")), item


def _phrase_from_spans(caption: str, spans: Any) -> str:
    if (not isinstance(spans, list) or not spans
            or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spans)):
        raise ValueError(f"tokens_positive must be a non-empty list of [start, end], got {spans!r}")
    parts = []
    for s, e in sorted(spans, key=lambda x: x[0]):
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(caption)):
            raise ValueError(f"tokens_positive span [{s}, {e}] is outside the caption "
                             f"(length {len(caption)})")
        parts.append(caption[s:e])
    return " ".join(parts)


def import_gligen_tsv(tsv_path: str, out_folder: str, split: str = "train",
                      source: str = "gligen") -> dict[str, Any]:
    """GLIGEN grounding TSV -> ``out_folder`` (images/ + annotations.jsonl, or
    annotations_val.jsonl when split == "val"), boxes ``xyxy_pixels``."""
    if split not in fmt.SPLITS:
        raise ValueError(f"import_gligen_tsv: split must be one of {fmt.SPLITS}, got {split!r}")
    os.makedirs(os.path.join(out_folder, "images"), exist_ok=True)
    dropped, seen = [], set()

    def rows():  # written as read, one TSV row at a time (only the ids seen are kept)
        with open(tsv_path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                item_id = f"row {n}"
                try:
                    item_id, item = _gligen_row(line, n)
                    if item_id in seen:
                        raise ValueError("duplicate data_id")
                    try:
                        raw = base64.b64decode(item["image"], validate=True)
                    except (KeyError, TypeError, binascii.Error, ValueError):
                        raise ValueError("'image' is missing or not valid base64") from None
                    try:
                        with Image.open(io.BytesIO(raw)) as im:
                            im.load()
                            ext = _EXTENSIONS.get(im.format or "", "img")
                    except Exception as e:
                        raise ValueError(f"undecodable image ({type(e).__name__})") from None
                    annos = item.get("annos", [])
                    if not isinstance(annos, list):
                        raise ValueError("'annos' must be a list")
                    if item.get("is_det", False):
                        names = [str(a.get("category_name", "")) for a in annos]
                        caption = ", ".join(names)
                        phrases = names
                    else:
                        caption = item.get("caption", "")
                        if not isinstance(caption, str):
                            raise ValueError("'caption' must be a string")
                        phrases = [_phrase_from_spans(caption, a.get("tokens_positive")) for a in annos]
                    boxes = []
                    for k, a in enumerate(annos):
                        bbox = a.get("bbox")
                        if (not isinstance(bbox, list) or len(bbox) != 4
                                or not all(isinstance(v, (int, float)) for v in bbox)):
                            raise ValueError(f"anno {k} 'bbox' must be [x, y, w, h], got {bbox!r}")
                        x, y, w, h = (float(v) for v in bbox)
                        boxes.append([x, y, x + w, y + h])
                except ValueError as e:
                    dropped.append({"id": item_id, "reason": str(e)})
                    continue
                seen.add(item_id)
                rel = f"images/{_safe_name(item_id)}.{ext}"
                with open(os.path.join(out_folder, rel), "wb") as out:
                    out.write(raw)
                yield fmt.Record(id=item_id, image=rel, caption=caption, phrases=phrases,
                                 boxes=boxes, box_format="xyxy_pixels", source=source, split=split)

    name = fmt.ANNOTATIONS_FILE if split == "train" else fmt.VAL_ANNOTATIONS_FILE
    written = fmt.write_annotations(os.path.join(out_folder, name), rows())
    return {"items_written": written, "items_dropped": dropped}


def _xywh_to_xyxy(box: Any, what: str) -> list[float]:
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise ValueError(f"{what} box must be [x, y, w, h], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def _named_box(obj: Any, what: str) -> tuple[str, list[float]]:
    if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], str):
        raise ValueError(f"{what} must be [name, [x, y, w, h]], got {obj!r}")
    return obj[0], _xywh_to_xyxy(obj[1], what)


def import_nsr1k(json_path: str, out_path: str, source: str = "nsr1k") -> dict[str, Any]:
    """LayoutGPT NSR-1K counting or spatial JSON -> layout JSONL at ``out_path``.

    Each entry becomes ``{"id", "image": "", "caption": prompt, "box_format":
    "xyxy_normalized", "annotations": [{"phrase": object name, "box"}], "category":
    "counting" | "spatial", "source"}``, plus ``"prompt_type"`` (NSR-1K's ``type``), for
    spatial entries ``"obj1"``, ``"obj2"`` (names) and ``"relation"``, for counting entries
    ``"num_object"`` and ``"sub_type"`` when present.

    A box with zero width or height (NSR-1K's spatial.val has 19 entries, ids 919-937, whose
    boxes are all ``[0, 0, 0, 0]``) is left out of ``annotations``: the entry is kept (its
    prompt is still scored) with ``"boxes_dropped": n``, and the box is listed in the
    summary's ``"boxes_dropped"`` (``{"id", "reason"}``).

    Returns:
      ``{"items_written", "items_dropped", "boxes_dropped"}``.
    """
    with open(json_path, encoding="utf-8") as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of NSR-1K entries, got {type(entries).__name__}")
    lines, dropped, boxes_dropped = [], [], []
    for n, entry in enumerate(entries):
        item_id = str(entry.get("id", f"entry {n}")) if isinstance(entry, dict) else f"entry {n}"
        try:
            if not isinstance(entry, dict):
                raise ValueError("entry is not an object")
            prompt = entry.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")
            if "object_list" in entry:
                category = "counting"
                objs = entry["object_list"]
                if not isinstance(objs, list):
                    raise ValueError("'object_list' must be a list")
                what = [f"object_list[{k}]" for k in range(len(objs))]
                named = [_named_box(o, w) for o, w in zip(objs, what)]
            elif "obj1" in entry and "obj2" in entry:
                category = "spatial"
                what = ["obj1", "obj2"]
                named = [_named_box(entry["obj1"], "obj1"), _named_box(entry["obj2"], "obj2")]
            else:
                raise ValueError("neither 'object_list' (counting) nor 'obj1'/'obj2' (spatial)")
        except ValueError as e:
            dropped.append({"id": item_id, "reason": str(e)})
            continue
        annotations = []
        for w, (name, box) in zip(what, named):
            if box[2] > box[0] and box[3] > box[1]:
                annotations.append({"phrase": name, "box": box})
            else:
                boxes_dropped.append({"id": item_id, "reason": f"{w} ({name!r}) box has zero "
                                      f"width or height: {_entry_box(entry, w)}"})
        obj = {"id": item_id, "image": "", "caption": prompt, "box_format": "xyxy_normalized",
               "annotations": annotations, "category": category, "source": source}
        if len(annotations) != len(named):
            obj["boxes_dropped"] = len(named) - len(annotations)
        if "type" in entry:
            obj["prompt_type"] = entry["type"]
        if category == "spatial":
            obj["obj1"], obj["obj2"] = named[0][0], named[1][0]
            if "relation" in entry:
                obj["relation"] = entry["relation"]
        if category == "counting":  # comparison prompts ("more/fewer than") need these
            if "num_object" in entry:
                obj["num_object"] = entry["num_object"]
            if "sub-type" in entry:
                obj["sub_type"] = entry["sub-type"]
        lines.append(obj)
    fmt.write_annotations(out_path, lines)
    return {"items_written": len(lines), "items_dropped": dropped, "boxes_dropped": boxes_dropped}


def _entry_box(entry: dict, what: str) -> Any:
    """The raw ``[x, y, w, h]`` of ``obj1`` / ``obj2`` / ``object_list[k]`` in an NSR-1K entry."""
    if what.startswith("object_list["):
        return entry["object_list"][int(what[len("object_list["):-1])][1]
    return entry[what][1]
