"""results.json -> RESULTS.md (+ loss_curves.png), from results.json alone.

    python -m experiments.shapes_world.report experiments/shapes_world/results.json

Tables (the oracle's graded score x 100, mean ± std over seeds, per T2I-CompBench-like
category; the all-or-nothing verdicts and per-box rates as well) in the
layout of the paper's Table 1 (base vs LDM-only vs GOAL), Table 5 (which losses), Table 6
(DSAlign local / global), Table 7 (MAAlign layer), the α/β sweep, the world-CLIP second
opinion, the loss-term scales at the base world, and a closing note with GOAL − LDM-only per
category and its standard error. The picture grid (``grid.png``) is written by the driver
(it needs the samples); the loss curves are drawn here from the curves stored in the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "complex")
CURVE_TERMS = ("total", "ldm", "dsa", "maa")
TABLES = (
    ("Table 1 analogue: base world vs fine-tuning (T2I-CompBench-like categories)",
     (("ground truth (world renders)", "ground_truth"), ("base world (GLIGEN)", "base"),
      ("LDM-only fine-tune", "ldm_only"), ("GOAL", "goal"))),
    ("Table 5 analogue: which alignment losses",
     (("L_LDM", "ldm_only"), ("L_LDM + DSAlign", "no_maalign"),
      ("L_LDM + MAAlign", "no_dsalign"), ("L_LDM + DSAlign + MAAlign (GOAL)", "goal"))),
    ("Table 6 analogue: DSAlign parts (MAAlign on)",
     (("D_local only", "dsalign_local"), ("D_global only", "dsalign_global"),
      ("D_local + D_global (GOAL)", "goal"))),
    ("Table 7 analogue: MAAlign layer (8x8 cross-attention: the world U-Net's only grid)",
     (("encoder (down) 8x8", "maalign_down8"), ("mid block 8x8", "maalign_mid8"),
      ("decoder (up) 8x8 (GOAL; the paper's decoder choice)", "goal"))),
    ("Trainable set: the paper's (fusers + attn1 + attn2) vs every U-Net parameter",
     (("LDM-only, the paper's set", "ldm_only"), ("GOAL, the paper's set", "goal"),
      ("LDM-only, every U-Net parameter", "ldm_only_unet"),
      ("GOAL, every U-Net parameter", "goal_unet"))),
)


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


def grounding_words(beta: float) -> str:
    """How much of the sampling is grounded, in words (GLIGEN's scheduled sampling β)."""
    if beta >= 1.0:
        return "grounding (the boxes' gated self-attention) on every step"
    return (f"grounding on the first {100 * beta:g} % of the steps only (GLIGEN's scheduled "
            f"sampling, β = {beta:g}; the rest sampled from the caption alone)")


def stats(values) -> dict:
    """{"mean", "std" (sample, ddof=1; 0 for one value), "n"} of a list of numbers."""
    v = np.asarray([float(x) for x in values], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def difference(a: dict, b: dict) -> dict:
    """a − b of two :func:`stats` with the standard error sqrt(s_a²/n_a + s_b²/n_b) (None
    when either has fewer than two seeds) and whether |a − b| > 2 SE."""
    if not a["n"] or not b["n"]:
        return {"diff": None, "se": None, "significant": None}
    diff = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return {"diff": diff, "se": None, "significant": None}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"diff": diff, "se": se, "significant": bool(abs(diff) > 2 * se)}


def arm_stats(results: dict, arm: str, metric: str = "score") -> dict:
    """{category: stats over seeds} of ``arm`` (a trained arm, or the references "base" /
    "ground_truth", which have one value)."""
    if arm in results.get("references", {}):
        ev = results["references"][arm]
        return {c: stats([ev["categories"][c][metric]]) for c in CATEGORIES
                if c in ev["categories"]}
    runs = [r for r in results["runs"] if r["arm"] == arm and r.get("eval")]
    out = {}
    for c in CATEGORIES:
        vals = [r["eval"]["categories"][c][metric] for r in runs
                if c in r["eval"]["categories"]]
        if vals:
            out[c] = stats(vals)
    return out


def goal_family(results: dict) -> list[str]:
    """The arms with an alignment term on (α > 0 or β > 0), in results["arms"] order."""
    return [name for name, a in results["arms"].items()
            if a["config"].get("train.alpha") or a["config"].get("train.beta")]


def mean_score(results: dict, arm: str) -> float | None:
    """The arm's graded oracle score (all categories) averaged over its evaluated seeds."""
    vals = [r["eval"]["score"] for r in results["runs"] if r["arm"] == arm and r.get("eval")]
    return float(np.mean(vals)) if vals else None


def best_goal_arm(results: dict) -> str | None:
    """The GOAL-family arm (:func:`goal_family`) with the best mean graded oracle score over
    seeds (the first in results["arms"] order on a tie); None when none is evaluated."""
    scored = [(mean_score(results, a), -i, a) for i, a in enumerate(goal_family(results))
              if mean_score(results, a) is not None]
    return max(scored)[2] if scored else None


def best_seed(results: dict, arm: str) -> int:
    """The seed of ``arm`` with the best graded oracle score (the lowest seed on a tie)."""
    runs = [r for r in results["runs"] if r["arm"] == arm and r.get("eval")]
    if not runs:
        raise ValueError(f"arm {arm!r} has no evaluated run in the results")
    return max(runs, key=lambda r: (r["eval"]["score"], -r["seed"]))["seed"]


def _has(results: dict, arm: str) -> bool:
    return arm in results.get("references", {}) or any(
        r["arm"] == arm and r.get("eval") for r in results["runs"])


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------


def _cell(s: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s["mean"] is None:
        return "-"
    if s["n"] > 1:
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}"


def _table(results: dict, rows, metric: str = "score", scale: float = 100.0,
           digits: int = 1) -> list[str]:
    cats = [c for c in CATEGORIES if any(c in arm_stats(results, a, metric)
                                        for _, a in rows if _has(results, a))]
    lines = ["| model | seeds | " + " | ".join(cats) + " |",
             "|---|---|" + "---|" * len(cats)]
    for label, arm in rows:
        if not _has(results, arm):
            continue
        s = arm_stats(results, arm, metric)
        n = max((x["n"] for x in s.values()), default=0)
        seeds = "-" if arm in results.get("references", {}) else str(n)
        lines.append(f"| {label} | {seeds} | " + " | ".join(
            _cell(s.get(c), scale, digits) for c in cats) + " |")
    return lines


# The ablations' comparisons: (label, arm, the arm it is compared with).
ABLATION_DIFFS = (
    ("DSAlign only − LDM only (Table 5)", "no_maalign", "ldm_only"),
    ("MAAlign only − LDM only (Table 5)", "no_dsalign", "ldm_only"),
    ("GOAL − DSAlign only (Table 5)", "goal", "no_maalign"),
    ("GOAL − MAAlign only (Table 5)", "goal", "no_dsalign"),
    ("D_local only − GOAL (Table 6)", "dsalign_local", "goal"),
    ("D_global only − GOAL (Table 6)", "dsalign_global", "goal"),
    ("MAAlign mid 8x8 − decoder 8x8 (Table 7)", "maalign_mid8", "goal"),
    ("MAAlign encoder 8x8 − decoder 8x8 (Table 7)", "maalign_down8", "goal"),
    ("LDM-only, every U-Net parameter − the paper's set", "ldm_only_unet", "ldm_only"),
    ("GOAL − LDM-only, every U-Net parameter", "goal_unet", "ldm_only_unet"),
)


def _diff_cell(d: dict) -> str:
    if d["diff"] is None:
        return "-"
    if d["se"] is None:
        return f"{100 * d['diff']:+.1f}"
    return f"{100 * d['diff']:+.1f} ± {100 * d['se']:.1f}" + ("*" if d["significant"] else "")


def _ablation_diff_lines(results: dict) -> list[str]:
    """The ABLATION_DIFFS whose two arms are evaluated, per category (empty when none is)."""
    rows = [(label, a, b) for label, a, b in ABLATION_DIFFS
            if _has(results, a) and _has(results, b)]
    if not rows:
        return []
    lines = ["## Ablation differences", "",
             ("Graded score × 100: difference of the two arms' seed means ± its standard error "
              "(sqrt(s²_a/n_a + s²_b/n_b); none with one seed); * beyond 2 SE."), "",
             "| comparison | seeds | " + " | ".join(CATEGORIES) + " |",
             "|---|---|" + "---|" * len(CATEGORIES)]
    for label, a, b in rows:
        sa, sb = arm_stats(results, a), arm_stats(results, b)
        n = min(max((x["n"] for x in s.values()), default=0) for s in (sa, sb))
        cells = [_diff_cell(difference(sa[c], sb[c])) if c in sa and c in sb else "-"
                 for c in CATEGORIES]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _sweep_rows(results: dict) -> list[tuple[str, str]]:
    rows = []
    for name, arm in results["arms"].items():
        if name == "goal" or name.startswith(("goal_x", "goal_bal")):
            cfg = arm["config"]
            rows.append((f"α = {cfg['train.alpha']:g}, β = {cfg['train.beta']:g} ({name})",
                         name))
    rows.sort(key=lambda r: results["arms"][r[1]]["config"]["train.alpha"])
    return [("α = β = 0 (LDM-only)", "ldm_only")] + rows


def _scales_lines(scales: dict | None, grid: int) -> list[str]:
    if not scales:
        return ["(not measured)"]
    paper = scales["paper"]
    lines = [(f"Measured on {scales['batches']} batches of {scales.get('batch_size')} items of "
             "the fine-tuning set at the base world, each at t drawn from each third of the "
             "time range; |∇| = global norm of the term's gradient w.r.t. the trainable "
             "parameters."), "",
             ("| MAAlign part | t range | L_LDM | L_DSA (local / global) | L_MAA (in / out) | "
             "\\|∇L_LDM\\| | \\|∇L_DSA\\| | \\|∇L_MAA\\| |"), "|---|---|---|---|---|---|---|---|"]
    for part, p in scales["parts"].items():
        for row in p["by_t"] + [dict(p["overall"], t_range="all")]:
            tr = row["t_range"] if isinstance(row["t_range"], str) else \
                f"[{row['t_range'][0]}, {row['t_range'][1]})"
            lines.append(
                f"| {part} {grid}x{grid} | {tr} | {row['ldm']['value']:.4g} | {row['dsa']['value']:.4g} "
                f"({row['dsa_local']['value']:.4g} / {row['dsa_global']['value']:.4g}) | "
                f"{row['maa']['value']:.4g} ({row['maa_in']['value']:.4g} / "
                f"{row['maa_out']['value']:.4g}) | {row['ldm']['grad_norm']:.4g} | "
                f"{row['dsa']['grad_norm']:.4g} | {row['maa']['grad_norm']:.4g} |")
    lines.append("")
    for part, p in scales["parts"].items():
        ba, bb = p["balance_alpha"], p["balance_beta"]
        lines.append(
            f"* {part} {grid}x{grid}: α = {ba:.3g} would make α|∇L_DSA| = |∇L_LDM| (the paper's α = "
            f"{paper['alpha']:g} gives {paper['alpha'] / ba:.3g} of it); β = {bb:.3g} would "
            f"make β|∇L_MAA| = |∇L_LDM| (the paper's β = {paper['beta']:g} gives "
            f"{paper['beta'] / bb:.3g} of it)." if ba and bb else
            f"* {part} {grid}x{grid}: a term has zero gradient (balance α {ba}, β {bb}).")
    return lines


def _closing(results: dict) -> list[str]:
    """GOAL (the paper's weights) − LDM-only, then the best GOAL-family arm − LDM-only when
    that is another arm (alone when ``goal`` is not evaluated)."""
    best = best_goal_arm(results)
    if not (_has(results, "ldm_only") and best):
        return ["GOAL and LDM-only are not both evaluated yet."]
    lines = _versus(results, "goal") if _has(results, "goal") else []
    if best != "goal":
        intro = (f"The best GOAL-family arm by mean score, `{best}`, against LDM-only:"
                 if lines else f"`goal` (the paper's weights) is not evaluated; the best "
                 f"GOAL-family arm by mean score, `{best}`, against LDM-only:")
        lines += ([""] if lines else []) + [intro, ""] + _versus(results, best)
    return lines


def _versus(results: dict, arm: str) -> list[str]:
    """The closing table of ``arm`` − LDM-only per category, and the issue's target line."""
    g, l = arm_stats(results, arm), arm_stats(results, "ldm_only")
    name = "GOAL" if arm == "goal" else arm
    lines = [(f"{name} − LDM-only, graded oracle score × 100 (difference of the seed means; "
              f"SE = sqrt(s²_{name}/n + s²_LDM/n); 'yes' when |Δ| > 2 SE):"), "",
             f"| category | {name} | LDM-only | Δ | SE | > 2 SE |", "|---|---|---|---|---|---|"]
    diffs = {}
    for c in CATEGORIES:
        if c not in g or c not in l:
            continue
        d = diffs[c] = difference(g[c], l[c])
        se = "-" if d["se"] is None else f"{100 * d['se']:.1f}"
        sig = "-" if d["significant"] is None else ("yes" if d["significant"] else "no")
        lines.append(f"| {c} | {_cell(g[c])} | {_cell(l[c])} | {100 * d['diff']:+.1f} | {se} "
                     f"| {sig} |")
    lines.append("")
    col = diffs.get("color")
    if col and col["se"] is not None:
        hit = col["diff"] >= 0.05 and col["significant"]
        worse = [c for c in ("shape", "texture") if c in diffs and diffs[c]["significant"]
                 and diffs[c]["diff"] < 0]
        lines.append(
            f"Target (colour +5 points beyond 2 SE, shape and texture not worse): colour "
            f"Δ = {100 * col['diff']:+.1f} ± {100 * col['se']:.1f} -> "
            f"{'met' if hit else 'NOT met'}; shape/texture significantly worse: "
            f"{', '.join(worse) if worse else 'none'}.")
    else:
        lines.append("Fewer than two seeds per arm: no standard error, so no claim either way.")
    return lines


BOX_FIELDS = (("present", "object present"), ("color_in_box", "named colour in box"),
              ("shape", "shape (found)"), ("texture", "texture (found)"),
              ("correct", "all named right"), ("iou", "IoU"))


def _box_table(results: dict, rows) -> list[str]:
    """Per-box oracle rates over all layouts (mean ± std over seeds)."""
    lines = ["| model | seeds | " + " | ".join(label for _, label in BOX_FIELDS) + " |",
             "|---|---|" + "---|" * len(BOX_FIELDS)]
    for label, arm in rows:
        if arm in results.get("references", {}):
            evs, seeds = [results["references"][arm]], "-"
        else:
            evs = [r["eval"] for r in results["runs"] if r["arm"] == arm and r.get("eval")]
            seeds = str(len(evs))
        if not evs:
            continue
        cells = [_cell(stats([e["boxes"][k] for e in evs if e["boxes"].get(k) is not None]))
                 for k, _ in BOX_FIELDS]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _attention_lines(att: dict | None, grid: int) -> list[str]:
    if not att:
        return []
    lines = ["## Attention maps per phrase (Figure 4 analogue)", "",
             (f"MAAlign's layer (decoder {grid}x{grid} cross-attention, mean over heads and "
              f"blocks) on {len(att['layouts'])} two-object colour / shape layouts: the world's "
              f"render of each layout noised to t = {att['t']} (mean over {att['draws']} noise "
              "draws; the same input for every model). In-box: the share of each phrase's "
              "attention mass inside its own box (mean over phrases and layouts); chance: the "
              "same share for a uniform map (the box's share of the cells)."), "",
             "| model | in-box attention (%) | chance (%) |", "|---|---|---|"]
    for m in att["models"]:
        cell = "-" if m["in_box"] is None else f"{100 * m['in_box']:.1f}"
        lines.append(f"| {m['label']} | {cell} | {100 * m['chance']:.1f} |")
    lines += ["", f"![attention maps]({att['picture']})", ""]
    return lines


def markdown(results: dict) -> str:
    size, ev, ft = results["size"], results["eval"], results["finetune_set"]
    lines = [
        "# GOAL in the shapes world: does DSAlign + MAAlign beat LDM-only fine-tuning?", "",
        (f"Generated by `python -m experiments.shapes_world.report` from `results.json` "
        f"(size `{size['name']}`; command `{results['command']}`)."), "",
        "## Set-up", "",
        f"* Base world: `{results['world']['path']}` (GLIGEN pipeline + world CLIP).",
        (f"* Fine-tuning set: {ft['items']} items of the world's `finetune` split "
        f"({', '.join(f'{c} {n}' for c, n in ft['quotas'].items())}); evaluation layouts: "
        f"{ev['per_category']} per category from the `eval` split "
        f"({ft['disjoint']['shared_layouts']} layouts shared with the fine-tuning set; "
        f"{ft['disjoint']['eval_captions_in_finetune']} of {ft['disjoint']['eval_layouts']} "
        "evaluation captions also occur there with other boxes)."),
        (f"* Every arm: scripts/train.py `configs/goal.py:demo` + explicit overrides, "
        f"{size['steps']} steps of batch {size['batch_size']}, AdamW lr "
        f"{size['learning_rate']:g} constant, trainable: the paper's fusers + attn1 + attn2 "
        "(the `_unet` arms: every U-Net parameter); "
        f"seeds {', '.join(str(s) for s in size['seeds'])} (train.seed = data.seed)."),
        (f"* Sampling: DDIM {ev['settings']['num_steps']} steps, CFG "
        f"{ev['settings']['guidance_scale']:g}, {grounding_words(ev['settings']['beta'])}; "
        "the same layouts and noise seeds for every arm."),
        ("* Metric: the world oracle's graded score (pixels only; goal_jax.evaluation.oracle) "
        "× 100, mean ± std over seeds: per layout, colour / shape / texture: the share of boxes "
        "holding an object with the named attribute; complex: the share of boxes with every "
        "named attribute right; spatial: mean of (first object right, second object right, "
        "relation holds); counting: 1 − |count − n| / n (the analogue of T2I-CompBench's "
        "averaged per-image scores). The all-or-nothing verdicts (every check of the layout "
        "passes) follow in their own table. Second opinion: world-CLIP image–caption cosine "
        "(× 100), which DSAlign optimises directly, so it is not independent."), ""]
    table1 = {a for _, a in TABLES[0][1]}
    for k, (title, rows) in enumerate(TABLES):
        # An ablation table is shown when it holds two arms, one of them not in Table 1.
        if sum(_has(results, a) for _, a in rows) < 2 or (
                k and not any(_has(results, a) for _, a in rows if a not in table1)):
            continue
        lines += [f"## {title}", ""] + _table(results, rows) + [""]
    lines += _ablation_diff_lines(results)
    sweep = _sweep_rows(results)
    # Shown when it holds more than Table 1 does (an arm other than LDM-only and GOAL).
    if sum(_has(results, a) for _, a in sweep) >= 2 and any(
            _has(results, a) for _, a in sweep if a not in ("ldm_only", "goal")):
        lines += ["## α / β sweep (GOAL, MAAlign on the decoder)", "",
                  ("goal_x<f>: f x the paper's weights; goal_bal<r>: each alignment term's "
                  "gradient norm r x the LDM term's at the base world (see the loss scales)."), ""] + _table(results, sweep) + [""]
    all_rows = [("ground truth", "ground_truth"), ("base world", "base")] + [
        (name, name) for name in results["arms"]]
    lines += ["## All-or-nothing verdicts (every check of a layout passes) × 100", ""] + _table(
        results, all_rows, metric="oracle") + [""]
    lines += ["## Per box, all categories (× 100)", ""] + _box_table(results, all_rows) + [""]
    lines += ["## Second opinion: world-CLIP score (cosine × 100)", ""] + _table(
        results, all_rows, metric="clip") + [""]
    lines += ["## Scale of the loss terms at the base world", ""] + _scales_lines(
        results.get("scales"), results["world"]["maa_resolution"]) + [""]
    lines += ["## Pictures", "",
              (f"Same layouts across arms (seed {size['seeds'][0]} of each arm; boxes drawn): "
              f"![grid]({results['pictures']['grid']})"), "",
              (f"Loss curves (mean over seeds of each logged interval): "
              f"![loss curves]({results['pictures']['loss_curves']})"), ""]
    lines += _attention_lines(results.get("attention"), results["world"]["maa_resolution"])
    lines += ["## Closing note", ""] + _closing(results) + [""]
    t = results.get("timing", {})
    if t:
        lines += ["## Cost", "", (f"Training {t.get('train_s', 0) / 60:.1f} min, evaluation "
                  f"{t.get('eval_s', 0) / 60:.1f} min, loss scales "
                  f"{t.get('scales_s', 0) / 60:.1f} min on `{t.get('devices')}`; mean "
                  f"{t.get('train_step_s_mean', float('nan')):.3f} s per training step."), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Loss curves (PIL: no plotting dependency).
# ----------------------------------------------------------------------------------------------

_LINE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34),
                (23, 190, 207))


