"""NSR-1K (LayoutGPT's numerical and spatial reasoning benchmark).

The user supplies LayoutGPT's ``dataset/NSR-1K`` folder (``counting/counting.val.json``,
``spatial/spatial.val.json``) or the json files themselves. Files are read through
``goal_jax.data.importers.import_nsr1k`` (the one NSR-1K parser), which writes the layout
JSONL (``<out_dir>/nsr1k_<file stem>_gt.jsonl``) that this module reads back.

Layouts to score come from a planner (:func:`evaluate`) or from a file of predictions
(:func:`score_predictions`): LayoutGPT's planner outputs (its ``llm_output/<task>/*.json``:
a list of ``{"query_id", "iter", "prompt", "object_list": [[name or null, [x0, y0, x1,
y1]], ...]}``, boxes as fractions of the canvas) or goal_jax's plan JSONL (``scripts/plan.py``
output or ``nsr1k_<task>_planned.jsonl``: ``{"caption", "phrases", "boxes", "id"?}``, the
item found by ``id`` -- ``"<task>-<NSR-1K id>"`` or the bare id -- else by its caption).

Layout metrics (``metrics.counting_score`` / ``metrics.spatial_score``; the GOAL paper's
Table 8 / LayoutGPT's layout evaluation) are computed twice: with LayoutGPT's name matching
(the default, under ``"layout"``; equal to LayoutGPT's scripts) and with goal_jax's stricter
matching (under ``"layout_goal_jax"``), each with the per-``type`` split (counting: template /
mscoco; spatial: template / natural). As LayoutGPT's scripts do, every prediction counts (5
iterations per prompt are 5 predictions), ids missing from the file are not scored (their
number is reported).

With a generator: images from the planned or the ground-truth layouts, written as
``<out_dir>/images/<task>/<id>_<iter>.png`` (the naming LayoutGPT's GLIP scripts read);
CLIP image-prompt similarity (:class:`metrics.ClipScorer`); detection accuracy as LayoutGPT's
GLIP scripts define it, through a detector hook (``detector.GroundingDinoDetector`` as the
open stand-in for GLIP). NSR-1K prompts without a complete ground-truth layout (19 spatial.val
entries have all-zero boxes) are scored as prompts (LayoutGPT scores them) and listed under
``"no_gt_layout"``; images from ``"gt"`` layouts skip them (``"skipped_no_gt_layout"``).

Ground-truth counts: NSR-1K's ``num_object`` and ``sub-type`` when the layout JSONL carries
them (``num_object`` / ``sub_type`` keys), else the per-name counts of ``object_list`` (equal
to ``num_object`` in NSR-1K) with every prompt scored as a plain counting prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence


from goal_jax import distributed
from goal_jax import layout as layout_lib
from goal_jax.evaluation import generate as generate_lib
from goal_jax.evaluation import metrics
from goal_jax.evaluation.matching import GOAL_JAX, LAYOUTGPT, MATCHINGS
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
      prompt_type: NSR-1K's ``type`` ("template", "mscoco", "natural"; "" when absent).
      layout_complete: False when the importer left a zero-area box out (the ground-truth
        layout is then not the prompt's: no images from it).
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
    prompt_type: str = ""
    layout_complete: bool = True


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
    common = dict(prompt_type=str(obj.get("prompt_type") or ""),
                  layout_complete=not obj.get("boxes_dropped") and len(phrases) == len(names))
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
        return NSRItem(str(obj["id"]), task, obj["caption"], layout, counts, comparison,
                       **common)
    relation = obj.get("relation")
    if relation not in metrics.RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {metrics.RELATIONS}")
    if "obj1" in obj and "obj2" in obj:
        obj1, obj2 = str(obj["obj1"]), str(obj["obj2"])
    elif len(names) == 2:
        obj1, obj2 = names
    else:
        raise ValueError(f"spatial entry with {len(names)} objects")
    return NSRItem(str(obj["id"]), task, obj["caption"], layout, obj1=obj1, obj2=obj2,
                   relation=relation, **common)


def layout_scores(item: NSRItem, layout: layout_lib.Layout | None,
                  matching: str = LAYOUTGPT) -> dict[str, Any]:
    """Planner metrics of one item (a missing layout scores as an empty one)."""
    phrases = list(layout.phrases) if layout is not None else []
    boxes = list(layout.boxes) if layout is not None else []
    return prediction_scores(item, phrases, boxes, matching)


def prediction_scores(item: NSRItem, names: Sequence[str | None],
                      boxes: Sequence[Sequence[float]], matching: str = LAYOUTGPT
                      ) -> dict[str, Any]:
    """Layout metrics of one predicted layout given as names (None allowed) and xyxy boxes."""
    if item.task == "counting":
        return metrics.counting_score(item.counts, names, item.comparison, matching)
    return metrics.spatial_score(item.obj1, item.obj2, item.relation, names, boxes, matching)


def _labels(item: NSRItem) -> list[str]:
    return [n for n, _ in item.counts] if item.task == "counting" else [item.obj1, item.obj2]


def detection_scores(item: NSRItem, detections: Sequence) -> dict[str, Any]:
    """Image metrics of one image's detections (LayoutGPT's GLIP rules)."""
    labels = [d.label for d in detections]
    if item.task == "counting":
        return metrics.detection_counting_score(item.counts, labels, item.comparison)
    return metrics.detection_spatial_score(item.obj1, item.obj2, item.relation, labels,
                                           [d.box for d in detections])


def summarize_layouts(task: str, items: Sequence[NSRItem],
                      scores: dict[str, Sequence[dict]]) -> dict[str, Any]:
    """``{"layout": LayoutGPT-matching summary, "layout_goal_jax": ...}`` of per-prediction
    score rows (``scores[matching]``, one per prediction, ``items`` aligned with them), with
    the per-type split."""
    types = [it.prompt_type or "untyped" for it in items]
    summarize = metrics.summarize_counting if task == "counting" else metrics.summarize_spatial
    out = {}
    for m in MATCHINGS:
        out[_LAYOUT_KEY[m]] = dict(summarize(scores[m], types), matching=m)
    return out


_LAYOUT_KEY = {LAYOUTGPT: "layout", GOAL_JAX: "layout_goal_jax"}


# ----------------------------------------------------------------------------------------------
# Prediction files (LayoutGPT's llm_output JSON, goal_jax's plan JSONL).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predicted layout: the NSR-1K item, its iteration, names (None allowed) and xyxy
    boxes."""

    item: NSRItem
    iter: int
    names: tuple[str | None, ...]
    boxes: tuple[tuple[float, float, float, float], ...]


