"""The world demo (``make demo``): GOAL fine-tuning of the shipped shapes world, base vs GOAL.

    python scripts/demo.py --workdir runs/demo

1. fine-tunes ``assets/shapes_world/pipeline`` with the GOAL losses (``configs/goal.py:world``,
   scripts/train.py; a few minutes on 2 CPU cores, resumable);
2. samples the same fixed layouts (two-object layouts of the world's ``test`` split, never
   trained on) with the base world and with the fine-tuned U-Net (scripts/sample.py);
3. scores both folders with the world oracle (pixels only, no CLIP) and writes
   ``<workdir>/demo.png`` (rows: base, GOAL; boxes drawn, captions above) and
   ``<workdir>/scores.json``, and prints the scores side by side.

Rerunning skips what is done (training resumes from its checkpoint, sampled items are kept).

With ``--goal FOLDER`` (a shipped GOAL pipeline, e.g. ``assets/shapes_world/goal`` written by
``python -m experiments.shapes_world.export``) step 1 is skipped: the GOAL row is sampled
from that pipeline folder (``scripts/sample.py --pretrained FOLDER``), no training::

    python scripts/demo.py --workdir runs/demo-goal --goal assets/shapes_world/goal
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORLD = os.path.join(REPO, "assets", "shapes_world")


def _run(*cmds: list[str]) -> None:
    """Runs ``cmds`` at once (the two samplers: each spends most of its time starting up and
    compiling, which overlaps) and waits for all; a failed one ends the demo, named."""
    procs = []
    for cmd in cmds:
        print("+", " ".join(cmd), flush=True)
        procs.append((cmd, subprocess.Popen(cmd)))
    codes = [(cmd, proc.wait()) for cmd, proc in procs]
    for cmd, code in codes:
        if code != 0:
            raise SystemExit(f"demo: step failed with exit code {code}: {' '.join(cmd)}")


def _other_base(goal_record: dict, pipeline: str) -> str | None:
    """None when the GOAL pipeline's goal.json names ``pipeline`` (by its files' SHA-256,
    experiments.shapes_world.persist) as its base world, else what differs."""
    want = (goal_record.get("world_fingerprint") or {}).get("pipeline")
    if want is None:
        return None  # an export without a fingerprint: nothing to compare
    from experiments.shapes_world import persist

    have = persist.hash_folder(pipeline)
    if have == want:
        return None
    return f"its base's pipeline files hash to {want[:12]}, {pipeline}'s to {have[:12]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--layouts", type=int, default=8, help="fixed layouts to sample")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--beta", type=float, default=1.0, help="scheduled sampling fraction")
    p.add_argument("--train_args", nargs="*", default=[],
                   help="extra scripts/train.py flags, e.g. --config.train.steps=20")
    p.add_argument("--goal", default=None,
                   help="a shipped GOAL pipeline folder (experiments.shapes_world.export): "
                        "sample it instead of fine-tuning")
    args = p.parse_args(argv)
    pipeline = os.path.join(WORLD, "pipeline")
    if not os.path.isdir(pipeline):
        print(f"demo: the shapes world is missing ({pipeline}); it ships with the repository "
              "(`git checkout assets/`), or train it with `make world`", file=sys.stderr)
        return 2
    if args.goal is not None and not os.path.isfile(os.path.join(args.goal,
                                                                 "model_index.json")):
        print(f"demo: --goal {args.goal} is not a pipeline folder (no model_index.json); ship "
              "one with `python -m experiments.shapes_world.export`", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    from goal_jax.world import evaluate as world_eval

    layouts = world_eval.fixed_layouts(args.layouts)
    jsonl = os.path.join(args.workdir, "layouts.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: x[k] for k in ("id", "caption", "phrases", "boxes", "seed")})
                     + "\n" for x in layouts)
    py = sys.executable
    options = ["--jsonl", jsonl, "--steps", str(args.steps), "--cfg", str(args.cfg),
               "--beta", str(args.beta), "--batch_size", str(args.layouts), "--no_progress"]
    sample = [py, os.path.join(REPO, "scripts", "sample.py")]
    base_dir, goal_dir = (os.path.join(args.workdir, k) for k in ("base", "goal"))
    goal_label = row_label = "GOAL fine-tuned"
    if args.goal is None:
        train_dir = os.path.join(args.workdir, "train")
        _run([py, os.path.join(REPO, "scripts", "train.py"),
              "--config", os.path.join(REPO, "configs", "goal.py") + ":world",
              "--workdir", train_dir, *args.train_args])
        goal_cmd = ["--pretrained", pipeline, "--checkpoint",
                    os.path.join(train_dir, "checkpoints")]
    else:
        goal_cmd = ["--pretrained", args.goal]
        goal_label = row_label = "GOAL shipped"
        meta = os.path.join(args.goal, "goal.json")
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                shipped = json.load(f)
            row_label = f"GOAL shipped\n({shipped['arm']},\nseed {shipped['seed']})"
            other = _other_base(shipped, pipeline)
            if other:
                print(f"demo: warning: {args.goal} was fine-tuned from another base world "
                      f"({other}): the rows do not compare a fine-tune with its own base; "
                      "rerun experiments.shapes_world and its export for a matching one",
                      file=sys.stderr, flush=True)
                row_label += "\nOTHER BASE"
        print(f"demo: no fine-tuning; the GOAL row is the shipped pipeline {args.goal}",
              flush=True)
    _run(sample + ["--pretrained", pipeline] + options + ["--output_dir", base_dir],
         sample + goal_cmd + options + ["--output_dir", goal_dir])

    import numpy as np

    from goal_jax.evaluation import oracle as oracle_lib

    oracle = oracle_lib.Oracle.load()
    scores, rows = {}, []
    for label, folder in (("base world", base_dir), (goal_label, goal_dir)):
        images, items, _ = oracle_lib.read_folder(folder)
        by_id = {it["id"]: img for it, img in zip(items, images)}
        images = [by_id[x["id"]] for x in layouts]
        scores[label] = world_eval.score(images, layouts, oracle)["summary"]
        rows.append((row_label if label == goal_label else label, np.stack(images)))
    picture = world_eval.layout_grid(rows, layouts, os.path.join(args.workdir, "demo.png"))
    with open(os.path.join(args.workdir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    print(f"\n{'oracle (pixels only)':28s} {'base world':>12s} {'GOAL':>16s}")
    for key, label in (("present", "object in box"), ("color_in_box", "named colour in box"),
                       ("shape", "shape right"), ("texture", "texture right"),
                       ("iou", "IoU with box")):
        vals = [scores[k]["boxes"][key] for k in scores]
        print(f"{label:28s} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>14s}"
                                         for v in vals))
    print(f"{'all boxes right (verdict)':28s} "
          + " ".join(f"{scores[k]['verdict']:>14.3f}" for k in scores))
    print(f"\nwrote {picture} and {os.path.join(args.workdir, 'scores.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
