"""The GOAL experiment in the shapes world: one resumable command.

    python -m experiments.shapes_world.run --world assets/shapes_world --workdir runs/exp \\
        --out experiments/shapes_world                      # the reported size ("full")
    python -m experiments.shapes_world.run --world assets/shapes_world --workdir /tmp/exp \\
        --out /tmp/exp/out --size smoke                     # two arms x one seed x 3 steps

What it does, in order (every step is skipped when its output exists and matches):

1. writes the GOAL2K-like fine-tuning set (``<workdir>/finetune``, world split ``finetune``)
   and picks the evaluation layouts (world split ``eval``), checked disjoint;
2. measures the scale of every loss term at the base world (``<workdir>/scales.json``);
3. scores the references: the world's own renders of the layouts (ground truth) and the base
   world's samples;
4. for each seed, for each arm: fine-tunes with scripts/train.py (``<workdir>/runs/<arm>/
   seed<k>``: checkpoints, metrics.jsonl, train.log; an interrupted run resumes from its
   checkpoint), then samples and scores it (``eval.json``, ``samples.npz``; with
   ``--sample_beta b`` < 1, grounding only for the first b of the sampling steps as in
   GLIGEN's scheduled sampling, ``eval-beta<b>.json`` and ``samples-beta<b>.npz`` beside
   them, the trained runs shared);
5. writes ``<out>/grid.png`` and ``<out>/grid_images.npz`` (the grid's images per row);
6. the attention maps per phrase (attention.py: ``<out>/attention.png`` and
   ``results["attention"]``) of the base world, ldm_only and the best GOAL arm;
7. writes ``<out>/results.json`` (after every step), ``<out>/loss_curves.png`` and
   ``<out>/RESULTS.md`` (report.py, from results.json alone).

Across sessions (persist.py): a run, the loss scales and the references whose workdir files
are missing are restored from the previous ``<out>/results.json`` when it recorded exactly
what this invocation would compute (same config, evaluation settings, layouts, fine-tuning
set, world and oracle files); runs of it not asked for here are kept when they still match,
mismatching ones are dropped with a printed reason.

Progress: one line per finished step with the elapsed time and the ETA of the whole
experiment (from the measured step and evaluation times). A run directory made with another
configuration is an error naming the differing fields (delete it or use another --workdir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from experiments.shapes_world import arms as arms_lib
from experiments.shapes_world import datasets, persist, report

REPO = arms_lib.REPO
GRID_PER_CATEGORY = 2


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
    os.replace(path + ".tmp", path)


def world_info(world: str) -> dict:
    """{"path", "pipeline", "clip", "resolution", "max_boxes", "maa_resolution",
    "world_json"} of a world folder (``pipeline/`` and ``clip/``; resolution and grounding
    slots from ``world.json`` when present, else from the pipeline's U-Net sample size x VAE
    factor and 4 slots; :func:`maa_resolution`)."""
    from goal_jax import weights
    from goal_jax.models import unet as unet_lib

    pipeline, clip = os.path.join(world, "pipeline"), os.path.join(world, "clip")
    for folder, what in ((pipeline, "diffusers GLIGEN pipeline"), (clip, "CLIPModel")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--world {world}: no {folder} ({what} folder); the shipped "
                                    "world is assets/shapes_world (or build one with "
                                    "scripts/world.py)")
    meta_path = os.path.join(world, "world.json")
    meta = _read_json(meta_path) if os.path.isfile(meta_path) else None
    unet = unet_lib.UNet2DConditionConfig.from_dict(
        weights.read_config(os.path.join(pipeline, "unet")))
    vae = weights.read_config(os.path.join(pipeline, "vae"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if meta is not None:
        res, slots = meta["config"]["data"]["resolution"], meta["config"]["data"]["max_boxes"]
    else:
        res, slots = int(unet.sample_size) * factor, 4
    return {"path": os.path.abspath(world), "pipeline": os.path.abspath(pipeline),
            "clip": os.path.abspath(clip), "resolution": int(res), "max_boxes": int(slots),
            "maa_resolution": maa_resolution(unet, res // factor),
            "world_json": meta_path if meta is not None else None}


def maa_resolution(unet, latent: int) -> int:
    """The side of the decoder cross-attention maps MAAlign uses: the decoder's grid closest
    to latent / 4 (the paper's 16x16 for SD's 64x64 latents); the shapes world has one
    cross-attention grid (8x8 for its 16x16 latents), which this returns."""
    from goal_jax.models import unet as unet_lib

    sizes = []
    r = latent
    while r >= 1:
        try:
            unet_lib.cross_attention_layers(unet, "up", r, sample_size=latent)
            sizes.append(r)
        except ValueError:
            pass
        r //= 2
    if not sizes:
        raise ValueError(f"the world U-Net has no decoder cross-attention (latents {latent})")
    return min(sizes, key=lambda s: (abs(s - latent / 4), -s))


class Progress:
    """Prints ``[experiment] <what> (k/N steps done, elapsed, ETA)``; the ETA sums the
    remaining tasks' estimated costs (training: steps x measured s/step + start-up;
    evaluation: measured s/evaluation), updated as measurements come in."""

    def __init__(self, total_train_runs: int, total_evals: int, steps: int):
        self.start = time.time()
        self.train_left, self.eval_left, self.steps = total_train_runs, total_evals, steps
        self.total = total_train_runs + total_evals
        self.step_s, self.startup_s, self.eval_s = [], [], []

    def done(self, what: str, kind: str, seconds: float | None = None,
             step_s: float | None = None, startup_s: float | None = None) -> None:
        if kind == "train":
            self.train_left -= 1
            if step_s is not None:
                self.step_s.append(step_s)
            if startup_s is not None:
                self.startup_s.append(startup_s)
        elif kind == "eval":
            self.eval_left -= 1
            if seconds is not None:
                self.eval_s.append(seconds)
        finished = self.total - self.train_left - self.eval_left
        eta = self.eta()
        eta_text = "unknown until a run is measured" if eta is None else f"{eta / 60:.1f} min"
        print(f"[experiment] {what} ({finished}/{self.total} runs+evaluations done, elapsed "
              f"{(time.time() - self.start) / 60:.1f} min, ETA {eta_text})", flush=True)

    def eta(self) -> float | None:
        need_train = self.train_left > 0 and not self.step_s
        need_eval = self.eval_left > 0 and not self.eval_s
        if need_train or need_eval:
            return None
        t = 0.0
        if self.train_left:
            t += self.train_left * (self.steps * float(np.median(self.step_s))
                                    + float(np.median(self.startup_s or [0.0])))
        if self.eval_left:
            t += self.eval_left * float(np.median(self.eval_s))
        return t


def read_curve(metrics_path: str) -> list[dict]:
    """[{"step", "total", "ldm", "dsa", "maa", "steps_per_sec"}] from a run's metrics.jsonl
    (the last line per step: a resumed run may log a step twice)."""
    by_step = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                m = json.loads(line)
                by_step[int(m["step"])] = {k: m.get(k) for k in (
                    "step", "total", "ldm", "dsa", "maa", "dsa_local", "dsa_global", "maa_in",
                    "maa_out", "grad_norm", "steps_per_sec")}
    return [by_step[s] for s in sorted(by_step)]


def run_record(spec, seed: int, overrides: dict, run_dir: str) -> tuple[dict, dict | None]:
    """(the record a run directory must hold, the one it holds or None). Raises ValueError
    naming the differing fields when ``run_dir`` was made with another configuration."""
    want = {"arm": spec.name, "seed": seed, "config_string": arms_lib.config_string(spec, REPO),
            "overrides": overrides}
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return want, None
    have = _read_json(path)
    stored = json.loads(json.dumps(overrides))  # as run.json holds them: tuples become lists
    diff = sorted(k for k in set(have["overrides"]) | set(stored)
                  if have["overrides"].get(k) != stored.get(k))
    if diff or have["config_string"] != want["config_string"]:
        raise ValueError(f"run {run_dir} was made with another configuration (fields "
                         f"{diff or ['config_string']}: "
                         f"{[(k, have['overrides'].get(k), stored.get(k)) for k in diff][:5]}"
                         "); delete it or use another --workdir")
    return want, have


def train_run(spec, size, seed: int, overrides: dict, run_dir: str, log=print) -> dict:
    """Fine-tunes one arm x seed with scripts/train.py (skipped when finished; an interrupted
    run resumes from its checkpoint); returns {"steps", "wall_s", "step_s", "startup_s",
    "curve", "final", "command"}."""
    record_path = os.path.join(run_dir, "run.json")
    command = arms_lib.train_command(spec, overrides, run_dir, REPO)
    want, have = run_record(spec, seed, overrides, run_dir)
    if have is not None and have.get("train"):
        return have["train"]
    os.makedirs(run_dir, exist_ok=True)
    _write_json(record_path, want)
    log(f"[experiment] training {spec.name} seed {seed}: {size.steps} steps -> {run_dir}")
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as out:
        out.write("+ " + " ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                check=False)
    wall = time.time() - start
    if result.returncode != 0:
        with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"training {spec.name} seed {seed} failed (exit "
                           f"{result.returncode}); {run_dir}/train.log ends with:\n{tail}")
    curve = read_curve(os.path.join(run_dir, "metrics.jsonl"))
    if not curve or curve[-1]["step"] != size.steps:
        raise RuntimeError(f"training {spec.name} seed {seed}: metrics.jsonl ends at step "
                           f"{curve[-1]['step'] if curve else None}, not {size.steps}")
    # Steady-state seconds per step: the logged intervals after the first (which holds the
    # compilation); with a single interval, its own rate.
    rates = [c["steps_per_sec"] for c in curve[1:] if c.get("steps_per_sec")] or \
        [c["steps_per_sec"] for c in curve if c.get("steps_per_sec")]
    step_s = float(1.0 / np.median(rates)) if rates else wall / size.steps
    train = {"steps": size.steps, "wall_s": round(wall, 1), "step_s": round(step_s, 4),
             "startup_s": round(max(wall - step_s * size.steps, 0.0), 1), "curve": curve,
             "final": curve[-1], "command": command}
    _write_json(record_path, dict(want, train=train))
    return train


def check_trainable(run_dir: str, unet_params_ckpt_leaves: int, base_unet, patterns) -> None:
    """Raises ValueError naming ``run_dir`` unless its checkpoint holds exactly the U-Net
    tensors the trainable ``patterns`` select in ``base_unet``."""
    from goal_jax import train as train_lib

    expected = sum(train_lib.trainable_mask(base_unet, patterns).values())
    if unet_params_ckpt_leaves != expected:
        raise ValueError(f"run {run_dir}: its checkpoint holds {unet_params_ckpt_leaves} "
                         f"trainable U-Net tensors, the arm's trainable set "
                         f"{list(patterns)} has {expected}: the demo preset's "
                         "trainable_patterns changed; pass them explicitly")


def eval_suffix(sample_beta: float) -> str:
    """File-name suffix of an evaluation sampled with grounding for the first ``sample_beta``
    of the steps: "" for full grounding (1.0, the sizes' default), else "-beta<b>", so one
    workdir holds the evaluations of several grounding schedules side by side (a run's
    ``eval.json`` / ``eval-beta0.3.json``, ``references/`` / ``references-beta0.3/``)."""
    if not 0.0 <= sample_beta <= 1.0:
        raise ValueError(f"--sample_beta {sample_beta:g}: the grounded share of the sampling "
                         "steps must lie in [0, 1]")
    return "" if sample_beta == 1.0 else f"-beta{sample_beta:g}"


def evaluate_run(evaluator, run_dir: str, base_unet, patterns, settings: dict,
                 suffix: str = "") -> tuple[dict, np.ndarray]:
    """Samples and scores one trained run (skipped when ``eval<suffix>.json`` matches); its
    checkpoint must hold exactly the tensors of the arm's trainable ``patterns``."""
    from experiments.shapes_world import evaluate as eval_lib

    path = os.path.join(run_dir, f"eval{suffix}.json")
    npz = os.path.join(run_dir, f"samples{suffix}.npz")
    if os.path.isfile(path) and os.path.isfile(npz):
        have = _read_json(path)
        if have.get("settings") == settings:
            return rescored(lambda: evaluator, path, have, np.load(npz)["images"])
    params, info = eval_lib.load_run_unet(os.path.join(run_dir, "checkpoints"), base_unet)
    check_trainable(run_dir, info["replaced"], base_unet, patterns)
    scores, images = evaluator.evaluate(params)
    scores.update(settings=settings, checkpoint=info)
    np.savez_compressed(npz, images=images)
    _write_json(path, scores)
    return scores, images


def rescored(get_evaluator, path: str, have: dict, images: np.ndarray
             ) -> tuple[dict, np.ndarray]:
    """(scores, images) of stored samples: ``have`` (the eval.json at ``path``) when it was
    scored by this scorer (evaluate.SCORER), else the samples scored again (nothing is sampled;
    ``get_evaluator()`` returns the Evaluator) and ``path`` rewritten, keeping
    its settings, wall time and checkpoint."""
    from experiments.shapes_world import evaluate as eval_lib

    if have.get("scorer") == eval_lib.SCORER:
        return have, images
    scores = get_evaluator().score(images)
    scores.update({k: have[k] for k in ("settings", "wall_s", "checkpoint") if k in have},
                  rescored_from=have.get("scorer", "oracle verdicts only"))
    _write_json(path, scores)
    print(f"[experiment] rescored {path} with scorer {eval_lib.SCORER} (from its stored "
          "samples)", flush=True)
    return scores, images


def _workdir_reference(path: str, settings: dict, get_evaluator=None
                       ) -> tuple[dict, np.ndarray] | None:
    """(scores, images) of a reference already scored in the workdir with ``settings``
    (rescored from its images when an older scorer made it: ``get_evaluator`` is then
    needed)."""
    npz = path.replace(".json", ".npz")
    if os.path.isfile(path) and os.path.isfile(npz) and _read_json(path).get("settings") == \
            settings:
        return rescored(get_evaluator, path, _read_json(path), np.load(npz)["images"])
    return None


def _reference(evaluator, path: str, settings: dict, images_fn) -> tuple[dict, np.ndarray]:
    """Scores one reference (the world's renders, or the base world's samples) and saves it
    under ``<workdir>/references`` (skipped when there with ``settings``)."""
    have = _workdir_reference(path, settings, lambda: evaluator)
    if have is not None:
        return have
    npz = path.replace(".json", ".npz")
    start = time.time()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = images_fn()
    scores = evaluator.score(images)
    scores.update(settings=settings, wall_s=round(time.time() - start, 1))
    np.savez_compressed(npz, images=images)
    _write_json(path, scores)
    return scores, images


def grid_indices(items: list[dict]) -> list[int]:
    """Indices of the grid's layouts: the first GRID_PER_CATEGORY of each category, in
    category order."""
    pick = []
    for cat in dict.fromkeys(it["category"] for it in items):
        pick += [i for i, it in enumerate(items) if it["category"] == cat][:GRID_PER_CATEGORY]
    return pick


def grid_picture(path: str, items: list[dict], rows: list[tuple[str, np.ndarray]]) -> str:
    """The grid's layouts (:func:`grid_indices`), one row per (label, uint8 images
    [n_grid, H, W, 3] of exactly those layouts)."""
    from goal_jax.world import evaluate as world_eval

    return world_eval.layout_grid(rows, [items[i] for i in grid_indices(items)], path)


def timing_totals(results: dict) -> dict:
    """Training / evaluation seconds summed over every run of ``results`` (restored ones
    with their recorded times) and the references; mean seconds per training step."""
    runs = [r for r in results["runs"] if r.get("train") and r.get("eval")]
    refs = results.get("references", {}).values()
    steps = [r["train"]["step_s"] for r in runs]
    return {"train_s": round(sum(r["train"]["wall_s"] for r in runs), 1),
            "eval_s": round(sum(r["eval"]["wall_s"] for r in runs)
                            + sum(x.get("wall_s", 0.0) for x in refs), 1),
            "train_step_s_mean": float(np.mean(steps)) if steps else None}


def run(args) -> dict:
    size = arms_lib.SIZES[args.size]
    if args.steps:
        size = dataclasses.replace(size, steps=args.steps)
    if args.seeds:
        size = dataclasses.replace(size, seeds=tuple(args.seeds))
    if args.sample_beta is not None:
        size = dataclasses.replace(size, sample_beta=args.sample_beta)
    suffix = eval_suffix(size.sample_beta)
    if args.main_balance is not None:  # goal_bal<r> is then the goal arm itself
        size = dataclasses.replace(size, main_balance=args.main_balance, arms=tuple(
            a for a in size.arms if a != f"goal_bal{args.main_balance:g}"))
    if args.arms:
        size = dataclasses.replace(size, arms=tuple(args.arms))
    specs = size.specs()
    every = arms_lib.arm_specs(size.main_scale, size.sweep_scales, size.main_balance,
                               size.balance_sweep)
    order = {name: i for i, name in enumerate(every)}
    world = world_info(args.world)
    world["fingerprint"] = persist.world_fingerprint(world)
    workdir, out = os.path.abspath(args.workdir), os.path.abspath(args.out)
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    previous = persist.Previous(out, REPO)
    command = "python -m experiments.shapes_world.run " + " ".join(args.argv)
    print(f"[experiment] size {size.name}: {len(specs)} arms x {len(size.seeds)} seeds x "
          f"{size.steps} steps (batch {size.batch_size}); world {world['path']} "
          f"({world['resolution']} px)", flush=True)

    # 1. data
    ft_dir = os.path.join(workdir, "finetune")
    manifest = datasets.write_finetune_set(ft_dir, size.finetune_items, arms_lib.FINETUNE_MIX,
                                           world["resolution"])
    items = datasets.eval_layouts(size.eval_per_category, world["resolution"])
    disjoint = datasets.check_disjoint(datasets.read_finetune_items(ft_dir), items)
    data_dir, cache_dir = os.path.join(workdir, "tfds"), os.path.join(workdir, "jax_cache")
    common = previous.common_reason(world, manifest, items) if previous.results else "none"

    # 2. loss scales (in-process; builds the TFDS copy of the fine-tuning set the runs share)
    from experiments.shapes_world import scales as scales_lib

    scales_path = os.path.join(workdir, "scales.json")
    scale_key = {"batches": size.scale_batches, "parts": list(size.scale_parts),
                 "batch_size": size.batch_size, "world": world["path"], "data": ft_dir}
    t0 = time.time()
    old_size = previous.results["size"] if previous.results else {}
    if os.path.isfile(scales_path) and _read_json(scales_path).get("key") == scale_key:
        scales = _read_json(scales_path)["scales"]
    elif common is None and previous.results.get("scales") and (
            old_size.get("scale_batches"), old_size.get("scale_parts"),
            old_size.get("batch_size")) == (size.scale_batches, list(size.scale_parts),
                                            size.batch_size):
        scales = previous.results["scales"]  # the same world, data and probe: same numbers
        _write_json(scales_path, {"key": scale_key, "scales": scales,
                                  "restored_from": previous.path})
        print(f"[experiment] loss scales restored from {previous.path}", flush=True)
    else:
        probe = arms_lib.ArmSpec("goal", "loss-scale probe")
        scales = scales_lib.measure(
            arms_lib.run_overrides(probe, size, 0, world, ft_dir, data_dir, cache_dir,
                                   args.num_devices), tuple(size.scale_parts), size.scale_batches)
        _write_json(scales_path, {"key": scale_key, "scales": scales})
    up = scales["parts"]["up"]
    balance = {"alpha": up["balance_alpha"], "beta": up["balance_beta"]}
    print(f"[experiment] loss scales ({time.time() - t0:.0f} s): balance weights "
          f"α {balance['alpha']:.3g}, β {balance['beta']:.3g} (paper α "
          f"{arms_lib.PAPER_ALPHA:g}, β {arms_lib.PAPER_BETA:g})", flush=True)

    def overrides(spec, seed):
        return arms_lib.run_overrides(spec, size, seed, world, ft_dir, data_dir, cache_dir,
                                      args.num_devices, balance)

    def config_string(spec):
        return arms_lib.config_string(spec, REPO).replace(REPO + "/", "")

    eval_settings = {"num_steps": size.sample_steps, "guidance_scale": size.guidance_scale,
                     "beta": size.sample_beta}
    settings = dict(eval_settings, layouts=[it["id"] for it in items])

    from experiments.shapes_world import evaluate as eval_lib

    def want(name, seed):
        spec = every[name]
        return {"arm": name, "seed": seed, "config_string": config_string(spec),
                "overrides": persist.portable(overrides(spec, seed), world["path"], workdir,
                                              REPO), "settings": settings,
                "scorer": eval_lib.SCORER}

    # Old runs: restorable (asked for here), kept (not asked for, still matching) or dropped.
    requested = [(name, seed) for seed in size.seeds for name in specs]
    restorable, records = {}, {}
    for old in previous.runs():
        key, label = (old["arm"], old["seed"]), f"{old['arm']} seed {old['seed']}"
        if common is not None:
            reason = common
        elif old["arm"] not in every:
            reason = f"arm {old['arm']!r} is not an arm of size {size.name!r} here"
        else:
            reason = previous.check(old, want(*key))
        if reason is not None:
            print(f"[experiment] dropped {label} of {previous.path}: {reason}", flush=True)
            continue
        old = dict(old, **{k: v for k, v in want(*key).items() if k != "settings"},
                   restored_from=old.get("restored_from") or {
                       "results": previous.path, "run_dir": old["run_dir"]})
        if key in requested:
            restorable[key] = old
        else:
            records[key] = old
            print(f"[experiment] kept {label} from {previous.path}{previous.world_note}",
                  flush=True)

    # Restorable runs are recorded as read until the loop below reaches them, so an invocation
    # that stops early (an error, an interruption) does not drop them from results.json.
    records.update(restorable)

    def all_arms():
        return sorted({a for a, _ in records} | set(specs), key=order.get)

    results = {
        "experiment": "GOAL vs LDM-only fine-tuning in the shapes world (issue 16)",
        "command": command,
        "commands": list(dict.fromkeys(
            ((previous.results.get("commands") or [previous.results["command"]])
             if previous.results and common is None else []) + [command])),
        "size": dataclasses.asdict(size), "invocation": {"arms": list(specs),
                                                         "seeds": list(size.seeds)},
        "world": world, "workdir": workdir,
        "finetune_set": dict(manifest, folder=ft_dir, disjoint=disjoint),
        "eval": {"per_category": size.eval_per_category, "categories": list(arms_lib.CATEGORIES),
                 "settings": eval_settings,
                 "layouts": [{k: it[k] for k in persist.LAYOUT_FIELDS} for it in items]},
        "paper": {"alpha": arms_lib.PAPER_ALPHA, "beta": arms_lib.PAPER_BETA},
        "arms": {}, "scales": scales, "balance": balance, "references": {}, "runs": [],
        "pictures": {"grid": "grid.png", "loss_curves": "loss_curves.png",
                     "grid_images": persist.GRID_IMAGES},
        "timing": {},
    }
    run_dirs = {(name, seed): os.path.join(workdir, "runs", name, f"seed{seed}")
                for name, seed in requested}
    for (name, seed), run_dir in run_dirs.items():  # fail before anything is written
        run_record(specs[name], seed, overrides(specs[name], seed), run_dir)
    results_path = os.path.join(out, "results.json")

    def save():
        names = all_arms()
        results["arms"] = {name: {"about": every[name].about,
                                  "spec": dataclasses.asdict(every[name]),
                                  "config_string": config_string(every[name]),
                                  "config": overrides(every[name], size.seeds[0])}
                           for name in names}
        results["runs"] = [records[k] for k in sorted(records, key=lambda k: (k[1], order[k[0]]))]
        results["size"]["arms"] = names
        results["size"]["seeds"] = sorted({s for _, s in records} | set(size.seeds))
        import jax

        results["timing"] = dict(results["timing"], **timing_totals(results),
                                 devices=str(jax.devices()[0].platform),
                                 cpu_count=os.cpu_count())
        _write_json(results_path, results)

    results["timing"]["scales_s"] = scales["wall_s"]
    save()
    progress = Progress(len(requested), len(requested) + 2, size.steps)

    # 3. references (the workdir's, else the old results.json's, else scored here)
    lazy = {}

    def evaluator():
        if "evaluator" not in lazy:
            lazy["evaluator"] = eval_lib.Evaluator(
                world["pipeline"], world["clip"], items, num_steps=size.sample_steps,
                guidance_scale=size.guidance_scale, beta=size.sample_beta,
                batch_size=args.eval_batch_size, max_boxes=world["max_boxes"])
            lazy["base_unet"] = lazy["evaluator"].pipe.unet_params
        return lazy["evaluator"]

    pick = grid_indices(items)
    pick_ids = [items[i]["id"] for i in pick]
    old_grid_ok = list(previous.images.get("layout_ids", [])) == pick_ids
    grid = {}  # row key -> uint8 [n_grid, H, W, 3]
    ref_dir = os.path.join(workdir, f"references{suffix}")
    for name, what, images_fn in (
            ("ground_truth", "scored the world's renders of the layouts (ground truth)",
             lambda: datasets.eval_truth_images(items, world["resolution"])),
            ("base", "sampled and scored the base world", lambda: evaluator().sample(None))):
        path = os.path.join(ref_dir, f"{name}.json")
        have = _workdir_reference(path, settings, evaluator)
        old = previous.reference(name, settings) if common is None and old_grid_ok else None
        if have is None and old is not None:
            scores = dict(old, restored_from=old.get("restored_from") or previous.path)
            grid[name] = previous.images[name]
            what = f"restored the reference {name!r} from {previous.path}"
        else:
            scores, images = have or _reference(evaluator(), path, settings, images_fn)
            grid[name] = images[pick]
        results["references"][name] = scores
        progress.done(what, "eval", scores["wall_s"])
    save()

    # 4. runs: seeds outer, arms inner (a partial experiment has whole seeds)
    for name, seed in requested:
        spec, run_dir = specs[name], run_dirs[(name, seed)]
        key = persist.grid_key(name, seed)
        have_run = run_record(spec, seed, overrides(spec, seed), run_dir)[1]
        eval_path = os.path.join(run_dir, f"eval{suffix}.json")
        samples_path = os.path.join(run_dir, f"samples{suffix}.npz")
        finished = bool(have_run and have_run.get("train")) and os.path.isfile(eval_path) and \
            os.path.isfile(samples_path) and \
            _read_json(eval_path).get("settings") == settings
        old = restorable.get((name, seed))
        if not finished and old is not None:
            records[(name, seed)] = old
            if key in previous.images and old_grid_ok:
                grid[key] = previous.images[key]
            progress.done(f"restored {name} seed {seed} from {previous.path}"
                          f"{previous.world_note} (not trained here)", "train",
                          step_s=old["train"]["step_s"], startup_s=old["train"]["startup_s"])
            progress.done(f"restored the evaluation of {name} seed {seed}: oracle "
                          f"{100 * old['eval']['oracle']:.1f}, CLIP "
                          f"{100 * old['eval']['clip']:.1f}", "eval", old["eval"]["wall_s"])
            save()
            continue
        train = train_run(spec, size, seed, overrides(spec, seed), run_dir)
        progress.done(f"trained {name} seed {seed} ({train['wall_s']:.0f} s, "
                      f"{train['step_s']:.3f} s/step)", "train", step_s=train["step_s"],
                      startup_s=train["startup_s"])
        if finished:
            scores, images = rescored(evaluator, eval_path, _read_json(eval_path),
                                      np.load(samples_path)["images"])
        else:
            evaluator()
            scores, images = evaluate_run(
                lazy["evaluator"], run_dir, lazy["base_unet"],
                arms_lib.trainable_patterns(overrides(spec, seed)), settings, suffix)
        progress.done(f"evaluated {name} seed {seed}: oracle {100 * scores['oracle']:.1f}, "
                      f"CLIP {100 * scores['clip']:.1f}", "eval", scores["wall_s"])
        grid[key] = images[pick]
        w = want(name, seed)
        records[(name, seed)] = {
            "arm": name, "seed": seed, "run_dir": run_dir,
            "config_string": w["config_string"], "overrides": w["overrides"],
            "train": {k: v for k, v in train.items() if k != "command"},
            "eval": {k: v for k, v in scores.items() if k != "items"},
            "eval_items": scores["items"]}
        save()

    # 5. pictures: one grid row per arm (its lowest seed), from grid_images.npz when restored
    if old_grid_ok:
        grid = dict({k: v for k, v in previous.images.items() if k != "layout_ids"}, **grid)
    rows, stored = [("ground truth", "ground_truth"), ("base world", "base")], {}
    first = min(s for _, s in records) if records else None
    for arm in all_arms():
        seeds = sorted(s for a, s in records if a == arm)
        seed = next((s for s in seeds if persist.grid_key(arm, s) in grid), seeds[0])
        rows.append((arm if seed == first else f"{arm} (seed {seed})",
                     persist.grid_key(arm, seed)))
    for label, key in rows:
        if key in grid:
            stored[key] = grid[key]
        else:
            print(f"[experiment] grid: no images of {label!r} (restored from a results.json "
                  f"without {persist.GRID_IMAGES}); its row is left out", flush=True)
    persist.write_grid_images(os.path.join(out, persist.GRID_IMAGES), stored, pick_ids)
    grid_picture(os.path.join(out, results["pictures"]["grid"]), items,
                 [(label, stored[key]) for label, key in rows if key in stored])

    # 6. attention maps per phrase (MAAlign's layer) for the base world, LDM-only and the
    # best GOAL arm (seed-0 checkpoints); skipped when results.json holds them
    if args.attention_layouts:
        from experiments.shapes_world import attention as attention_lib

        found = attention_lib.for_experiment(
            results, items, world, stored, out, workdir,
            previous.results.get("attention") if previous.results and common is None else None,
            num_layouts=args.attention_layouts, timestep=args.attention_t)
        if found is not None:
            results["attention"] = found
            results["pictures"]["attention"] = found["picture"]
    save()
    md, png = report.write(results_path)
    print(f"[experiment] done: {results_path}, {md}, {png}", flush=True)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=os.path.join(REPO, "assets", "shapes_world"),
                   help="world folder with pipeline/ and clip/")
    p.add_argument("--workdir", required=True, help="runs, data, checkpoints (resumable)")
    p.add_argument("--out", required=True, help="results.json, RESULTS.md and pictures")
    p.add_argument("--size", choices=sorted(arms_lib.SIZES), default="full")
    p.add_argument("--arms", nargs="*", default=None, help="subset of the size's arms")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="override the seeds")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--sample_beta", type=float, default=None, metavar="B",
                   help="B in [0, 1]: evaluate with the boxes grounding only the first B "
                        "share of the sampling steps (GLIGEN's scheduled sampling; default: "
                        "the size's, 1.0 = every step). The trained runs are shared between "
                        "values of B, each evaluation in its own files: give each its own --out")
    p.add_argument("--main_balance", type=float, default=None,
                   help="the ablations use α, β = this x the measured balance weights "
                        "(goal_bal<r>) instead of the paper's")
    p.add_argument("--num_devices", type=int, default=1,
                   help="devices per training run (config num_devices)")
    p.add_argument("--eval_batch_size", type=int, default=32, help="images per sampler call")
    p.add_argument("--attention_layouts", type=int, default=4,
                   help="two-object colour / shape layouts of the attention figure (0: none)")
    p.add_argument("--attention_t", type=int, default=500,
                   help="diffusion timestep of the attention maps")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