def _box(value: Any, what: str) -> tuple[float, float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{what}: box must be 4 numbers [x0, y0, x1, y1], got {value!r}")
    return tuple(float(v) for v in value)


def read_predictions(path: str, items: Sequence[NSRItem]) -> list[Prediction]:
    """Reads a prediction file (module docstring) for ``items`` (one task).

    Raises:
      ValueError: naming the file, the entry and the problem (an unknown id, a malformed
        object_list...).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictions: no such file: {path}")
    by_id = {it.id: it for it in items}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        return [_llm_output_entry(e, k, path, by_id) for k, e in enumerate(entries)]
    try:
        lines = layout_lib.read_jsonl(path)
    except layout_lib.LayoutError as e:
        raise ValueError(f"predictions: {e}") from None
    task = items[0].task if items else ""
    by_caption: dict[str, list[NSRItem]] = {}
    for it in items:
        by_caption.setdefault(it.prompt.strip(), []).append(it)
    out = []
    for line_no, li in lines:
        where = f"{path} line {line_no}"
        item = None
        if li.id is not None:
            key = str(li.id)
            prefix = next((t for t in TASKS if key.startswith(t + "-")), None)
            if prefix is not None:
                key = key[len(prefix) + 1:]
            item = by_id.get(key) if prefix in (None, task) else None
            if item is None:
                raise ValueError(f"{where}: id {li.id!r} is not an NSR-1K {task} id of the "
                                 "given file")
        else:
            found = by_caption.get((li.caption or "").strip(), [])
            if len(found) != 1:
                raise ValueError(f"{where}: no id and the caption {li.caption!r} matches "
                                 f"{len(found)} NSR-1K prompts (give an 'id')")
            item = found[0]
        out.append(Prediction(item, 0, tuple(li.layout.phrases),
                              tuple(tuple(float(v) for v in b) for b in li.layout.boxes)))
    return out


def _llm_output_entry(entry: Any, k: int, path: str, by_id: dict[str, NSRItem]) -> Prediction:
    where = f"{path} entry {k}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    qid = entry.get("query_id", entry.get("id"))
    if qid is None:
        raise ValueError(f"{where}: no 'query_id'")
    item = by_id.get(str(qid))
    if item is None:
        raise ValueError(f"{where}: query_id {qid!r} is not an id of the NSR-1K file")
    objs = entry.get("object_list")
    if not isinstance(objs, list):
        raise ValueError(f"{where} (query_id {qid}): 'object_list' must be a list, got "
                         f"{type(objs).__name__}")
    names, boxes = [], []
    for j, o in enumerate(objs):
        if not isinstance(o, (list, tuple)) or len(o) != 2 or not (
                o[0] is None or isinstance(o[0], str)):
            raise ValueError(f"{where} (query_id {qid}): object_list[{j}] must be [name or "
                             f"null, [x0, y0, x1, y1]], got {o!r}")
        names.append(o[0])
        boxes.append(_box(o[1], f"{where} (query_id {qid}) object_list[{j}]"))
    it = entry.get("iter", 0)
    if not isinstance(it, int) or isinstance(it, bool):
        raise ValueError(f"{where} (query_id {qid}): 'iter' must be an integer, got {it!r}")
    return Prediction(item, it, tuple(names), tuple(boxes))


def score_predictions(items: Sequence[NSRItem], predictions: Sequence[Prediction],
                      out_dir: str | None = None) -> dict[str, Any]:
    """Layout metrics of a prediction file (one task), both matchings.

    Returns:
      ``{"n", "n_prompts", "prompts_without_prediction", "no_gt_layout", "layout",
      "layout_goal_jax"}`` (n =
      predictions, as LayoutGPT averages); per-prediction rows in
      ``<out_dir>/nsr1k_<task>_prediction_scores.jsonl`` when ``out_dir`` is given.
    """
    if not items:
        raise ValueError("score_predictions: no NSR-1K items")
    task = items[0].task
    scores = {m: [prediction_scores(p.item, p.names, p.boxes, m) for p in predictions]
              for m in MATCHINGS}
    seen = {p.item.id for p in predictions}
    out: dict[str, Any] = {"n": len(predictions), "n_prompts": len(seen),
                           "prompts_without_prediction": sum(it.id not in seen for it in items),
                           "no_gt_layout": [it.id for it in items if not it.layout_complete]}
    out.update(summarize_layouts(task, [p.item for p in predictions], scores))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"nsr1k_{task}_prediction_scores.jsonl"), "w",
                  encoding="utf-8") as f:
            for k, p in enumerate(predictions):
                f.write(json.dumps({"id": p.item.id, "iter": p.iter,
                                    **{_LAYOUT_KEY[m]: scores[m][k] for m in MATCHINGS}}) + "\n")
    return out


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
      ``{task: {"n", "dropped"?, "no_gt_layout", "layout": {...}, "layout_goal_jax": {...},
      "planner_failures", "image": {...}}}`` ("layout": LayoutGPT's matching);
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
            for m in MATCHINGS:
                row[f"{_LAYOUT_KEY[m]}_scores"] = layout_scores(item, layout, m)
        rows.append(row)
    out: dict[str, Any] = {"n": len(items), "planner": getattr(planner, "name", None),
                           "no_gt_layout": [it.id for it in items if not it.layout_complete]}
    if planner is not None:
        out.update(summarize_layouts(
            task, items, {m: [r[f"{_LAYOUT_KEY[m]}_scores"] for r in rows] for m in MATCHINGS}))
        out["planner_failures"] = failures
        if distributed.is_primary():  # several processes: process 0 writes the files
            with open(os.path.join(out_dir, f"nsr1k_{task}_planned.jsonl"), "w",
                      encoding="utf-8") as f:
                for item, layout in zip(items, planned):
                    if layout is not None:
                        f.write(json.dumps(layout_lib.LayoutItem(
                            item.prompt, layout, None, f"{task}-{item.id}").to_dict()) + "\n")
    if generator is not None:
        requests, owners = [], []
        skipped = [it.id for it in items if layout_source == "gt" and not it.layout_complete]
        for k, item in enumerate(items):
            if layout_source == "gt" and not item.layout_complete:
                continue
            layout = item.layout if layout_source == "gt" else (planned[k] or layout_lib.Layout())
            for it in range(n_iter):
                path = os.path.join(out_dir, "images", task, f"{item.id}_{it}.png")
                requests.append(generate_lib.Request(item.prompt, layout, seed + it, path))
                owners.append(k)
        generated = generate_lib.render(requests, generator, overwrite)
        image_out: dict[str, Any] = {"layouts": layout_source, "n_images": len(requests),
                                     "generated": generated, "n_iter": n_iter}
        if layout_source == "gt":
            image_out["skipped_no_gt_layout"] = len(skipped)
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
            image_out["detection"] = (metrics.summarize_detection_counting(det_rows)
                                      if task == "counting"
                                      else metrics.summarize_spatial(det_rows))
        out["image"] = image_out
    if distributed.is_primary():
        with open(os.path.join(out_dir, f"nsr1k_{task}_items.jsonl"), "w",
                  encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return out
