"""Evaluate layout planning and grounded generation on NSR-1K and T2I-CompBench.

NSR-1K (LayoutGPT's counting and spatial prompts; give LayoutGPT's ``dataset/NSR-1K``
folder or the json files). Planner metrics only (no model needed)::

    python scripts/evaluate.py nsr --nsr LayoutGPT/dataset/NSR-1K --output_dir eval/nsr

Scoring layouts from any planner (no planner is run): LayoutGPT's planner outputs (its
``llm_output/<task>/*.json``) or a goal_jax plan JSONL, one task per call; writes
``OUT/results.json`` (``{"counting": {"precision", "recall", "accuracy", ...}}`` or
``{"spatial": {"accuracy", "missing", ...}}`` x100 with LayoutGPT's name matching, the same
under ``counting_goal_jax`` / ``spatial_goal_jax`` with goal_jax's stricter matching) and
``OUT/results.md``::

    python scripts/evaluate.py nsr --nsr LayoutGPT/dataset/NSR-1K --task counting \\
        --predictions LayoutGPT/llm_output/counting/gpt4.counting.k-similar.k_8.px_64.json \\
        --output_dir eval/gpt4_counting

With images from the planned (or ``--layouts gt``) layouts, CLIP similarity and detection
accuracy (GroundingDINO, an open stand-in for LayoutGPT's GLIP)::

    python scripts/evaluate.py nsr --nsr LayoutGPT/dataset/NSR-1K --output_dir eval/nsr \\
        --pretrained /models/gligen-1-4-generation-text-box --checkpoint workdir/checkpoints \\
        --clip /models/clip-vit-large-patch14 --detector /models/grounding-dino-base

T2I-CompBench (their prompt files; one output folder per file, scored afterwards by their
BLIP-VQA / UniDet / 3-in-1 scripts as ``<output_dir>/<file stem>/SCORING.md`` says; CLIPScore
is computed here with ``--clip``, e.g. a local ``openai/clip-vit-base-patch32``)::

    python scripts/evaluate.py compbench --prompts T2I-CompBench/examples/dataset/color_val.txt \\
        --output_dir eval/compbench --pretrained ... --checkpoint ... --n_images 10

After running T2I-CompBench's scorers (``<output_dir>/<file stem>/SCORING.md``), one table of
their scores next to the GOAL paper's::

    python scripts/evaluate.py compbench summarize eval/compbench

Shapes world: the oracle (goal_jax.evaluation.oracle; pixels only, no CLIP) scores a folder
written by ``scripts/sample.py`` -- per box presence, colour, shape, texture and IoU, per image
the category's verdict (colour / shape / texture binding, spatial, counting, complex)::

    python scripts/evaluate.py oracle --samples samples/ --output_dir eval/oracle

Each run writes ``results.md`` and ``results.json`` (settings, checkpoint, metrics) to
``--output_dir``. Layout planning flags are those of ``scripts/plan.py`` (``--planner``...).

Several processes (one per host, ``--coordinator_address/--num_processes/--process_id`` or
``--distributed``, goal_jax.distributed): every process plans the same prompts and generates its
share of the images on its own devices (image k on process ``k % num_processes``, each written
once); process 0 then scores them and writes every other file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from goal_jax import distributed  # noqa: E402
from scripts import plan as plan_script  # noqa: E402


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True)
    plan_script.add_planner_flags(p)
    g = p.add_argument_group("generation (images only when --pretrained is given)")
    g.add_argument("--pretrained", default=None, help="diffusers GLIGEN pipeline folder")
    g.add_argument("--checkpoint", default=None, help="training checkpoint directory")
    g.add_argument("--checkpoint_step", type=int, default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--cfg", type=float, default=7.5)
    g.add_argument("--beta", type=float, default=0.3)
    g.add_argument("--sampler", choices=("ddim", "dpm++2m", "pndm"), default="ddim")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=None,
                   help="images per sampler call (default: the device count)")
    g.add_argument("--num_devices", type=int, default=None)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--seed", type=int, default=None,
                   help="first seed (default: 0 for nsr, 42 for compbench as their scripts)")
    g.add_argument("--overwrite", action="store_true", help="regenerate existing images")
    m = p.add_argument_group("image metrics")
    m.add_argument("--clip", default=None, help="Hugging Face CLIPModel folder")
    m.add_argument("--clip_tokenizer", default=None,
                   help="CLIP tokenizer folder (default: the --clip folder)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each file")
    distributed.add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    nsr = sub.add_parser("nsr", help="NSR-1K counting and spatial")
    nsr.add_argument("--nsr", nargs="+", required=True,
                     help="NSR-1K folder, or counting/spatial json files")
    nsr.add_argument("--split", default="val", help="file split in a folder (val)")
    nsr.add_argument("--tasks", default="counting,spatial")
    nsr.add_argument("--layouts", choices=("planned", "gt"), default="planned",
                     help="layouts the images are generated from")
    nsr.add_argument("--n_iter", type=int, default=1, help="images per prompt")
    nsr.add_argument("--predictions", default=None,
                     help="score this file of layouts instead of running a planner: "
                          "LayoutGPT's llm_output JSON or a goal_jax plan JSONL (needs --task)")
    nsr.add_argument("--task", choices=("counting", "spatial"), default=None,
                     help="the task of --predictions")
    nsr.add_argument("--detector", default=None,
                     help="transformers GroundingDINO folder (detection accuracy)")
    nsr.add_argument("--box_threshold", type=float, default=0.35)
    nsr.add_argument("--text_threshold", type=float, default=0.25)
    _add_common(nsr)
    cb = sub.add_parser("compbench", help="T2I-CompBench prompt files (then `compbench "
                        "summarize DIR` tabulates their scorers' outputs)")
    cb.add_argument("--prompts", nargs="+", required=True, help="prompt files (e.g. "
                    "examples/dataset/color_val.txt)")
    cb.add_argument("--n_images", type=int, default=10, help="images per prompt")
    cb.add_argument("--complex_partial", action="store_true",
                    help="allow complex_val with other than 10 images per prompt or --limit "
                         "(3-in-1 cannot score it then)")
    _add_common(cb)
    add_oracle_parser(sub)
    return p


def build_summarize_parser() -> argparse.ArgumentParser:
    """``compbench summarize``: T2I-CompBench scorer outputs -> one table."""
    p = argparse.ArgumentParser(prog="evaluate.py compbench summarize",
                                description="Reads T2I-CompBench's scorer outputs back into one "
                                            "table next to the GOAL paper's numbers.")
    p.add_argument("dirs", nargs="+", help="a compbench --output_dir (one folder per prompt "
                   "file inside) or the per-file folders themselves")
    p.add_argument("--output", default=None,
                   help="markdown file to write (default: <first dir>/compbench_scores.md)")
    return p


def summarize_compbench(argv: Sequence[str]) -> int:
    from goal_jax.evaluation import compbench

    args = build_summarize_parser().parse_args(argv)
    try:
        rows = compbench.collect_scores(args.dirs)
    except compbench.CompBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = compbench.scores_markdown(rows)
    out = args.output or os.path.join(args.dirs[0], "compbench_scores.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}")
    return 0


def score_predictions(args, parser) -> int:
    """``nsr --predictions FILE --task T``: layout metrics of a prediction file."""
    from goal_jax.evaluation import nsr, report

    if args.task is None:
        parser.error("--predictions needs --task counting|spatial")
    if args.pretrained is not None or args.limit is not None:
        parser.error("--predictions scores layouts only: drop --pretrained / --limit")
    start = time.time()
    try:
        files = {}
        for path in args.nsr:
            files.update(nsr.find_files(path, args.split))
        if args.task not in files:
            raise FileNotFoundError(f"no NSR-1K {args.task} file in {args.nsr}")
        items, dropped = nsr.load(files[args.task], args.output_dir)
        preds = nsr.read_predictions(args.predictions, items)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = nsr.score_predictions(items, preds, args.output_dir)
    res["dropped"] = dropped
    settings = {"predictions": os.path.abspath(args.predictions),
                "nsr_file": os.path.abspath(files[args.task]), "task": args.task}
    md, js = report.write(args.output_dir, "NSR-1K", {args.task: res}, settings, None)
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {md} and {js} ({time.time() - start:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# oracle: the shapes-world oracle on a scripts/sample.py folder (self-contained).
# ----------------------------------------------------------------------------------------------


def add_oracle_parser(sub) -> None:
    o = sub.add_parser("oracle", help="shapes world: score a scripts/sample.py folder with the "
                       "pixel oracle (no CLIP)")
    o.add_argument("--samples", required=True, help="folder written by scripts/sample.py")
    o.add_argument("--output_dir", default=None,
                   help="where results.json / results.md go (default: --samples)")
    o.add_argument("--oracle", default=None,
                   help="oracle folder (default: assets/shapes_world/oracle)")


def run_oracle(args) -> int:
    """Scores ``args.samples`` with the shapes-world oracle; writes results.json (per item,
    per box, per-category means) and results.md to ``args.output_dir``; returns 0, or 2 with
    an error naming the folder / file."""
    from goal_jax.evaluation import oracle as oracle_lib

    start = time.time()
    try:
        oracle = oracle_lib.Oracle.load(args.oracle)
        scored = oracle_lib.score_folder(args.samples, oracle)
    except (ValueError, FileNotFoundError) as e:  # OracleError names the item / file
        print(f"error: {e}", file=sys.stderr)
        return 2
    md, js = oracle_lib.write_results(args.output_dir or args.samples, scored)
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {md} and {js} ({time.time() - start:.1f} s)")
    return 0


def load_generator(args):
    """--pretrained (+ --checkpoint) -> (SamplerGenerator, settings dict)."""
    import jax
    import jax.numpy as jnp

    from goal_jax import sampling, weights
    from goal_jax.evaluation import generate

    options = sampling.SampleOptions(sampler=args.sampler, num_steps=args.steps,
                                     guidance_scale=args.cfg, beta=args.beta,
                                     height=args.height, width=args.width)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:  # either pipeline form (safetensors / orbax); the checkpoint's params only
        pipe = weights.load_pipeline(args.pretrained, dtype=dtype)
        unet_params, info = None, None
        if args.checkpoint is not None:
            unet_params, info = weights.load_trained_unet(args.checkpoint, pipe.unet_params,
                                                          args.checkpoint_step)
            info = {k: v for k, v in info.items() if k != "metadata"}
    except weights.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    devices = jax.local_devices()  # this process's: each process makes its own images
    if args.num_devices is not None:
        devices = devices[:args.num_devices]
    sampler = sampling.GLIGENPipeline(pipe, unet_params=unet_params, devices=devices)
    height, width = sampler.image_size(options)
    gen = generate.SamplerGenerator(sampler, options, args.batch_size)
    settings = dict(options.to_dict(), height=height, width=width, dtype=args.dtype,
                    batch_size=gen.batch_size, num_devices=len(devices),
                    checkpoint_info=info)
    return gen, settings


def checkpoint_name(args) -> str | None:
    if args.pretrained is None:
        return None
    name = os.path.abspath(args.pretrained)
    if args.checkpoint is not None:
        step = "latest" if args.checkpoint_step is None else args.checkpoint_step
        name += f" + {os.path.abspath(args.checkpoint)} (step {step})"
    return name


def main(argv: Sequence[str] | None = None) -> int:
    from goal_jax import planner as planner_lib
    from goal_jax.evaluation import compbench, metrics, nsr, report

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["compbench", "summarize"]:
        return summarize_compbench(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark == "oracle":
        return run_oracle(args)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.benchmark == "nsr" and args.predictions is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        return score_predictions(args, parser)
    if args.benchmark == "compbench":  # before any model is loaded
        try:
            for path in args.prompts:
                compbench.preflight(path, args.n_images, args.limit, args.complex_partial)
        except compbench.CompBenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        distributed.initialize_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    primary = distributed.is_primary()  # scores and writes the files; all make images
    start = time.time()
    try:
        planner = plan_script.make_planner(args)
    except planner_lib.PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {"planner": planner.name, "planner_k": args.k, "planner_canvas": args.canvas,
                "planner_examples": args.examples, "limit": args.limit}
    generator = None
    if args.pretrained is not None:
        generator, gen_settings = load_generator(args)
        settings["sampling"] = gen_settings
    elif args.clip is not None or getattr(args, "detector", None) is not None:
        parser.error("--clip / --detector score generated images: give --pretrained too")
    clip_scorer = None
    if args.clip is not None and primary:
        from goal_jax.text import TokenizerError

        try:
            clip_scorer = metrics.ClipScorer.from_folder(
                args.clip, args.clip_tokenizer,
                fallback_tokenizer=os.path.join(args.pretrained, "tokenizer"))
        except TokenizerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        settings["clip"] = os.path.abspath(args.clip)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.benchmark == "nsr":
        seed = 0 if args.seed is None else args.seed
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in nsr.TASKS]
        if bad:
            parser.error(f"--tasks: unknown {bad}; choose from {nsr.TASKS}")
        files = {}
        try:
            for path in args.nsr:
                files.update(nsr.find_files(path, args.split))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        detector = None
        if args.detector is not None and primary:
            from goal_jax.evaluation.detector import GroundingDinoDetector

            detector = GroundingDinoDetector(args.detector, args.box_threshold,
                                             args.text_threshold)
            settings["detector"] = {"GroundingDINO": os.path.abspath(args.detector),
                                    "box_threshold": args.box_threshold,
                                    "text_threshold": args.text_threshold}
        items, dropped = [], {}
        for task in tasks:
            if task not in files:
                print(f"note: no {task} file found; skipping {task}")
                continue
            task_items, task_dropped = nsr.load(files[task], args.output_dir, args.limit)
            items += task_items
            dropped[task] = task_dropped
        settings.update(nsr_files={t: os.path.abspath(p) for t, p in files.items()},
                        layouts=args.layouts, n_iter=args.n_iter, seed=seed)
        results = nsr.evaluate(items, args.output_dir, planner, generator, args.layouts,
                               args.n_iter, seed, clip_scorer, detector, args.overwrite)
        for task, d in dropped.items():
            if task in results:
                results[task]["dropped"] = d
        if not primary:
            return 0
        md, js = report.write(args.output_dir, "NSR-1K", results, settings,
                              checkpoint_name(args))
    else:
        seed = 42 if args.seed is None else args.seed
        settings.update(n_images=args.n_images, seed=seed)
        results = {}
        try:
            for path in args.prompts:
                stem = os.path.splitext(os.path.basename(path))[0]
                results[stem] = compbench.run(path, os.path.join(args.output_dir, stem), planner,
                                              generator, args.n_images, seed, clip_scorer,
                                              args.limit, args.overwrite,
                                              complex_partial=args.complex_partial)
        except compbench.CompBenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not primary:
            return 0
        md, js = report.write(args.output_dir, "T2I-CompBench", results, settings,
                              checkpoint_name(args))
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {md} and {js} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
