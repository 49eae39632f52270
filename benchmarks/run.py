"""goal_jax vs the PyTorch reference, side by side: train step, sampling, U-Net forward, memory.

    python -m benchmarks.run --suite cpu --size tiny|small|all [--steps 10] [--warmup 2]
        [--benches train,train_trimmed,sample,unet] [--batches 1,4] [--sample-steps 25]
        [--sample-repeats 5] [--encoded-box-slots 8] [--encoded-phrase-tokens 16]
        [--results benchmarks/RESULTS.md | --results none] [--jsonl out.jsonl]

For each size (benchmarks/models.py) the parent process writes one set of random PyTorch models
(a diffusers StableDiffusionGLIGENPipeline folder + a transformers CLIPModel folder) and both
frameworks load the SAME weights from it (goal_jax through ``goal_jax.weights``), with the SAME
numpy inputs. Every measurement then runs in its own fresh subprocess (one framework, one bench,
one batch size), so its peak RSS (``ru_maxrss``: models + inputs + compiled programs + activations)
is separable. Measurements:

* ``train``: one full GOAL optimisation step, all three losses (L_LDM + α L_DSA + β L_MAA, paper
  weights, 30 box slots for ``small``), AdamW on the paper's trainable set. goal_jax:
  ``train.make_train_step`` (one jit program, compiled ahead of time: ``compile_s``); PyTorch:
  ``tests/reference/goal_reference.train_step`` (eager, fp32). Median / min / max over ``--steps``
  steps after ``--warmup`` steps.
* ``train_trimmed``: the same step with goal_jax's ``train.encoded_box_slots = K`` and
  ``train.encoded_phrase_tokens = L`` (``--encoded-box-slots``, ``--encoded-phrase-tokens``: the
  phrase encoders and the DSAlign CLIP run on the first K box slots only, the phrase encoders on
  the first L tokens; the benchmark items have 2-3 boxes and phrases of at most 5 tokens, so the
  losses and gradients are those of ``train``), against the same PyTorch reference step (which
  encodes all N slots x 77 tokens; its ``train`` record is reused when it was measured in the
  same run). The ratio shows what skipping padding buys, not kernel speed.
* ``sample``: ``--sample-steps`` DDIM steps with classifier-free guidance (7.5), scheduled
  sampling β = 0.3, text encoding and VAE decode included, same initial noise. goal_jax:
  ``sampling.GLIGENPipeline`` (``compile_s`` = its first-call compile); PyTorch: diffusers'
  ``StableDiffusionGLIGENPipeline`` (output_type="np"). Times per image (batch 1).
* ``unet``: one GLIGEN U-Net forward (grounding on) without gradients.

Threads: torch.set_num_threads(os.cpu_count()); XLA's CPU client uses one intra-op pool with one
thread per core by default (the same count). Workers run on a single JAX CPU device (the test
suite's ``--xla_force_host_platform_device_count`` is removed from XLA_FLAGS).

Output: one JSON line per measurement (``"kind": "measurement"``) and per comparison
(``"kind": "ratio"``: ``time_ratio`` = goal_jax / PyTorch median time, ``speedup`` = its inverse,
``rss_ratio`` = goal_jax / PyTorch peak RSS), and the rewritten section of ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import models as bm

BENCHES = ("train", "train_trimmed", "sample", "unet")
FRAMEWORKS = ("goal_jax", "pytorch")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


# ==============================================================================================
# Helpers (both sides).
# ==============================================================================================


def _rss_mib() -> float:
    """Current resident set size in MiB (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """(warm-up times, timed times) in seconds of ``fn()`` (which must block until done)."""
    warm, timed = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        (warm if i < warmup else timed).append(time.perf_counter() - start)
    return warm, timed


def _summary(times: list[float], per: int = 1) -> dict:
    return {"median_s": statistics.median(times) / per, "min_s": min(times) / per,
            "max_s": max(times) / per, "n": len(times)}


def worker_env() -> dict:
    """Environment of a worker: one JAX CPU device, repository on PYTHONPATH."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = bm.ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
    return env


# ==============================================================================================
# Workers: one measurement per process.
# ==============================================================================================


def _jax_worker(args, size, paths) -> dict:
    import jax
    import jax.numpy as jnp

    from goal_jax import sampling, text, train, weights

    rec: dict = {"threads": os.cpu_count(), "device": str(jax.devices()[0].platform)}
    if args.bench in ("train", "train_trimmed"):
        cfg = train.default_train_config()
        cfg.model.pipeline, cfg.model.clip = paths["pipeline"], paths["clip"]
        cfg.maa_resolution = size.maa_resolution
        if args.bench == "train_trimmed":
            cfg.encoded_box_slots = min(args.encoded_box_slots, size.max_boxes)
            cfg.encoded_phrase_tokens = args.encoded_phrase_tokens
            rec["encoded_box_slots"] = cfg.encoded_box_slots
            rec["encoded_phrase_tokens"] = cfg.encoded_phrase_tokens
        models, params = train.load_models(cfg)
        opt, lr = train.make_optimizer(cfg)
        st, frozen = train.create_train_state(params, cfg, opt, jax.random.PRNGKey(0))
        step = train.make_train_step(models, cfg, opt, lr)
        tok = text.load_tokenizer(paths["tokenizer"])
        host_batch = bm.train_batch(size, tok, args.batch)
        if args.bench == "train_trimmed":  # the trimmed step computes the same loss: checked
            train.check_box_slots(host_batch["masks"], cfg.encoded_box_slots)
            train.check_phrase_tokens(host_batch["phrase_input_ids"], host_batch["masks"],
                                      cfg.encoded_phrase_tokens, train.phrase_eos_token_ids(models))
        batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
        rec["setup_rss_mib"] = _rss_mib()
        start = time.perf_counter()
        compiled = step.jitted.lower(st, frozen, batch).compile()
        rec["compile_s"] = time.perf_counter() - start
        box = {"state": st, "metrics": None}

        def run():
            box["state"], box["metrics"] = compiled(box["state"], frozen, batch)
            jax.block_until_ready(box["metrics"])

        warm, times = _timed(run, args.warmup, args.steps)
        rec["loss_total"] = float(box["metrics"]["total"])
        rec.update(_summary(times), first_call_s=warm[0] if warm else None)
    elif args.bench == "unet":
        unet, p = weights.load_unet(os.path.join(paths["pipeline"], "unet"))
        x = bm.unet_inputs(size, args.batch)
        g = {"boxes": jnp.asarray(x["boxes"]), "phrase_embeds": jnp.asarray(x["phrase_embeds"]),
             "masks": jnp.asarray(x["masks"])}
        fwd = jax.jit(lambda p, z, t, c, g: unet.apply({"params": p}, z, t, c, grounding=g,
                                                       gligen_scale=1.0))
        inputs = (p, jnp.asarray(x["latents"]), jnp.asarray(x["t"]), jnp.asarray(x["context"]),
                  g)
        rec["setup_rss_mib"] = _rss_mib()
        start = time.perf_counter()
        compiled = fwd.lower(*inputs).compile()
        rec["compile_s"] = time.perf_counter() - start
        box = {}

        def run():
            box["out"] = jax.block_until_ready(compiled(*inputs))

        warm, times = _timed(run, args.warmup, args.steps)
        rec["out_abs_mean"] = float(jnp.abs(box["out"]).mean())
        rec.update(_summary(times), first_call_s=warm[0] if warm else None)
    else:  # sample
        pipe = weights.load_pipeline(paths["pipeline"])
        sampler = sampling.GLIGENPipeline(pipe, devices=jax.devices()[:1])
        captions, layouts, noise = bm.sample_inputs(size, args.batch)
        options = sampling.SampleOptions(num_steps=args.sample_steps, guidance_scale=7.5,
                                         beta=0.3, sampler="ddim")
        seeds = list(range(args.batch))
        rec["setup_rss_mib"] = _rss_mib()
        start = time.perf_counter()
        first = sampler.sample(captions, layouts, seeds, options, noise=noise)
        rec["first_call_s"] = time.perf_counter() - start
        rec["compile_s"] = first.compile_s
        box = {}

        def run():
            box["out"] = sampler.sample(captions, layouts, seeds, options, noise=noise)

        _, times = _timed(run, max(args.warmup - 1, 0), args.sample_repeats)
        rec["image_mean"] = float(box["out"].images_float.mean())
        rec.update(_summary(times, per=args.batch), per="image",
                   sample_steps=args.sample_steps)
    return rec


def _torch_worker(args, size, paths) -> dict:
    import numpy as np
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionGLIGENPipeline,
                           UNet2DConditionModel)
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPModel, CLIPTextModel

    torch.set_num_threads(os.cpu_count())
    rec: dict = {"threads": torch.get_num_threads(), "device": "cpu"}
    pipe_dir = paths["pipeline"]
    if args.bench in ("train", "train_trimmed"):  # the reference always encodes all N slots
        from goal_jax import text
        from tests.reference import goal_reference as ref

        unet = UNet2DConditionModel.from_pretrained(os.path.join(pipe_dir, "unet")).eval()
        vae = AutoencoderKL.from_pretrained(os.path.join(pipe_dir, "vae")).eval()
        te = CLIPTextModel.from_pretrained(os.path.join(pipe_dir, "text_encoder")).eval()
        clip = CLIPModel.from_pretrained(paths["clip"]).eval()
        sched = DDPMScheduler.from_pretrained(os.path.join(pipe_dir, "scheduler"))
        store = ref.capture_cross_attention(unet, bm.maa_layers_torch(size))
        # The reference installs diffusers' classic AttnProcessor on the layers it does not
        # record; use the fused SDPA processor there (same math, faster): the strongest
        # eager PyTorch baseline.
        unet.set_attn_processor({n: p if isinstance(p, ref.ProbsAttnProcessor)
                                 else AttnProcessor2_0()
                                 for n, p in unet.attn_processors.items()})
        trainable = [p for _, p in ref.trainable_parameters(unet)]
        ref.freeze(vae, te, clip)
        opt = ref.make_optimizer(trainable)
        models = ref.RefModels(unet, vae, te, clip, sched)
        tok = text.load_tokenizer(paths["tokenizer"])
        batch = {k: torch.from_numpy(np.ascontiguousarray(v))
                 for k, v in bm.train_batch(size, tok, args.batch).items()}
        for k in ("input_ids", "phrase_input_ids"):
            batch[k] = batch[k].long()
        cfg = ref.RefConfig(attention_layers=bm.maa_layers_torch(size))
        gen = torch.Generator().manual_seed(0)
        rec["setup_rss_mib"] = _rss_mib()
        box = {}

        def run():
            box["metrics"] = ref.train_step(models, opt, batch, cfg, gen, store=store)

        warm, times = _timed(run, args.warmup, args.steps)
        rec["loss_total"] = box["metrics"]["total"]
        rec.update(_summary(times), first_call_s=warm[0] if warm else None, compile_s=0.0)
    elif args.bench == "unet":
        unet = UNet2DConditionModel.from_pretrained(os.path.join(pipe_dir, "unet")).eval()
        x = bm.unet_inputs(size, args.batch)
        latents = torch.from_numpy(x["latents"].transpose(0, 3, 1, 2).copy())
        t = torch.from_numpy(x["t"]).long()
        ctx = torch.from_numpy(x["context"])
        gligen = {"boxes": torch.from_numpy(x["boxes"]),
                  "positive_embeddings": torch.from_numpy(x["phrase_embeds"]),
                  "masks": torch.from_numpy(x["masks"])}
        rec["setup_rss_mib"] = _rss_mib()
        box = {}

        def run():
            with torch.inference_mode():
                box["out"] = unet(latents, t, encoder_hidden_states=ctx,
                                  cross_attention_kwargs={"gligen": gligen}).sample

        warm, times = _timed(run, args.warmup, args.steps)
        rec["out_abs_mean"] = float(box["out"].abs().mean())
        rec.update(_summary(times), first_call_s=warm[0] if warm else None, compile_s=0.0)
    else:  # sample
        pipe = StableDiffusionGLIGENPipeline.from_pretrained(pipe_dir)
        pipe.set_progress_bar_config(disable=True)
        captions, layouts, noise = bm.sample_inputs(size, args.batch)
        if args.batch != 1:
            raise ValueError("the diffusers GLIGEN pipeline takes one layout per call: "
                             "sample with --batches 1")
        latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
        rec["setup_rss_mib"] = _rss_mib()
        box = {}

        def run():
            with torch.inference_mode():
                box["out"] = pipe(
                    prompt=captions[0], gligen_phrases=list(layouts[0].phrases),
                    gligen_boxes=[list(b) for b in layouts[0].boxes],
                    gligen_scheduled_sampling_beta=0.3, num_inference_steps=args.sample_steps,
                    guidance_scale=7.5, latents=latents, output_type="np").images

        start = time.perf_counter()
        run()
        rec["first_call_s"] = time.perf_counter() - start
        _, times = _timed(run, max(args.warmup - 1, 0), args.sample_repeats)
        rec["image_mean"] = float(box["out"].mean())
        rec.update(_summary(times, per=args.batch), per="image", compile_s=0.0,
                   sample_steps=args.sample_steps)
    return rec


def run_worker(args) -> None:
    size = bm.SIZES[args.size]
    with open(os.path.join(args.folder, "paths.json"), encoding="utf-8") as f:
        paths = json.load(f)
    fn = _jax_worker if args.framework == "goal_jax" else _torch_worker
    rec = {"kind": "measurement", "suite": args.suite, "size": args.size, "bench": args.bench,
           "framework": args.framework, "batch": args.batch, "warmup": args.warmup,
           "dtype": "float32"}
    rec.update(fn(args, size, paths))
    rec["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(rec), flush=True)


def run_build(args) -> None:
    """Writes the random models of ``args.size`` into ``args.folder`` (+ paths.json)."""
    paths = bm.write_folder(bm.SIZES[args.size], args.folder, seed=0)
    with open(os.path.join(args.folder, "paths.json"), "w", encoding="utf-8") as f:
        json.dump(paths, f)


# ==============================================================================================
# Parent: orchestration, ratios, RESULTS.md.
# ==============================================================================================


def _subprocess(argv: list[str], timeout: float) -> list[dict]:
    """Runs ``python -m benchmarks.run <argv>``; returns its JSON lines (stderr passes through
    on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.run", *argv]
    proc = subprocess.run(cmd, cwd=bm.ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}): {' '.join(argv)}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def ratio_record(jax_rec: dict, torch_rec: dict) -> dict:
    """goal_jax / PyTorch comparison of two measurements of the same bench."""
    time_ratio = jax_rec["median_s"] / torch_rec["median_s"]
    return {"kind": "ratio", "suite": jax_rec["suite"], "size": jax_rec["size"],
            "bench": jax_rec["bench"], "batch": jax_rec["batch"],
            "goal_jax_median_s": jax_rec["median_s"], "pytorch_median_s": torch_rec["median_s"],
            "time_ratio": time_ratio, "speedup": 1.0 / time_ratio,
            "rss_ratio": jax_rec["peak_rss_mib"] / torch_rec["peak_rss_mib"]}


def machine_info() -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "absent"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2 ** 20:.1f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "python": platform.python_version(), "os": platform.platform(),
            "versions": versions, "load_avg": os.getloadavg()}


