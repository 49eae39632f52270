"""GPU benchmark (H100 / H200): goal_jax vs PyTorch at the SD-1.4 size, random weights.

Run through ``benchmarks/gpu.sh`` (which gives each side its own process and time limit):

    python -m benchmarks.gpu_bench --side jax   --size sd14 --out DIR   # goal_jax only
    python -m benchmarks.gpu_bench --side torch --size sd14 --out DIR   # PyTorch reference
    python -m benchmarks.gpu_bench --report DIR                         # table from DIR/*.jsonl

Measurements (bf16 compute, float32 parameters and optimizer state, both sides):

* ``sample``: 512x512, ``--sample-steps`` (50) DDIM steps, classifier-free guidance 7.5,
  scheduled sampling β = 0.3, 30 box slots, text encoding and VAE decode included; batch 1 and
  8 (``--sample-batches``). goal_jax: ``sampling.GLIGENPipeline`` (bf16 modules); PyTorch:
  diffusers' ``StableDiffusionGLIGENPipeline`` in bfloat16 with SDPA attention
  (``num_images_per_prompt`` = batch).
* ``train``: the GOAL train step with all three losses (paper weights), AdamW on fusers + attn1
  + attn2, batch 1 and 8 (``--train-batches``).
  goal_jax: ``train.make_train_step`` (dtype bfloat16, remat=True: U-Net blocks, VAE decoder and
  CLIP encoder layers); PyTorch: ``tests/reference/goal_reference.train_step`` under
  ``torch.autocast(bfloat16)`` with diffusers' gradient checkpointing of U-Net and VAE, and with
  ``--clip-remat`` (gpu.sh's default) transformers' CLIP gradient checkpointing too, so both
  sides recompute the same blocks.
* MFU = XLA FLOPs / median time / peak bf16 dense FLOP/s of the device (``--peak-tflops``, else
  from the device name: H100/H200 SXM 989, H100 PCIe 756, A100 312). Train FLOPs: XLA's cost
  analysis of the compiled step (includes remat recomputation, i.e. hardware FLOPs). Sampling
  FLOPs: steps x (U-Net forward at 2B) + VAE decode at B, from XLA's cost analysis of those
  programs (the sampler's fori_loop body would be counted once by XLA). The torch rows use the
  same FLOP counts.

The JAX side imports only jax, flax, optax, numpy, ml_collections, transformers (tokenizer) and
goal_jax (checked at the end: no diffusers, tensorflow or clu in ``sys.modules``). Weights
are random (no download); the two sides do not share weights, only configurations and inputs.
Each measurement is appended to ``DIR/<side>.jsonl`` as soon as it is done, so a time limit
keeps what finished (the JAX side runs sample 1, train 1, sample 8, train 8 in that order); a failure (e.g. out of memory) is recorded with its error and the next
measurement runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
import traceback

from benchmarks import models as bm

PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L4", 121.0))


def _emit(out_dir: str, side: str, rec: dict) -> None:
    rec = dict(rec, side=side, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    line = json.dumps(rec)
    print(line, flush=True)
    with open(os.path.join(out_dir, f"{side}.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _summary(times, per=1):
    return {"median_s": statistics.median(times) / per, "min_s": min(times) / per,
            "max_s": max(times) / per, "n": len(times)}


def _guard(out_dir, side, base, fn):
    """Runs one measurement; records its error instead of stopping the script."""
    start = time.perf_counter()
    try:
        rec = fn()
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED / CUDA OOM: keep going
        rec = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        traceback.print_exc()
    rec["wall_s"] = time.perf_counter() - start
    _emit(out_dir, side, dict(base, **rec))


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


# ==============================================================================================
# goal_jax side.
# ==============================================================================================


def _random_params(shapes, seed: int = 0):
    """Random float32 params with the given ShapeDtypeStructs: kernels / embeddings ~ N(0, 0.02),
    norm scales 1, biases 0. One jit program draws a single flat normal vector and splits it,
    so it compiles in seconds even for SD-1.4 (one RNG per leaf would compile for minutes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    flat = traverse_util.flatten_dict(shapes)
    keys = sorted(flat)
    drawn = [k for k in keys if k[-1] not in ("scale", "bias")]
    sizes = [int(np.prod(flat[k].shape)) for k in drawn]
    offsets = np.cumsum(sizes)[:-1].tolist()

    def make(key):
        vec = 0.02 * jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
        parts = dict(zip(drawn, jnp.split(vec, offsets) if drawn else []))
        out = {}
        for k in keys:
            s = flat[k]
            if k[-1] == "scale":
                out[k] = jnp.ones(s.shape, s.dtype)
            elif k[-1] == "bias":
                out[k] = jnp.zeros(s.shape, s.dtype)
            else:
                out[k] = parts[k].reshape(s.shape).astype(s.dtype)
        return out

    return traverse_util.unflatten_dict(jax.jit(make)(jax.random.PRNGKey(seed)))


def _flops(lowered_or_compiled) -> float:
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def run_jax(args) -> None:
    import jax
    import jax.numpy as jnp

    from goal_jax import sampling, text, train, weights

    size = bm.SIZES[args.size]
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind, args.peak_tflops)
    base = {"suite": "gpu", "size": size.name, "framework": "goal_jax",
            "device": dev.device_kind, "backend": jax.default_backend(), "dtype": args.dtype,
            "peak_flops": peak}
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    tok_dir = bm.write_tokenizer(os.path.join(args.out, "tokenizer"))
    tok = text.load_tokenizer(tok_dir)

    # ---- sampling -------------------------------------------------------------------------
    start = time.perf_counter()
    mods = bm.jax_modules(size, tok_dir, dtype=dtype)
    params = _random_params(bm.jax_init(mods, abstract=True))
    jax.block_until_ready(params)
    _emit(args.out, "jax", dict(base, bench="init", wall_s=time.perf_counter() - start))
    pipe = weights.GLIGENComponents(mods["unet"], params["unet"], mods["vae"], params["vae"],
                                  mods["text_encoder"], params["text_encoder"], tok,
                                  bm.scheduler_config(), path="")
    sampler = sampling.GLIGENPipeline(pipe, devices=[dev])
    options = sampling.SampleOptions(num_steps=args.sample_steps, guidance_scale=7.5, beta=0.3,
                                     sampler="ddim", height=size.image, width=size.image)
    def measure_sample(b):
        captions, layouts, noise = bm.sample_inputs(size, b)
        seeds = list(range(b))
        first = sampler.sample(captions, layouts, seeds, options, noise=noise)
        times = []
        for _ in range(args.sample_repeats):
            t0 = time.perf_counter()
            sampler.sample(captions, layouts, seeds, options, noise=noise)
            times.append(time.perf_counter() - t0)
        flops = _sample_flops(mods, params, size, b, args.sample_steps)
        rec = dict(_summary(times), compile_s=first.compile_s, flops=flops,
                   per_image_s=statistics.median(times) / b)
        if peak and flops:
            rec["mfu"] = flops / rec["median_s"] / peak
        sampling.clear_cache()
        return rec

    # ---- train step -----------------------------------------------------------------------
    cfg = train.default_train_config()
    cfg.dtype, cfg.remat = args.dtype, True
    models, tmods, _ = bm.goal_models(size, tok_dir, cfg)

    def measure_train(b):
        tparams = _random_params(bm.jax_init(tmods, abstract=True))
        opt, lr = train.make_optimizer(cfg)
        st, frozen = train.create_train_state(tparams, cfg, opt, jax.random.PRNGKey(0))
        step = train.make_train_step(models, cfg, opt, lr)
        batch = {k: jnp.asarray(v) for k, v in bm.train_batch(size, tok, b).items()}
        t0 = time.perf_counter()
        compiled = step.jitted.lower(st, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        flops = _flops(compiled)
        mem = compiled.memory_analysis()
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            st, metrics = compiled(st, frozen, batch)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        rec = dict(_summary(times), compile_s=compile_s, flops=flops,
                   loss_total=float(metrics["total"]))
        if mem is not None:
            rec["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
            rec["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            rec["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        if peak and flops:
            rec["mfu"] = flops / rec["median_s"] / peak
        return rec

    # Smallest batches first, sampling before training, so that a time limit cuts the largest
    # (slowest to compile) measurements and keeps both batch-1 comparisons.
    plan = sorted([(b, 0, "sample") for b in args.sample_batches]
                  + [(b, 1, "train") for b in args.train_batches])
    for b, _, bench in plan:
        if bench == "sample":
            _guard(args.out, "jax", dict(base, bench="sample", batch=b,
                                         sample_steps=args.sample_steps),
                   lambda b=b: measure_sample(b))
        else:
            _guard(args.out, "jax", dict(base, bench="train", batch=b, remat=True,
                                         clip_remat=True),
                   lambda b=b: measure_train(b))
    banned = sorted(m for m in ("diffusers", "tensorflow", "clu") if m in sys.modules)
    _emit(args.out, "jax", dict(base, bench="imports", banned_modules_loaded=banned,
                                torch_loaded="torch" in sys.modules))


def _sample_flops(mods, params, size, batch, steps) -> float:
    """steps x U-Net forward (CFG batch 2B, grounding on) + VAE decode (B), XLA cost analysis
    of the lowered programs (text encoding not counted)."""
    import jax
    import jax.numpy as jnp

    unet, vae = mods["unet"], mods["vae"]
    x = bm.unet_inputs(size, 2 * batch)
    g = {"boxes": jnp.asarray(x["boxes"]), "phrase_embeds": jnp.asarray(x["phrase_embeds"]),
         "masks": jnp.asarray(x["masks"])}
    fwd = jax.jit(lambda p, z, t, c, g: unet.apply({"params": p}, z, t, c, grounding=g,
                                                   gligen_scale=1.0))
    u = _flops(fwd.lower(params["unet"], jnp.asarray(x["latents"]), jnp.asarray(x["t"]),
                         jnp.asarray(x["context"]), g))
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    d = _flops(dec.lower(params["vae"], jnp.zeros((batch, size.latent, size.latent, 4))))
    return steps * u + d


# ==============================================================================================
# PyTorch side.
# ==============================================================================================


def run_torch(args) -> None:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionGLIGENPipeline

    from goal_jax import text
    from tests.reference import goal_reference as ref

    size = bm.SIZES[args.size]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    base = {"suite": "gpu", "size": size.name, "framework": "pytorch", "device": name,
            "dtype": args.dtype, "peak_flops": peak_flops(name, args.peak_tflops)}
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok_dir = bm.write_tokenizer(os.path.join(args.out, "tokenizer"))
    tok = text.load_tokenizer(tok_dir)
    flops = _jax_flops(args.out)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # ---- sampling -------------------------------------------------------------------------
    start = time.perf_counter()
    m = bm.torch_models(size, tok_dir, device=device)
    _emit(args.out, "torch", dict(base, bench="init", wall_s=time.perf_counter() - start))
    pipe = StableDiffusionGLIGENPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], unet=m["unet"],
        scheduler=m["scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(device=device, dtype=tdtype)
    pipe.set_progress_bar_config(disable=True)
    for b in args.sample_batches:
        def measure(b=b):
            captions, layouts, noise = bm.sample_inputs(size, b)
            latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).to(device, tdtype)

            def call():
                with torch.inference_mode():
                    pipe(prompt=captions[0], gligen_phrases=list(layouts[0].phrases),
                         gligen_boxes=[list(x) for x in layouts[0].boxes],
                         gligen_scheduled_sampling_beta=0.3,
                         num_inference_steps=args.sample_steps, guidance_scale=7.5,
                         num_images_per_prompt=b, latents=latents, output_type="np")
                sync()

            call()  # warm-up (cuDNN autotuning, allocator)
            times = []
            for _ in range(args.sample_repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            rec = dict(_summary(times), per_image_s=statistics.median(times) / b)
            f = flops.get(("sample", b))
            if f and base["peak_flops"]:
                rec.update(flops=f, mfu=f / rec["median_s"] / base["peak_flops"])
            return rec

        _guard(args.out, "torch", dict(base, bench="sample", batch=b,
                                       sample_steps=args.sample_steps), measure)
    pipe = None  # free the bf16 pipeline copy
    for k in ("unet", "vae", "text_encoder"):
        m[k].to(torch.float32)  # training: float32 weights, autocast compute

    # ---- train step -----------------------------------------------------------------------
    if device == "cuda":
        torch.set_default_device(device)  # the reference creates its helper tensors by default
    sched = DDPMScheduler.from_config(bm.scheduler_config())
    unet, vae, te, clip = m["unet"], m["vae"], m["text_encoder"], m["clip"]
    store = ref.capture_cross_attention(unet, bm.maa_layers_torch(size))
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({n: p if isinstance(p, ref.ProbsAttnProcessor) else AttnProcessor2_0()
                             for n, p in unet.attn_processors.items()})
    unet.enable_gradient_checkpointing()
    vae.enable_gradient_checkpointing()
    if args.clip_remat:
        clip.train()  # transformers checkpoints only in training mode (dropout is 0)
        clip.gradient_checkpointing_enable()
    trainable = [p for _, p in ref.trainable_parameters(unet)]
    ref.freeze(vae, te, clip)
    models = ref.RefModels(unet, vae, te, clip, sched)
    cfg = ref.RefConfig(attention_layers=bm.maa_layers_torch(size))
    for b in args.train_batches:
        def measure(b=b):
            opt = ref.make_optimizer(trainable)
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                     for k, v in bm.train_batch(size, tok, b).items()}
            for k in ("input_ids", "phrase_input_ids"):
                batch[k] = batch[k].long()
            gen = torch.Generator(device=device).manual_seed(0)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                with torch.autocast(device_type=device, dtype=tdtype,
                                    enabled=tdtype != torch.float32):
                    metrics = ref.train_step(models, opt, batch, cfg, gen, store=store)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            rec = dict(_summary(times), loss_total=metrics["total"])
            if device == "cuda":
                rec["peak_bytes_in_use"] = int(torch.cuda.max_memory_allocated())
            f = flops.get(("train", b))
            if f and base["peak_flops"]:
                rec.update(flops=f, mfu=f / rec["median_s"] / base["peak_flops"])
            del opt
            return rec

        _guard(args.out, "torch", dict(base, bench="train", batch=b, remat=True,
                                       clip_remat=bool(args.clip_remat)), measure)


def _jax_flops(out_dir: str) -> dict:
    """{(bench, batch): flops} from the goal_jax records (same computation)."""
    out = {}
    path = os.path.join(out_dir, "jax.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("flops"):
                    out[(r["bench"], r["batch"])] = r["flops"]
    return out


# ==============================================================================================
# Report.
# ==============================================================================================


def report(out_dir: str) -> str:
    recs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            recs += [json.loads(line) for line in f if line.strip()]
    rows = [r for r in recs if r.get("bench") in ("sample", "train")]
    lines = ["| bench | batch | framework | device | median s | min–max s | per image s | "
             "compile s | TFLOP | MFU | peak GiB | goal_jax / PyTorch time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["bench"], r["batch"], r["framework"]): r for r in rows}
    for r in rows:
        head = f"| {r['bench']} | {r['batch']} | {r['framework']} | {r['device']} | "
        if "error" in r:
            lines.append(head + f"failed: {r['error'][:120]} | | | | | | | |")
            continue
        other = by.get((r["bench"], r["batch"], "pytorch"))
        ratio = ""
        if r["framework"] == "goal_jax" and other and "median_s" in other:
            ratio = f"{r['median_s'] / other['median_s']:.3f}"
        cells = [f"{r['median_s']:.3f}", f"{r['min_s']:.3f}–{r['max_s']:.3f}",
                 f"{r['per_image_s']:.3f}" if "per_image_s" in r else "—",
                 f"{r['compile_s']:.1f}" if "compile_s" in r else "—",
                 f"{r['flops'] / 1e12:.3g}" if r.get("flops") else "—",
                 f"{100 * r['mfu']:.1f}%" if "mfu" in r else "—",
                 f"{r['peak_bytes_in_use'] / 2 ** 30:.1f}" if r.get("peak_bytes_in_use")
                 else "—", ratio]
        lines.append(head + " | ".join(cells) + " |")
    imports = [r for r in recs if r.get("bench") == "imports"]
    if imports:
        lines.append("")
        lines.append(f"JAX side modules check: banned modules loaded = "
                     f"{imports[-1]['banned_modules_loaded']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench")
    p.add_argument("--side", choices=("jax", "torch"))
    p.add_argument("--report", metavar="DIR", help="print the table of DIR/*.jsonl")
    p.add_argument("--size", default="sd14", choices=sorted(bm.SIZES))
    p.add_argument("--out", default="benchmarks/gpu_results")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--sample-batches", default="1,8")
    p.add_argument("--train-batches", default="1,8")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clip-remat", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    args = p.parse_args(argv)
    if args.report:
        sys.stdout.write(report(args.report))
        return
    if not args.side:
        p.error("give --side jax|torch or --report DIR")
    args.sample_batches = [int(x) for x in args.sample_batches.split(",") if x]
    args.train_batches = [int(x) for x in args.train_batches.split(",") if x]
    os.makedirs(args.out, exist_ok=True)
    (run_jax if args.side == "jax" else run_torch)(args)


if __name__ == "__main__":
    main()
