"""Scale check of the streaming input pipeline (goal_jax.data.pipeline) on a synthetic set.

    python -m benchmarks.stream --items 200000 --workdir /tmp/stream_bench
        [--unique 2000] [--batch 4] [--resolution 64] [--max-boxes 4] [--prefetch 2]
        [--train-steps 5] [--results benchmarks/RESULTS.md | --results none] [--jsonl out.jsonl]

Stages, each in its own subprocess (so each peak RSS, ``ru_maxrss``, is its own):

* ``write``: a format-1 folder (docs/data_format.md) of ``--items`` items, 64x64 PNG: the
  shapes dataset (goal_jax.data.shapes) draws ``--unique`` images, and ``annotations.jsonl``
  lists ``--items`` items with their own ids cycling over them (drawing 200k images would take
  the benchmark's time, not the pipeline's).
* ``build``: ``goal2k.build_goal2k`` (validation, PNG encoding, ArrayRecord files): every item
  becomes its own record with its own image bytes.
* ``stream``: ``make_train_iterator`` at the demo size (batch ``--batch``, ``--resolution``,
  ``--max-boxes``, flip and random crop on, shuffled) over one whole epoch (one
  process: every record), or its first ``--stream-items``; items/s after the first batch, the process
  RSS (psutil) at 1 %, 10 %, 50 % and 100 % of the items streamed and the peak
  (``ru_maxrss``). Then the annotation
  pass the training program runs when trimmed encodings are configured
  (``annotation_chunks``: every record read, texts tokenized, images not decoded).
* ``train`` (``--train-steps`` > 0): the demo preset's train step (configs/goal.py:demo, demo
  models, the same batch size and resolution) fed with the stream's batches: ``--train-steps``
  steps after the compile and one warm-up step; its rate is ``batch / step time``.

Output: one JSON line per stage (also kept as ``<workdir>/<stage>.json``: ``--stages`` can run
the later stages again on the same data, and the section uses the kept ones), and the ``stream`` section of ``--results`` (between
``<!-- stream:begin -->`` / ``<!-- stream:end -->``). The tokenizer is the demo models' word
vocabulary (goal_jax.demo_models), as in the demo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _folder_mib(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder)
               for f in fs) / 2**20


def stage_write(args) -> dict:
    from goal_jax.data import format as fmt
    from goal_jax.data import shapes

    src = os.path.join(args.workdir, "src")
    t0 = time.perf_counter()
    shapes.write_shapes_dataset(src, args.unique, resolution=args.resolution, seed=0)
    path = os.path.join(src, fmt.ANNOTATIONS_FILE)
    with open(path, encoding="utf-8") as f:
        base = [json.loads(line) for line in f]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in range(args.items):
            f.write(json.dumps(dict(base[i % len(base)], id=f"stream-{i:07d}")) + "\n")
    os.replace(path + ".tmp", path)
    return {"stage": "write", "items": args.items, "unique_images": args.unique,
            "wall_s": time.perf_counter() - t0, "source_mib": _folder_mib(src),
            "peak_rss_mib": _peak_rss_mib()}


def stage_build(args) -> dict:
    from goal_jax.data import goal2k

    t0 = time.perf_counter()
    builder, summary = goal2k.build_goal2k(os.path.join(args.workdir, "src"),
                                           os.path.join(args.workdir, "tfds"))
    return {"stage": "build", "items_kept": summary["items_kept"],
            "items_dropped": summary["items_dropped"], "wall_s": time.perf_counter() - t0,
            "dataset_mib": _folder_mib(os.fspath(builder.data_dir)),
            "file_format": builder.info.file_format.value, "peak_rss_mib": _peak_rss_mib()}


def _tokenizer_dir(args) -> str:
    from goal_jax import demo_models

    paths = demo_models.write_demo_models(os.path.join(args.workdir, "demo_models"),
                                          resolution=args.resolution)
    return os.path.join(paths.pipeline, "tokenizer")


def _iterator(args):
    from goal_jax.data import pipeline

    return pipeline.make_train_iterator(
        os.path.join(args.workdir, "tfds"), _tokenizer_dir(args), batch_size=args.batch,
        resolution=args.resolution, max_boxes=args.max_boxes, seed=0, process_index=0,
        process_count=1, prefetch=args.prefetch)


def stage_stream(args) -> dict:
    import psutil

    proc = psutil.Process()
    _tokenizer_dir(args)  # the demo models are written before the clock starts
    t0 = time.perf_counter()
    it = _iterator(args)
    open_s = time.perf_counter() - t0
    n = it.batches_per_epoch if not args.stream_items else min(
        it.batches_per_epoch, -(-args.stream_items // args.batch))
    marks = {max(2, round(n * f)): f"{round(f * 100)}%" for f in (0.01, 0.1, 0.5, 1.0)}
    rss_before = proc.memory_info().rss / 2**20
    rss, checksum = {}, 0.0
    next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    for b in range(2, n + 1):
        batch = next(it)
        checksum += float(batch["masks"].sum())
        if b in marks:
            rss[marks[b]] = round(proc.memory_info().rss / 2**20, 1)
    stream_s, stream_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    state = it.get_state()
    it.close()
    t2 = time.perf_counter()
    chunks = 0
    for masks, _, _, _ in it.annotation_chunks():
        chunks += len(masks)
    check_s = time.perf_counter() - t2
    return {"stage": "stream", "items_in_shard": len(it.source), "items_streamed": n * args.batch,
            "batch": args.batch,
            "resolution": args.resolution, "max_boxes": args.max_boxes,
            "prefetch": args.prefetch, "batches": n, "open_s": open_s,
            "items_per_s": (n - 1) * args.batch / stream_s, "stream_s": stream_s,
            "cpu_ms_per_item": 1e3 * stream_cpu_s / ((n - 1) * args.batch),
            "state_after": {"epoch": state["epoch"], "batch": state["batch"]},
            "real_boxes_seen": checksum, "rss_mib_before": round(rss_before, 1),
            "rss_mib_at": rss, "annotation_pass_items": chunks, "annotation_pass_s": check_s,
            "peak_rss_mib": _peak_rss_mib()}


def stage_train(args) -> dict:
    import importlib.util

    import jax

    from goal_jax import loop
    from goal_jax import train as train_lib

    spec = importlib.util.spec_from_file_location("_goal_config",
                                                  os.path.join(REPO, "configs", "goal.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("demo")
    config.data.shapes_items = 0
    config.data.source = ""
    config.data.data_dir = os.path.join(args.workdir, "tfds")
    config = loop.prepare(config, args.workdir)  # writes / reuses the demo models
    t, d = config.train, config.data
    if (t.per_device_batch_size, d.resolution, d.max_boxes) != (args.batch, args.resolution,
                                                                args.max_boxes):
        raise ValueError(f"the demo preset trains at batch {t.per_device_batch_size}, "
                         f"resolution {d.resolution}, max_boxes {d.max_boxes}; the benchmark "
                         f"streams {args.batch}, {args.resolution}, {args.max_boxes}")
    models, params = train_lib.load_models(t)
    optimizer, schedule = train_lib.make_optimizer(t)
    state, frozen = train_lib.create_train_state(params, t, optimizer)
    step = train_lib.make_train_step(models, t, optimizer, schedule)
    it = _iterator(args)
    batches = [next(it) for _ in range(args.train_steps + 2)]
    it.close()
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, frozen, batches[1])
    jax.block_until_ready(metrics)
    times, c0 = [], time.process_time()
    for b in batches[2:]:
        t1 = time.perf_counter()
        state, metrics = step(state, frozen, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t1)
    cpu_per_step = (time.process_time() - c0) / len(times)
    times.sort()
    median = times[len(times) // 2]
    return {"stage": "train", "preset": "demo", "batch": args.batch, "steps": len(times),
            "compile_and_first_step_s": compile_s, "median_step_s": median,
            "min_step_s": times[0], "max_step_s": times[-1], "items_per_s": args.batch / median,
            "cpu_ms_per_item": 1e3 * cpu_per_step / args.batch,
            "loss_total": float(metrics["total"]), "peak_rss_mib": _peak_rss_mib()}


STAGES = {"write": stage_write, "build": stage_build, "stream": stage_stream,
          "train": stage_train}


def results_section(records: dict, argv: list[str], load: tuple) -> str:
    w, b, s = records["write"], records["build"], records["stream"]
    tr = records.get("train")
    lines = [
        f"### Streaming input pipeline, {w['items']:,} items "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
        f"Machine: {os.cpu_count()} cores; {platform.platform()}; Python "
        f"{platform.python_version()}. Load average (1/5/15 min) before: "
        f"{' / '.join(f'{x:.2f}' for x in load[0])}; after: "
        f"{' / '.join(f'{x:.2f}' for x in load[1])}.",
        f"Command: `python -m benchmarks.stream {' '.join(argv)}`"
        + (" (write and build from an earlier invocation on the same workdir)."
           if "write" not in argv and "--stages" in argv else "."), "",
        "| stage | what | wall s | CPU ms / item | peak RSS MiB | result |",
        "|---|---|---|---|---|---|",
        f"| write | format-1 folder, {w['items']:,} items over {w['unique_images']:,} drawn "
        f"64x64 PNGs | {w['wall_s']:.1f} | | {w['peak_rss_mib']:.0f} | "
        f"{w['source_mib']:.0f} MiB on disk |",
        f"| build | goal2k.build_goal2k -> {b['file_format']} | {b['wall_s']:.1f} | | "
        f"{b['peak_rss_mib']:.0f} | {b['items_kept']:,} items, {b['dataset_mib']:.0f} MiB |",
        f"| stream | {s['items_streamed']:,} items of the {s['items_in_shard']:,}-item epoch, "
        f"batch {s['batch']}, {s['resolution']}x{s['resolution']}, "
        f"flip + random crop, prefetch {s['prefetch']} | {s['stream_s']:.1f} | "
        f"{s['cpu_ms_per_item']:.2f} | {s['peak_rss_mib']:.0f} | "
        f"**{s['items_per_s']:.0f} items/s** |",
        f"| annotation pass | every record read, texts tokenized (trimmed-encoding check) | "
        f"{s['annotation_pass_s']:.1f} | | (same process) | "
        f"{s['annotation_pass_items'] / s['annotation_pass_s']:.0f} items/s |",
    ]
    if tr:
        lines.append(
            f"| train | demo preset train step, batch {tr['batch']} (median of {tr['steps']}) | "
            f"{tr['median_step_s']:.3f} per step | {tr['cpu_ms_per_item']:.1f} | "
            f"{tr['peak_rss_mib']:.0f} | **{tr['items_per_s']:.0f} items/s** |")
    lines += ["", "Process RSS while streaming (MiB), at the share of the items streamed: "
              "before the first batch "
              f"{s['rss_mib_before']}, then " + ", ".join(
                  f"{k} {v}" for k, v in s["rss_mib_at"].items()) + "."]
    if tr:
        lines.append(
            f"Stream rate / train step rate: **{s['items_per_s'] / tr['items_per_s']:.1f}×** in "
            f"wall time, **{tr['cpu_ms_per_item'] / s['cpu_ms_per_item']:.1f}×** in CPU time "
            "per item (one process streaming; the train step measured alone).")
    return "\n".join(lines)


def rewrite_results(path: str, section: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = f"<!-- stream:begin -->\n{section}\n<!-- stream:end -->"
    pattern = re.compile(r"<!-- stream:begin -->.*?<!-- stream:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--unique", type=int, default=2000, help="drawn images the items cycle over")
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max-boxes", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--stream-items", type=int, default=0,
                   help="items streamed (whole batches; 0 = one whole epoch)")
    p.add_argument("--train-steps", type=int, default=5, help="0 = no train stage")
    p.add_argument("--stages", default="write,build,stream,train")
    p.add_argument("--results", default=RESULTS, help="markdown file to update, or 'none'")
    p.add_argument("--jsonl", default="", help="also append the JSON lines to this file")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:  # a worker: one stage, one JSON line
        print(json.dumps(STAGES[args.stage](args)), flush=True)
        return
    os.makedirs(args.workdir, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s != "train" or args.train_steps > 0]
    load_before, records = os.getloadavg(), {}
    for stage in stages:
        cmd = [sys.executable, "-m", "benchmarks.stream", *argv, "--stage", stage]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-5000:])
            raise SystemExit(f"benchmarks.stream: stage {stage} failed ({proc.returncode})")
        records[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
        line = json.dumps(records[stage])
        with open(os.path.join(args.workdir, f"{stage}.json"), "w", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    for stage in STAGES:  # stages of an earlier invocation on the same workdir
        path = os.path.join(args.workdir, f"{stage}.json")
        if stage not in records and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                records[stage] = json.load(f)
    if args.results != "none" and {"write", "build", "stream"} <= set(records):
        rewrite_results(args.results, results_section(records, argv,
                                                      (load_before, os.getloadavg())))


if __name__ == "__main__":
    main()
