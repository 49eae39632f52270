"""NSR-1K (LayoutGPT's numerical and spatial reasoning benchmark).

The user supplies LayoutGPT's ``dataset/NSR-1K`` folder (``counting/counting.val.json``,
``spatial/spatial.val.json``) or the json files themselves. Files are read through
``goal_jax.data.importers.import_nsr1k`` (the one NSR-1K parser), which writes the layout
JSONL (``<out_dir>/nsr1k_<file stem>_gt.jsonl``) that this module reads back.

:func:`evaluate` computes, per task:

* planner metrics on the planned layouts (``metrics.counting_score`` /
  ``metrics.spatial_score``; the GOAL paper's Table 8 / LayoutGPT's layout evaluation);
* with a generator: images from the planned or the ground-truth layouts, written as
  ``<out_dir>/images/<task>/<id>_<iter>.png`` (the naming LayoutGPT's GLIP scripts read);
  CLIP image-prompt similarity (:class:`metrics.ClipScorer`); detection accuracy through a
  detector hook (``detector.GroundingDinoDetector`` as the open stand-in for GLIP).

Ground-truth counts: NSR-1K's ``num_object`` and ``sub-type`` when the layout JSONL carries
them (``num_object`` / ``sub_type`` keys), else the per-name counts of ``object_list`` (equal
to ``num_object`` in NSR-1K) with every prompt scored as a plain counting prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence


from goal_jax import layout as layout_lib
from goal_jax.evaluation import generate as generate_lib
from goal_jax.evaluation import metrics
from goal_jax.planner import PlannerError

TASKS = ("counting", "spatial")


@dataclasses.dataclass(frozen=True)
class NSRItem:
    """One NSR-1K prompt.

    Attributes:
      id: the entry's id (string).
      task: "counting" or "spatial".
      prompt: the caption.
      layout: the ground-truth layout (boxes clipped to [0, 1]; zero-area boxes left out).
      counts: counting: ``((name, n), ...)``; spatial: ``()``.
      comparison: counting prompt of sub-type "comparison".
      obj1, obj2, relation: spatial: the two object names and "left" / "right" / "top" /
        "bottom" / "next to" (obj1 relative to obj2); "" for counting.
    """

    id: str
    task: str
    prompt: str
    layout: layout_lib.Layout
    counts: tuple[tuple[str, int], ...] = ()
    comparison: bool = False
    obj1: str = ""
    obj2: str = ""
    relation: str = ""


def find_files(path: str, split: str = "val") -> dict[str, str]:
    """``{task: json path}`` from an NSR-1K folder (``<task>/<task>.<split>.json`` or
    ``<task>.<split>.json``) or one json file (its task from its name)."""
    if os.path.isfile(path):
        base = os.path.basename(path)
        task = next((t for t in TASKS if base.startswith(t)), None)
        if task is None:
            raise ValueError(f"{path}: cannot tell the NSR-1K task from the file name "
                             f"(expected {TASKS[0]}.*.json or {TASKS[1]}.*.json)")
        return {task: path}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"NSR-1K: no such file or folder: {path}")
    found = {}
    for task in TASKS:
        for cand in (os.path.join(path, task, f"{task}.{split}.json"),
                     os.path.join(path, f"{task}.{split}.json")):
            if os.path.isfile(cand):
                found[task] = cand
                break
    if not found:
        raise FileNotFoundError(f"NSR-1K: {path} holds neither counting/counting.{split}.json "
                                f"nor spatial/spatial.{split}.json")
    return found


def load(json_path: str, work_dir: str, limit: int | None = None
         ) -> tuple[list[NSRItem], list[dict[str, str]]]:
    """Reads one NSR-1K json through the importer -> (items, dropped entries with reasons).

    The importer's layout JSONL is kept as ``<work_dir>/nsr1k_<file stem>_gt.jsonl``; an
    entry's task is its importer ``category`` (counting: ``object_list``; spatial:
    ``obj1``/``obj2``).
    """
    from goal_jax.data import importers

    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"NSR-1K: no such file: {json_path}")
    os.makedirs(work_dir, exist_ok=True)
    base = os.path.splitext(os.path.basename(json_path))[0]
    gt_path = os.path.join(work_dir, f"nsr1k_{base}_gt.jsonl")
    summary = importers.import_nsr1k(json_path, gt_path)
    dropped = list(summary["items_dropped"])
    items = []
    with open(gt_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            try:
                items.append(item_from_line(obj))
            except ValueError as e:
                dropped.append({"id": str(obj.get("id")), "reason": str(e)})
            if limit is not None and len(items) >= limit:
                break
    return items, dropped


def item_from_line(obj: dict) -> NSRItem:
    """One line of the importer's layout JSONL -> NSRItem (ValueError naming the problem)."""
    task = obj.get("category")
    if task not in TASKS:
        raise ValueError(f"category {task!r} is not one of {TASKS}")
    anns = obj["annotations"]
    names = [a["phrase"] for a in anns]
    phrases, boxes = [], []
    for a in anns:
        x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in a["box"])
        if x1 > x0 and y1 > y0:
            phrases.append(a["phrase"])
            boxes.append((x0, y0, x1, y1))
    layout = layout_lib.Layout.create(phrases, boxes, name=f"NSR-1K {task} id {obj['id']}")
    if task == "counting":
        if isinstance(obj.get("num_object"), list):
            counts = tuple((str(n), int(c)) for n, c in obj["num_object"])
        else:
            counts = tuple((n, names.count(n)) for n in dict.fromkeys(names))
        if not counts:
            raise ValueError("no objects")
        comparison = obj.get("sub_type") == "comparison"
        if comparison and len(counts) != 2:
            raise ValueError(f"comparison prompt with {len(counts)} object names")
        return NSRItem(str(obj["id"]), task, obj["caption"], layout, counts, comparison)
    relation = obj.get("relation")
    if relation not in metrics.RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {metrics.RELATIONS}")
    if len(names) != 2:
        raise ValueError(f"spatial entry with {len(names)} objects")
    return NSRItem(str(obj["id"]), task, obj["caption"], layout, obj1=names[0], obj2=names[1],
                   relation=relation)