def mean_curves(results: dict) -> dict:
    """{arm: {term: [(step, mean over seeds)]}} from the runs' stored curves (steps logged by
    every seed of the arm)."""
    out = {}
    for arm in results["arms"]:
        curves = [r["train"]["curve"] for r in results["runs"]
                  if r["arm"] == arm and r.get("train")]
        if not curves:
            continue
        steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves]))
        out[arm] = {}
        for term in CURVE_TERMS:
            by_step = [{p["step"]: p.get(term) for p in c} for c in curves]
            out[arm][term] = [(s, float(np.mean([b[s] for b in by_step]))) for s in steps
                              if all(b[s] is not None for b in by_step)]
    return out


def plot_loss_curves(results: dict, path: str, panel: tuple[int, int] = (360, 240)) -> str:
    """Writes a PNG: one panel per term (total, ldm, dsa, maa), one line per arm."""
    from PIL import Image, ImageDraw, ImageFont

    curves = mean_curves(results)
    font = ImageFont.load_default()
    pw, ph = panel
    legend_h = 16 * (len(curves) // 3 + 1) + 8
    img = Image.new("RGB", (2 * pw, 2 * ph + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    colors = {arm: _LINE_COLORS[i % len(_LINE_COLORS)] for i, arm in enumerate(curves)}
    for k, term in enumerate(CURVE_TERMS):
        ox, oy = (k % 2) * pw, (k // 2) * ph
        left, top, right, bottom = ox + 50, oy + 20, ox + pw - 10, oy + ph - 25
        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((ox + pw // 2 - 20, oy + 4), f"L_{term}" if term != "total" else "total",
                  fill=(0, 0, 0), font=font)
        pts = [(s, v) for c in curves.values() for s, v in c[term]]
        if not pts:
            draw.text((left + 10, top + 10), "(no data)", fill=(0, 0, 0), font=font)
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
        draw.text((ox + 2, top), f"{y1:.3g}", fill=(0, 0, 0), font=font)
        draw.text((ox + 2, bottom - 10), f"{y0:.3g}", fill=(0, 0, 0), font=font)
        draw.text((left, bottom + 4), f"step {x0}", fill=(0, 0, 0), font=font)
        draw.text((right - 50, bottom + 4), f"{x1}", fill=(0, 0, 0), font=font)

        def xy(s, v, box=(left, top, right, bottom), rng=(x0, x1, y0, y1)):
            return (box[0] + (s - rng[0]) / (rng[1] - rng[0]) * (box[2] - box[0]),
                    box[3] - (v - rng[2]) / (rng[3] - rng[2]) * (box[3] - box[1]))

        for arm, c in curves.items():
            line = [xy(s, v) for s, v in c[term]]
            if len(line) > 1:
                draw.line(line, fill=colors[arm], width=2)
            elif line:
                x, y = line[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[arm])
    for i, arm in enumerate(curves):
        x, y = 10 + (i % 3) * (2 * pw // 3), 2 * ph + 4 + (i // 3) * 16
        draw.rectangle([x, y + 4, x + 14, y + 8], fill=colors[arm])
        draw.text((x + 18, y), arm, fill=(0, 0, 0), font=font)
    img.save(path)
    return path


def write(results_path: str) -> tuple[str, str]:
    """Regenerates RESULTS.md and the loss-curve PNG next to ``results_path``."""
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    folder = os.path.dirname(os.path.abspath(results_path))
    png = plot_loss_curves(results, os.path.join(folder, results["pictures"]["loss_curves"]))
    md = os.path.join(folder, "RESULTS.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(results))
    return md, png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="results.json -> RESULTS.md + loss_curves.png")
    p.add_argument("results", help="path of results.json")
    args = p.parse_args(argv)
    if not os.path.isfile(args.results):
        print(f"report: no such file: {args.results}", file=sys.stderr)
        return 2
    md, png = write(args.results)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
