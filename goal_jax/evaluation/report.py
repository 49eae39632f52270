"""Results table per run: ``<out_dir>/results.md`` and ``<out_dir>/results.json``.

The json holds everything (benchmark, settings, checkpoint, the nested results and the table
rows; for NSR-1K also the headline numbers x100 at the top level, :func:`nsr_summary`:
``"counting"`` / ``"spatial"`` with LayoutGPT's matching, ``"counting_goal_jax"`` /
``"spatial_goal_jax"`` with goal_jax's); the markdown has the settings, the checkpoint and one table row per metric. Rates
(precision, recall, accuracy, IoU) are shown x100 with two decimals as in the papers'
tables; CLIP similarity and MAE as plain numbers.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

_RATES = ("precision", "recall", "accuracy", "iou", "category_accuracy")


_MATCHING_LABEL = {"layout": "LayoutGPT matching", "layout_goal_jax": "goal_jax matching"}


def _layout_rows(task: str, key: str, layout: dict[str, Any], prefix: str = ""
                 ) -> list[dict[str, Any]]:
    label = _MATCHING_LABEL[key]
    rows = []
    counted = layout.get("n_counted", layout["n"])
    for metric in ("precision", "recall", "iou", "mae", "accuracy"):
        if layout.get(metric) is None:
            continue
        n = layout["n"] if metric == "accuracy" else counted
        rows.append({"task": task, "metric": f"{prefix}layout {metric} ({label})",
                     "value": layout[metric], "n": n})
    if "missing" in layout:
        rows.append({"task": task, "metric": f"{prefix}layout missing ({label})",
                     "value": layout["missing"], "n": layout["n"]})
    return rows


def rows_from_nsr(results: dict[str, Any]) -> list[dict[str, Any]]:
    """NSR-1K results (``nsr.evaluate`` / ``nsr.score_predictions``) -> table rows
    ``{"task", "metric", "value", "n"}``: layout metrics with LayoutGPT's matching (the
    default), then with goal_jax's matching, then per prompt type; n is each metric's own
    number of predictions (precision / recall / IoU / MAE leave comparison prompts out)."""
    rows = []
    for task, res in results.items():
        for key in ("layout", "layout_goal_jax"):
            if res.get(key):
                rows += _layout_rows(task, key, res[key])
        for key in ("layout", "layout_goal_jax"):
            for ptype, sub in (res.get(key) or {}).get("by_type", {}).items():
                rows += _layout_rows(task, key, sub, prefix=f"{ptype}: ")
        if res.get("prompts_without_prediction"):
            rows.append({"task": task, "metric": "prompts without a prediction (not scored)",
                         "value": res["prompts_without_prediction"],
                         "n": res["n_prompts"] + res["prompts_without_prediction"]})
        if "planner_failures" in res:
            rows.append({"task": task, "metric": "planner failures",
                         "value": res["planner_failures"], "n": res["n"]})
        if res.get("no_gt_layout"):
            rows.append({"task": task, "metric": "prompts without a ground-truth layout "
                         "(zero-area boxes; still scored)", "value": len(res["no_gt_layout"]),
                         "n": res.get("n_prompts", res["n"]) + res.get(
                             "prompts_without_prediction", 0)})
        image = res.get("image") or {}
        if image.get("skipped_no_gt_layout"):
            rows.append({"task": task, "metric": "prompts without images (no ground-truth "
                         "layout)", "value": image["skipped_no_gt_layout"], "n": res["n"]})
        if image.get("clip", {}).get("mean") is not None:
            rows.append({"task": task, "metric": f"CLIP similarity ({image['layouts']} layouts)",
                         "value": image["clip"]["mean"], "n": image["clip"]["n"]})
        det = image.get("detection") or {}
        for key, name in (("accuracy", "detection accuracy, LayoutGPT's GLIP rule"),
                          ("image_accuracy", "detection accuracy, all counts right")):
            if det.get(key) is not None:
                n = det["categories"] if key == "accuracy" and "categories" in det else det["n"]
                rows.append({"task": task, "metric": f"{name} ({image['layouts']} layouts)",
                             "value": det[key], "n": n})
        if det.get("missing") is not None:
            rows.append({"task": task, "metric": f"detection missing ({image['layouts']} "
                         "layouts)", "value": det["missing"], "n": det["n"]})
    return rows


def nsr_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (x100; MAE as is): ``{"counting": {"precision", "recall",
    "accuracy", "iou", "mae", "n"}, "spatial": {"accuracy", "missing", "n"}}`` with LayoutGPT's
    matching, and the same under ``"<task>_goal_jax"`` with goal_jax's."""
    out = {}
    for task, res in results.items():
        for key, suffix in (("layout", ""), ("layout_goal_jax", "_goal_jax")):
            layout = res.get(key)
            if not layout:
                continue
            keep = (("precision", "recall", "accuracy", "iou") if task == "counting"
                    else ("accuracy",))
            d = {k: 100 * layout[k] for k in keep if layout.get(k) is not None}
            if task == "counting" and layout.get("mae") is not None:
                d["mae"] = layout["mae"]
            d.update({k: layout[k] for k in ("missing", "n", "n_counted") if k in layout})
            d["matching"] = layout.get("matching")
            out[task + suffix] = d
    return out


