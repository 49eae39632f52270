"""Results table per run: ``<out_dir>/results.md`` and ``<out_dir>/results.json``.

The json holds everything (benchmark, settings, checkpoint, the nested results and the table
rows); the markdown has the settings, the checkpoint and one table row per metric. Rates
(precision, recall, accuracy, IoU) are shown x100 with two decimals as in the papers'
tables; CLIP similarity and MAE as plain numbers.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

_RATES = ("precision", "recall", "accuracy", "iou", "category_accuracy")


def rows_from_nsr(results: dict[str, Any]) -> list[dict[str, Any]]:
    """NSR-1K results (``nsr.evaluate``) -> table rows ``{"task", "metric", "value", "n"}``."""
    rows = []
    for task, res in results.items():
        layout = res.get("layout") or {}
        for key in ("precision", "recall", "accuracy", "iou", "mae"):
            if layout.get(key) is not None:
                rows.append({"task": task, "metric": f"layout {key}", "value": layout[key],
                             "n": layout["n"]})
        if "planner_failures" in res:
            rows.append({"task": task, "metric": "planner failures",
                         "value": res["planner_failures"], "n": res["n"]})
        image = res.get("image") or {}
        if image.get("clip", {}).get("mean") is not None:
            rows.append({"task": task, "metric": f"CLIP similarity ({image['layouts']} layouts)",
                         "value": image["clip"]["mean"], "n": image["clip"]["n"]})
        det = image.get("detection") or {}
        for key in ("accuracy", "category_accuracy"):
            if det.get(key) is not None:
                rows.append({"task": task,
                             "metric": f"detection {key.replace('_', ' ')} "
                                       f"({image['layouts']} layouts)",
                             "value": det[key], "n": det["n"]})
    return rows


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
    if any(metric.split(" (")[0].endswith(r.replace("_", " ")) for r in _RATES):
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
           "results": results, "table": rows,
           "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(benchmark, rows, settings, checkpoint))
    return md_path, json_path
