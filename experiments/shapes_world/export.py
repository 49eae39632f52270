"""Ship a fine-tuned arm of the experiment as a complete diffusers GLIGEN pipeline folder.

    python -m experiments.shapes_world.export --results experiments/shapes_world/results.json \\
        --workdir runs/exp --out assets/shapes_world/goal          # the best GOAL arm
    python -m experiments.shapes_world.export ... --arm goal --seed 1  # a given run

Default run: the GOAL-family arm (any arm with α > 0 or β > 0) with the best mean graded oracle
score over its seeds (``report.best_goal_arm``), and its best seed (``report.best_seed``).

The folder (``--out``) is a ``StableDiffusionGLIGENPipeline`` folder like the world's own:

* ``unet/``: the fine-tuned U-Net: the base world's U-Net with the run's trainable parameters
  (its latest training checkpoint, ``<workdir>/runs/<arm>/seed<k>/checkpoints``) put in their
  place by the loader the evaluation uses (``evaluate.load_run_unet`` ->
  ``goal_jax.weights.load_trained_unet``); the base's config.json, weights as safetensors;
* ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``: copied
  from the base world's pipeline (files, not links);
* ``goal.json``: which arm / seed / checkpoint step, its config, the experiment's command,
  the export command, and the scores (the run's, its arm's mean over seeds, LDM-only's and the
  base world's) from results.json.

Only safetensors weights are written (a .bin / .pt / .ckpt file is refused). The folder is
written next to ``--out`` and moved into place when complete; an existing ``--out`` is
replaced only with ``--overwrite``. The written U-Net is read back and checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from experiments.shapes_world import arms as arms_lib

REPO = arms_lib.REPO
NOT_SAFETENSORS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".pkl")
COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")


def choose_run(results: dict, arm: str | None = None, seed: int | None = None
               ) -> tuple[str, int]:
    """(arm, seed) to export: the given ones, else the best GOAL-family arm and its best
    seed. Raises ValueError when there is no such evaluated run."""
    from experiments.shapes_world import report

    if arm is None:
        arm = report.best_goal_arm(results)
        if arm is None:
            raise ValueError("the results hold no evaluated GOAL-family arm (α or β > 0); "
                             "give --arm")
    if seed is None:
        seed = report.best_seed(results, arm)
    if not any(r["arm"] == arm and r["seed"] == seed and r.get("eval")
               for r in results["runs"]):
        have = sorted((r["arm"], r["seed"]) for r in results["runs"])
        raise ValueError(f"the results hold no evaluated run {arm} seed {seed}; runs: {have}")
    return arm, seed


def _world_pipeline(results: dict, world: str | None) -> str:
    """The base pipeline folder: ``<world>/pipeline``, else results' world when it exists,
    else the shipped world; checked against results' world fingerprint when it has one."""
    from experiments.shapes_world import persist

    if world is None:
        world = results["world"]["path"] if os.path.isdir(results["world"]["path"]) else \
            os.path.join(REPO, "assets", "shapes_world")
    pipeline = os.path.join(os.path.abspath(world), "pipeline")
    want = results["world"].get("fingerprint", {}).get("pipeline")
    if want is not None and persist.hash_folder(pipeline) != want:
        raise ValueError(f"{pipeline} is not the base world the results were made with (its "
                         "files differ from results.json's world fingerprint); give --world")
    return pipeline


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it (goal.json is committed)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def _scores(results: dict, arm: str, seed: int) -> dict:
    from experiments.shapes_world import report

    run = next(r for r in results["runs"] if r["arm"] == arm and r["seed"] == seed)

    def arm_summary(name):
        if not report._has(results, name):
            return None
        ref = results.get("references", {}).get(name)
        return {"score": report.mean_score(results, name) if ref is None else ref["score"],
                "oracle": ref["oracle"] if ref is not None else float(np.mean(
                    [r["eval"]["oracle"] for r in results["runs"] if r["arm"] == name])),
                "seeds": sorted(r["seed"] for r in results["runs"] if r["arm"] == name),
                "categories": report.arm_stats(results, name)}

    return {"run": {k: run["eval"][k] for k in ("score", "oracle", "clip", "categories")},
            "arm_mean": arm_summary(arm), "ldm_only_mean": arm_summary("ldm_only"),
            "base": arm_summary("base"),
            "metric": "score: the oracle's graded score, oracle: its all-or-nothing verdict "
                      "rate, on the held-out evaluation layouts (0-1)"}