def _fmt(x, digits=3):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def results_section(size: str, records: list[dict], info: dict, args, started: str,
                    load_before, load_after) -> str:
    meas = [r for r in records if r["kind"] == "measurement"]
    ratios = {(r["bench"], r["batch"]): r for r in records if r["kind"] == "ratio"}
    v = info["versions"]
    lines = [
        f"### CPU suite, size `{size}` ({started} UTC)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; {info['os']}; "
        f"Python {info['python']}. Threads: torch.set_num_threads({info['cores']}); XLA CPU "
        f"default intra-op pool ({info['cores']} threads), one JAX CPU device.",
        f"Versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
        f"torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}.",
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {' / '.join(f'{x:.2f}' for x in load_after)}.",
        f"Command: `python -m benchmarks.run {' '.join(args.argv)}`; {args.warmup} warm-up + "
        f"{args.steps} timed steps (train, unet); sampling: {args.sample_steps} DDIM steps, "
        f"CFG 7.5, β 0.3, {args.sample_repeats} timed runs, times per image. fp32.",
        f"`train_trimmed`: goal_jax with `train.encoded_box_slots={args.encoded_box_slots}` "
        "(at most the size's N), "
        f"`train.encoded_phrase_tokens={args.encoded_phrase_tokens}` (same losses and gradients "
        "for these items: padded slots and tokens after each phrase's EOS are not encoded) "
        "against the PyTorch `train` row of the same batch.",
        "",
        "| bench | batch | framework | median s | min–max s | compile s | first call s "
        "| peak RSS MiB | goal_jax / PyTorch time | speedup | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in meas:
        ratio = ratios.get((r["bench"], r["batch"]))
        show = ratio is not None and r["framework"] == "goal_jax"
        lines.append(
            f"| {r['bench']} | {r['batch']} | {r['framework']} | {_fmt(r['median_s'])} | "
            f"{_fmt(r['min_s'])}–{_fmt(r['max_s'])} | {_fmt(r.get('compile_s'))} | "
            f"{_fmt(r.get('first_call_s'))} | {r['peak_rss_mib']:.0f} | "
            f"{_fmt(ratio['time_ratio']) if show else ''} | "
            f"{(_fmt(ratio['speedup']) + '×') if show else ''} | "
            f"{_fmt(ratio['rss_ratio']) if show else ''} |")
    return "\n".join(lines) + "\n"


def rewrite_results(path: str, key: str, section: str) -> None:
    """Replaces the block between ``<!-- <key>:begin -->`` and ``<!-- <key>:end -->`` in
    ``path`` (appends it, or creates the file, when absent)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{section}{end}"
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# goal_jax benchmarks\n\n") + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_suite(args) -> list[dict]:
    sizes = ("tiny", "small") if args.size == "all" else (args.size,)
    benches = [b for b in args.benches.split(",") if b]
    batches = [int(b) for b in args.batches.split(",") if b]
    for b in benches:
        if b not in BENCHES:
            raise SystemExit(f"--benches: unknown bench {b!r} (choose from {BENCHES})")
    info = machine_info()
    out_records = []
    jsonl = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if jsonl:
            jsonl.write(line + "\n")
            jsonl.flush()
        out_records.append(rec)

    try:
        for size in sizes:
            started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
            load_before = os.getloadavg()
            folder = tempfile.mkdtemp(prefix=f"goal_bench_{size}_")
            records = []
            try:
                _subprocess(["--build", "--size", size, "--folder", folder], args.timeout)
                for bench in benches:
                    for batch in ([1] if bench == "sample" else batches):
                        pair = {}
                        if bench == "train_trimmed":  # same PyTorch step as "train"
                            pair.update({r["framework"]: r for r in records
                                         if r["kind"] == "measurement" and r["bench"] == "train"
                                         and r["batch"] == batch and r["framework"] == "pytorch"})
                        for fw in FRAMEWORKS:
                            if fw in pair:
                                continue
                            argv = ["--worker", "--suite", args.suite, "--size", size,
                                    "--folder", folder, "--framework", fw, "--bench", bench,
                                    "--batch", str(batch), "--steps", str(args.steps),
                                    "--warmup", str(args.warmup),
                                    "--sample-steps", str(args.sample_steps),
                                    "--sample-repeats", str(args.sample_repeats),
                                    "--encoded-box-slots", str(args.encoded_box_slots),
                                    "--encoded-phrase-tokens", str(args.encoded_phrase_tokens)]
                            for rec in _subprocess(argv, args.timeout):
                                emit(rec)
                                records.append(rec)
                                pair[fw] = rec
                        rec = ratio_record(pair["goal_jax"], pair["pytorch"])
                        emit(rec)
                        records.append(rec)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if args.results != "none":
                rewrite_results(args.results, f"cpu-{size}", results_section(
                    size, records, info, args, started, load_before, os.getloadavg()))
    finally:
        if jsonl:
            jsonl.close()
    return out_records


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="cpu", choices=("cpu",))
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "all"))
    p.add_argument("--benches", default=",".join(BENCHES))
    p.add_argument("--batches", default="1,4", help="batch sizes of train and unet")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--encoded-box-slots", type=int, default=8,
                   help="goal_jax's train.encoded_box_slots in the train_trimmed bench")
    p.add_argument("--encoded-phrase-tokens", type=int, default=16,
                   help="goal_jax's train.encoded_phrase_tokens in the train_trimmed bench")
    p.add_argument("--results", default=RESULTS, help="markdown file to update, or 'none'")
    p.add_argument("--jsonl", default="", help="also append the JSON lines to this file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    # internal
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--framework", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--bench", choices=BENCHES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.sample_repeats < 1 or args.sample_steps < 1:
        p.error("need --steps >= 1, --warmup >= 0, --sample-repeats >= 1, --sample-steps >= 1")
    args.argv = list(argv)
    return args


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.build:
        run_build(args)
    elif args.worker:
        run_worker(args)
    else:
        run_suite(args)


if __name__ == "__main__":
    main()
