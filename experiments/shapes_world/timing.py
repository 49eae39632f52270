"""Measured cost of the experiment's parts on this machine, to size the experiment.

    python -m experiments.shapes_world.timing --world assets/shapes_world --workdir /tmp/t

Times, in one process, for the arms ``ldm_only`` and ``goal`` (and ``no_maalign``,
``no_dsalign``): compiling the train step and running ``--steps`` steps at the size's batch
(goal_jax.train, exactly the step scripts/train.py runs), and sampling one evaluation batch
(the experiment's sampler settings). Each is reported as wall seconds and process CPU
seconds (all threads): on a shared machine the wall time depends on the other jobs, the CPU
time much less; on an idle machine with C cores the wall time is between CPU / C and CPU.
Writes ``<workdir>/timing.json`` and prints an estimate of the whole experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from experiments.shapes_world import arms as arms_lib
from experiments.shapes_world import datasets


class Clock:
    """Wall and process-CPU seconds of a block: ``with Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def time_train(overrides: dict, steps: int) -> dict:
    """{"compile": {wall, cpu}, "step": {wall, cpu} per step (mean of ``steps``)}."""
    import jax

    from goal_jax import train as train_lib
    from goal_jax.data import pipeline as data_pipeline

    config = arms_lib.load_goal_config("demo")
    arms_lib.apply_overrides(config, overrides)
    t, d = config.train, config.data
    models, params = train_lib.load_models(t)
    optimizer, schedule = train_lib.make_optimizer(t)
    state, frozen = train_lib.create_train_state(params, t, optimizer)
    step = train_lib.make_train_step(models, t, optimizer, schedule)
    it = data_pipeline.make_train_iterator(
        d.data_dir, f"{t.model.pipeline}/tokenizer", batch_size=t.per_device_batch_size,
        resolution=d.resolution, max_boxes=d.max_boxes, seed=0, source_dir=d.source)
    try:
        batches = [next(it) for _ in range(steps + 1)]
    finally:
        it.close()
    with Clock() as first:
        state, metrics = step(state, frozen, batches[0])
        jax.block_until_ready(metrics)
    with Clock() as run:
        for b in batches[1:]:
            state, metrics = step(state, frozen, b)
        jax.block_until_ready(metrics)
    return {"compile_and_first_step": {"wall": first.wall, "cpu": first.cpu},
            "step": {"wall": run.wall / steps, "cpu": run.cpu / steps},
            "batch_size": t.per_device_batch_size, "steps_timed": steps}


def time_sampling(world: dict, size, batch: int) -> dict:
    from experiments.shapes_world import evaluate as eval_lib

    items = datasets.eval_layouts(-(-batch // 6), world["resolution"])[:batch]
    ev = eval_lib.Evaluator(world["pipeline"], world["clip"], items,
                            num_steps=size.sample_steps, guidance_scale=size.guidance_scale,
                            beta=size.sample_beta, batch_size=batch,
                            max_boxes=world["max_boxes"])
    with Clock() as first:
        ev.sample()
    with Clock() as again:
        images = ev.sample()
    with Clock() as score:
        ev.score(images)
    return {"batch": batch, "num_steps": size.sample_steps,
            "compile_and_first_batch": {"wall": first.wall, "cpu": first.cpu},
            "batch_sampling": {"wall": again.wall, "cpu": again.cpu},
            "batch_scoring": {"wall": score.wall, "cpu": score.cpu}}


def estimate(timing: dict, size, cores: int = 2) -> dict:
    """CPU-seconds and idle-machine wall estimate (CPU / cores .. CPU) of the whole size."""
    specs = size.specs()
    runs = len(specs) * len(size.seeds)
    per_arm = timing["train"]
    step_cpu = []
    for spec in specs.values():
        kind = ("ldm_only" if not spec.alpha_scale and not spec.beta_scale else
                "no_dsalign" if not spec.alpha_scale else
                "no_maalign" if not spec.beta_scale else "goal")
        step_cpu.append(per_arm.get(kind, per_arm["goal"])["step"]["cpu"])
    train_cpu = len(size.seeds) * size.steps * sum(step_cpu)
    compile_cpu = runs * float(np.mean([v["compile_and_first_step"]["cpu"]
                                        for v in per_arm.values()]))
    s = timing["sampling"]
    n_items = size.eval_per_category * len(arms_lib.CATEGORIES)
    batches = -(-n_items // s["batch"])
    eval_cpu = (runs + 1) * batches * (s["batch_sampling"]["cpu"] + s["batch_scoring"]["cpu"])
    total = train_cpu + compile_cpu + eval_cpu + s["compile_and_first_batch"]["cpu"]
    return {"runs": runs, "train_cpu_s": train_cpu, "compile_cpu_s": compile_cpu,
            "eval_cpu_s": eval_cpu, "total_cpu_s": total,
            "idle_wall_s_range": [total / cores, total]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", default="full", choices=sorted(arms_lib.SIZES))
    p.add_argument("--steps", type=int, default=5, help="train steps timed per arm")
    p.add_argument("--finetune_items", type=int, default=64)
    p.add_argument("--arms", nargs="*", default=["ldm_only", "goal", "no_maalign",
                                                 "no_dsalign"])
    args = p.parse_args(argv)
    from experiments.shapes_world import run

    size = arms_lib.SIZES[args.size]
    world = run.world_info(args.world)
    ft_dir = os.path.join(args.workdir, "finetune")
    datasets.write_finetune_set(ft_dir, args.finetune_items, arms_lib.FINETUNE_MIX,
                                world["resolution"])
    specs = arms_lib.arm_specs(size.main_scale)
    timing = {"size": dataclasses.asdict(size), "world": world, "train": {},
              "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    for name in args.arms:
        o = arms_lib.run_overrides(specs[name], size, 0, world, ft_dir,
                                   os.path.join(args.workdir, "tfds"), "")
        timing["train"][name] = time_train(o, args.steps)
        print(f"[timing] {name}: {json.dumps(timing['train'][name])}", flush=True)
    timing["sampling"] = time_sampling(world, size, 32)
    print(f"[timing] sampling: {json.dumps(timing['sampling'])}", flush=True)
    timing["loadavg_end"] = os.getloadavg()
    timing["estimate"] = estimate(timing, size)
    with open(os.path.join(args.workdir, "timing.json"), "w", encoding="utf-8") as f:
        json.dump(timing, f, indent=1)
    e = timing["estimate"]
    print(f"[timing] size {size.name}: {e['runs']} runs, CPU {e['total_cpu_s'] / 3600:.2f} h "
          f"(train {e['train_cpu_s'] / 3600:.2f} h, compile {e['compile_cpu_s'] / 3600:.2f} h, "
          f"eval {e['eval_cpu_s'] / 3600:.2f} h); idle 2-core wall "
          f"{e['idle_wall_s_range'][0] / 3600:.2f}-{e['idle_wall_s_range'][1] / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