def layout_scores(item: NSRItem, layout: layout_lib.Layout | None) -> dict[str, Any]:
    """Planner metrics of one item (a missing layout scores as an empty one)."""
    phrases = list(layout.phrases) if layout is not None else []
    boxes = list(layout.boxes) if layout is not None else []
    if item.task == "counting":
        return metrics.counting_score(item.counts, phrases, item.comparison)
    return metrics.spatial_score(item.obj1, item.obj2, item.relation, phrases, boxes)


def _labels(item: NSRItem) -> list[str]:
    return [n for n, _ in item.counts] if item.task == "counting" else [item.obj1, item.obj2]


def detection_scores(item: NSRItem, detections: Sequence) -> dict[str, Any]:
    """Image metrics of one image's detections."""
    labels = [d.label for d in detections]
    if item.task == "counting":
        return metrics.detection_counting_score(item.counts, labels, item.comparison)
    return metrics.spatial_score(item.obj1, item.obj2, item.relation, labels,
                                 [d.box for d in detections])


def evaluate(items: Sequence[NSRItem], out_dir: str, planner=None, generator=None,
             layout_source: str = "planned", n_iter: int = 1, seed: int = 0,
             clip_scorer: metrics.ClipScorer | None = None, detector=None,
             overwrite: bool = False) -> dict[str, Any]:
    """Runs the benchmark on ``items`` (one or both tasks).

    Args:
      items: from :func:`load`.
      out_dir: where layouts, images and per-item results go.
      planner: an object with ``.plan(caption) -> Layout`` (None: no planner metrics; then
        ``layout_source`` must be "gt").
      generator: the generator hook (None: no images).
      layout_source: "planned" or "gt" -- the layouts images are generated from.
      n_iter: images per prompt (seeds ``seed + iter``).
      clip_scorer, detector: image metrics (each optional).
      overwrite: regenerate images that exist.

    Returns:
      ``{task: {"n", "dropped"?, "layout": {...}, "planner_failures", "image": {...}}}``;
      per-item rows in ``<out_dir>/nsr1k_<task>_items.jsonl``, planned layouts in
      ``<out_dir>/nsr1k_<task>_planned.jsonl`` (``scripts/sample.py --jsonl`` reads them).
    """
    if layout_source not in ("planned", "gt"):
        raise ValueError(f"layout_source must be 'planned' or 'gt', got {layout_source!r}")
    if planner is None and layout_source == "planned":
        raise ValueError("layout_source='planned' needs a planner")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, Any] = {}
    for task in TASKS:
        task_items = [it for it in items if it.task == task]
        if task_items:
            results[task] = _evaluate_task(task, task_items, out_dir, planner, generator,
                                           layout_source, n_iter, seed, clip_scorer, detector,
                                           overwrite)
    return results