def rows_from_compbench(results: dict[str, Any]) -> list[dict[str, Any]]:
    """T2I-CompBench results (per prompt file: ``compbench.run``) -> table rows."""
    rows = []
    for name, res in results.items():
        task = res.get("category") or name
        rows.append({"task": task, "metric": "images", "value": res.get("images", 0),
                     "n": res["prompts"]})
        rows.append({"task": task, "metric": "planner failures",
                     "value": res["planner_failures"], "n": res["prompts"]})
        if res.get("clip", {}).get("mean") is not None:
            rows.append({"task": task, "metric": "CLIPScore", "value": res["clip"]["mean"],
                         "n": res["clip"]["n"]})
    return rows


def _fmt(metric: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if any(metric.split(" (")[0].endswith(r.replace("_", " ")) for r in _RATES) or (
            metric.startswith("detection accuracy")):
        return f"{100 * value:.2f}"
    return f"{value:.4f}"


def markdown(benchmark: str, rows: Sequence[dict[str, Any]], settings: dict[str, Any],
             checkpoint: str | None) -> str:
    """The markdown report."""
    out = [f"# {benchmark} results", "", f"- checkpoint: `{checkpoint or 'none'}`"]
    for key in sorted(settings):
        out.append(f"- {key}: `{json.dumps(settings[key])}`")
    out += ["", "Rates are x100.", "", "| task | metric | value | n |", "|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['task']} | {r['metric']} | {_fmt(r['metric'], r['value'])} "
                   f"| {r['n']} |")
    return "\n".join(out) + "\n"


def write(out_dir: str, benchmark: str, results: dict[str, Any], settings: dict[str, Any],
          checkpoint: str | None = None) -> tuple[str, str]:
    """Writes ``results.md`` and ``results.json`` into ``out_dir``; returns their paths.

    Args:
      benchmark: "NSR-1K" or "T2I-CompBench".
      results: ``nsr.evaluate`` output, or ``{prompt file name: compbench.run output}``.
      settings: everything that defines the run (planner, sampler options, seeds...).
      checkpoint: the model evaluated (pipeline folder and training checkpoint).
    """
    if benchmark == "NSR-1K":
        rows = rows_from_nsr(results)
    elif benchmark == "T2I-CompBench":
        rows = rows_from_compbench(results)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    os.makedirs(out_dir, exist_ok=True)
    doc = {"benchmark": benchmark, "checkpoint": checkpoint, "settings": settings,
           **(nsr_summary(results) if benchmark == "NSR-1K" else {}),
           "results": results, "table": rows,
           "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(benchmark, rows, settings, checkpoint))
    return md_path, json_path