def export(results_path: str, workdir: str, out: str, arm: str | None = None,
           seed: int | None = None, world: str | None = None, overwrite: bool = False,
           command: str = "", log=print) -> dict:
    """Writes the pipeline folder ``out`` for one run; returns the goal.json record."""
    from experiments.shapes_world import evaluate as eval_lib
    import flax
    from flax import traverse_util

    from experiments.shapes_world import persist, run as run_lib
    from goal_jax import weights

    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    chosen_by = "given" if arm is not None and seed is not None else (
        "default: the GOAL-family arm with the best mean graded oracle score, its best seed"
        if arm is None else "arm given; its best seed")
    arm, seed = choose_run(results, arm, seed)
    run = next(r for r in results["runs"] if r["arm"] == arm and r["seed"] == seed)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    checkpoint = os.path.join(os.path.abspath(workdir), "runs", arm, f"seed{seed}",
                              "checkpoints")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint of {arm} seed {seed}: {checkpoint} does not "
                                "exist (the workdir of the session that trained it)")
    pipeline = _world_pipeline(results, world)
    log(f"[export] {arm} seed {seed} ({chosen_by}): {checkpoint} over {pipeline} -> {out}")
    pipe = weights.load_pipeline(pipeline)
    params, info = eval_lib.load_run_unet(checkpoint, pipe.unet_params)
    run_lib.check_trainable(checkpoint, info["replaced"], pipe.unet_params,
                            arms_lib.trainable_patterns(run.get("overrides") or {}))
    if info["step"] != run["train"]["steps"]:
        raise ValueError(f"{checkpoint}: latest step {info['step']}, but the results' run "
                         f"trained {run['train']['steps']} steps (another run?)")

    tmp = out + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    unet_config = weights.read_config(os.path.join(pipeline, "unet"))
    weights.write_safetensors(os.path.join(tmp, "unet"), weights.to_state_dict(params),
                              unet_config, "diffusion_pytorch_model")
    os.chmod(os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"), 0o644)
    for sub in COPIED:
        shutil.copytree(os.path.join(pipeline, sub), os.path.join(tmp, sub), symlinks=False)
    shutil.copyfile(os.path.join(pipeline, "model_index.json"),
                    os.path.join(tmp, "model_index.json"))
    bad = [os.path.relpath(os.path.join(root, f), tmp) for root, _, files in os.walk(tmp)
           for f in files if f.endswith(NOT_SAFETENSORS)]
    if bad:
        shutil.rmtree(tmp)
        raise ValueError(f"the base pipeline holds non-safetensors weights {bad}; refused")

    # Read the U-Net back: exactly the parameters written.
    _, back = weights.load_component(os.path.join(tmp, "unet"), "unet")
    flat_a = traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_b = traverse_util.flatten_dict(flax.core.unfreeze(back))
    if flat_a.keys() != flat_b.keys() or any(
            not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])) for k in flat_a):
        shutil.rmtree(tmp)
        raise RuntimeError("the written U-Net does not read back equal; nothing exported")

    arm_record = results["arms"].get(arm, {})
    record = {
        "what": "GOAL fine-tune of the shapes world, exported by experiments.shapes_world.export",
        "arm": arm, "seed": seed, "chosen_by": chosen_by, "about": arm_record.get("about"),
        "alpha": arm_record.get("config", {}).get("train.alpha"),
        "beta": arm_record.get("config", {}).get("train.beta"),
        "config_string": run.get("config_string") or arm_record.get("config_string"),
        "overrides": run.get("overrides") or persist.portable(
            dict(arm_record.get("config", {}), **{k: seed for k in persist.SEED_FIELDS}),
            results["world"]["path"], results.get("workdir") or os.path.dirname(
                results["finetune_set"]["folder"]), REPO),
        "checkpoint": {"step": info["step"], "replaced": info["replaced"],
                       "total": info["total"], "folder": _shown(checkpoint)},
        "train": {k: run["train"].get(k) for k in ("steps", "wall_s", "final")},
        "base_pipeline": _shown(pipeline),
        "world_fingerprint": results["world"].get("fingerprint"),
        "experiment_command": results["command"],
        "export_command": command,
        "results": _shown(results_path),
        "scores": _scores(results, arm, seed),
    }
    with open(os.path.join(tmp, "goal.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    log(f"[export] wrote {out} ({size / 2**20:.1f} MiB): {arm} seed {seed}, graded oracle "
        f"score {100 * record['scores']['run']['score']:.1f} (arm mean "
        f"{100 * record['scores']['arm_mean']['score']:.1f})")
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="the experiment's results.json")
    p.add_argument("--workdir", required=True, help="the experiment's --workdir (checkpoints)")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--arm", default=None, help="default: the best GOAL-family arm")
    p.add_argument("--seed", type=int, default=None, help="default: the arm's best seed")
    p.add_argument("--world", default=None,
                   help="the base world folder (default: the results' world, else "
                        "assets/shapes_world)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        export(args.results, args.workdir, args.out, args.arm, args.seed, args.world,
               args.overwrite, "python -m experiments.shapes_world.export " + " ".join(argv))
    except (FileNotFoundError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