def _evaluate_task(task, items, out_dir, planner, generator, layout_source, n_iter, seed,
                   clip_scorer, detector, overwrite) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    planned: list[layout_lib.Layout | None] = []
    failures = 0
    for item in items:
        row: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
        if planner is not None:
            try:
                layout = planner.plan(item.prompt)
            except PlannerError as e:
                layout, failures = None, failures + 1
                row["planner_error"] = str(e)
            planned.append(layout)
            row["planned"] = layout.to_dict() if layout is not None else None
            row["layout_scores"] = layout_scores(item, layout)
        rows.append(row)
    out: dict[str, Any] = {"n": len(items), "planner": getattr(planner, "name", None)}
    if planner is not None:
        scores = [r["layout_scores"] for r in rows]
        out["layout"] = (metrics.summarize_counting(scores) if task == "counting"
                         else metrics.summarize_spatial(scores))
        out["planner_failures"] = failures
        with open(os.path.join(out_dir, f"nsr1k_{task}_planned.jsonl"), "w",
                  encoding="utf-8") as f:
            for item, layout in zip(items, planned):
                if layout is not None:
                    f.write(json.dumps(layout_lib.LayoutItem(
                        item.prompt, layout, None, f"{task}-{item.id}").to_dict()) + "\n")
    if generator is not None:
        requests, owners = [], []
        for k, item in enumerate(items):
            layout = item.layout if layout_source == "gt" else (planned[k] or layout_lib.Layout())
            for it in range(n_iter):
                path = os.path.join(out_dir, "images", task, f"{item.id}_{it}.png")
                requests.append(generate_lib.Request(item.prompt, layout, seed + it, path))
                owners.append(k)
        generated = generate_lib.render(requests, generator, overwrite)
        image_out: dict[str, Any] = {"layouts": layout_source, "n_images": len(requests),
                                     "generated": generated, "n_iter": n_iter}
        for k in range(len(items)):
            rows[k]["images"] = []
        clips, det_rows = [], []
        for start, images in generate_lib.load_images([r.path for r in requests]):
            chunk = requests[start:start + len(images)]
            clip = (clip_scorer.score(images, [r.caption for r in chunk])
                    if clip_scorer is not None else None)
            for j, req in enumerate(chunk):
                k = owners[start + j]
                entry: dict[str, Any] = {"path": os.path.relpath(req.path, out_dir),
                                         "seed": req.seed}
                if clip is not None:
                    entry["clip"] = float(clip[j])
                    clips.append(float(clip[j]))
                if detector is not None:
                    dets = detector(images[j], _labels(items[k]))
                    score = detection_scores(items[k], dets)
                    entry["detections"] = [dataclasses.asdict(d) for d in dets]
                    entry["detection_scores"] = score
                    det_rows.append(score)
                rows[k]["images"].append(entry)
        if clip_scorer is not None:
            image_out["clip"] = dataclasses.asdict(metrics.Summary.of(clips))
        if detector is not None:
            if task == "counting":
                image_out["detection"] = {
                    "accuracy": metrics.mean_of(det_rows, "accuracy"),
                    "category_accuracy": (sum(r["correct_categories"] for r in det_rows)
                                          / max(1, sum(r["categories"] for r in det_rows))),
                    "n": len(det_rows)}
            else:
                image_out["detection"] = metrics.summarize_spatial(det_rows)
        out["image"] = image_out
    with open(os.path.join(out_dir, f"nsr1k_{task}_items.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out
