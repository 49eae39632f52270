"""Multi-object and spatial captions from a COCO captions file, as prompt records.

Input: a captions file in COCO's ``captions_train2017.json`` format that you supply
(``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}``;
``images`` is optional).

Selection rules, applied to the annotations in (image_id, annotation id) order:

1. Whitespace is collapsed and a trailing period removed; captions with fewer than
   ``--min-words`` (5) or more than ``--max-words`` (25) words are skipped.
2. Object mentions: the 80 COCO names, their plurals and synonyms (man, woman, people, bike,
   sofa, ...; ``phrases.object_mentions``), multi-word names first. Each mention counts as the
   number in front of it (``two dogs`` = 2), 2 for a plural, else 1.
3. A caption qualifies when it names at least ``--min-categories`` (2) different COCO categories
   or at least ``--min-objects`` (3) objects in all (``three sheep``), or when it has a spatial
   word (``SPATIAL_WORDS``: left, right, above, below, under, behind, beside, next to, in front
   of, on top of, between, near, ...) and at least two noun phrases.
4. Duplicates (case-insensitive) are skipped, and at most ``--per-image`` (1) caption is taken
   per image (the first qualifying one).
5. ``--num`` (1,000) of the qualifying captions are drawn with ``random.Random(seed)`` and
   written in (image_id, annotation id) order.

Each record: ``id`` ``coco_<annotation id>``, ``prompt`` (the cleaned caption), ``category``
(``spatial`` when it has a spatial word, ``counting`` when a number word >= 2 names objects,
else ``complex``), ``phrases`` (the caption's noun phrases by ``--extractor``, see
``phrases.py``), ``source`` ``coco``, ``coco_image_id`` and ``coco_file_name``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

if __package__ in (None, ""):  # python data_prep/coco_captions.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import common  # noqa: E402
from data_prep import phrases as phrases_lib  # noqa: E402
from data_prep.common import DataPrepError  # noqa: E402

SPATIAL_WORDS = ("left", "right", "above", "below", "under", "underneath", "beneath", "behind",
                 "beside", "next to", "in front of", "on top of", "between", "near", "atop",
                 "over", "inside", "across from", "close to", "alongside")
_SPATIAL = re.compile(r"\b(" + "|".join(re.escape(w) for w in SPATIAL_WORDS) + r")\b", re.I)


def clean_caption(text: str) -> str:
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") else text


def has_spatial_word(caption: str) -> bool:
    return _SPATIAL.search(caption) is not None


def classify(caption: str, min_categories: int = 2, min_objects: int = 3,
             extractor: str = "rules") -> dict | None:
    """Why a cleaned caption qualifies (rule 3) -> {"category", "phrases", ...}, else None."""
    mentions = phrases_lib.object_mentions(caption)
    categories = {m[0] for m in mentions}
    objects = sum(m[1] for m in mentions)
    spatial = has_spatial_word(caption)
    found = phrases_lib.extract(caption, extractor)
    if not (len(categories) >= min_categories or objects >= min_objects
            or (spatial and len(found) >= 2)):
        return None
    if spatial:
        category = "spatial"
    elif any(p.count > 1 for p in found):
        category = "counting"
    else:
        category = "complex"
    return {"category": category, "phrases": [p.to_json() for p in found],
            "object_categories": sorted(categories), "objects": objects}


def select_captions(data: dict, num: int = 1000, seed: int = 0, min_words: int = 5,
                    max_words: int = 25, min_categories: int = 2, min_objects: int = 3,
                    per_image: int = 1, extractor: str = "rules", source: str = "captions file",
                    show_progress: bool = False) -> tuple[list[dict], dict]:
    """Applies the selection rules -> (records, stats)."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataPrepError(f"{source}: expected COCO captions JSON with an 'annotations' list")
    files = {}
    for img in data.get("images", []) or []:
        if isinstance(img, dict) and "id" in img:
            files[img["id"]] = img.get("file_name", "")
    anns = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise DataPrepError(f"{source}: annotation {i} needs 'image_id' and a string 'caption', "
                                f"got {a!r}"[:300])
        anns.append(a)
    anns.sort(key=lambda a: (str(a["image_id"]), str(a.get("id", ""))))
    stats = {"annotations": len(anns), "length": 0, "not_multi_object": 0, "duplicate": 0,
             "per_image_limit": 0, "qualifying": 0}
    seen, per_image_count, pool = set(), {}, []
    for k, a in enumerate(common.progress(anns, len(anns), "captions", not show_progress)):
        caption = clean_caption(a["caption"])
        words = len(caption.split())
        if not min_words <= words <= max_words:
            stats["length"] += 1
            continue
        key = caption.lower()
        if key in seen:
            stats["duplicate"] += 1
            continue
        if per_image_count.get(a["image_id"], 0) >= per_image:
            stats["per_image_limit"] += 1
            continue
        why = classify(caption, min_categories, min_objects, extractor)
        if why is None:
            stats["not_multi_object"] += 1
            continue
        seen.add(key)
        per_image_count[a["image_id"]] = per_image_count.get(a["image_id"], 0) + 1
        ann_id = a.get("id", f"{a['image_id']}_{k}")
        pool.append((k, {
            "id": f"coco_{ann_id}", "category": why["category"], "prompt": caption,
            "phrases": why["phrases"], "source": "coco", "coco_image_id": a["image_id"],
            "coco_file_name": files.get(a["image_id"], ""),
            "object_categories": why["object_categories"],
        }))
    stats["qualifying"] = len(pool)
    if num < len(pool):
        pool = sorted(random.Random(seed).sample(pool, num), key=lambda x: x[0])
    records = [r for _, r in pool]
    stats["selected"] = len(records)
    stats["by_category"] = {c: sum(r["category"] == c for r in records)
                            for c in ("spatial", "counting", "complex")}
    return records, stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.coco_captions", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captions", help="COCO captions JSON (captions_train2017.json format)")
    p.add_argument("--out", required=True, help="output prompts JSONL")
    p.add_argument("--num", type=int, default=1000, help="captions to select (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--min-words", type=int, default=5, help="rule 1 (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=25, help="rule 1 (default: %(default)s)")
    p.add_argument("--min-categories", type=int, default=2, help="rule 3 (default: %(default)s)")
    p.add_argument("--min-objects", type=int, default=3, help="rule 3 (default: %(default)s)")
    p.add_argument("--per-image", type=int, default=1, help="rule 4 (default: %(default)s)")
    p.add_argument("--extractor", choices=("auto", "spacy", "rules"), default="auto",
                   help="noun-phrase extractor (auto = spaCy when installed, else rules)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.captions):
            raise DataPrepError(f"captions file not found: {args.captions}")
        with open(args.captions, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{args.captions}: not valid JSON ({e.msg} at line {e.lineno})")
        records, stats = select_captions(
            data, args.num, args.seed, args.min_words, args.max_words, args.min_categories,
            args.min_objects, args.per_image, args.extractor, args.captions, show_progress=True)
        common.write_jsonl(args.out, records)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(records)} captions to {args.out}; {json.dumps(stats)}")
    if len(records) < args.num:
        print(f"warning: only {len(records)} captions qualified, {args.num} requested",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
