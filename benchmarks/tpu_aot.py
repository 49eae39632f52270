"""XLA:TPU's own numbers for goal_jax's programs, compiled ahead of time without a TPU.

    make tpu-venv    # once: .venv-tpu with jax[tpu]==0.10.2 (libtpu 0.0.42.*) + goal_jax
    .venv-tpu/bin/python -m benchmarks.tpu_aot [--plan targets|all] [--size sd14|small|tiny]
        [--only CHIP/PROGRAM/VARIANT/PARAMS/BATCH_PER_CORE,...] [--jsonl benchmarks/tpu_aot.jsonl]
        [--results benchmarks/RESULTS.md | --results none] [--list] [--report]

libtpu builds TPU topologies without hardware (``jax.experimental.topologies``); a mesh over
those devices, parameters / train state / batch as ``ShapeDtypeStruct``s (``jax.eval_shape``,
nothing of model size is allocated) and ``jit(...).trace(...).lower().compile()`` give the real
XLA:TPU program. Per compiled program this records, per TPU core (the SPMD-partitioned module):
arguments, outputs, aliased (donated) and temporary bytes from ``memory_analysis()``, the peak
``arguments + outputs - aliased + temporaries``, FLOPs and the cost model's time per step
(``cost_analysis()["optimal_seconds"]``, recorded as XLA gives it: for the small train step
with the fused attention libtpu 0.0.42 returned a negative value, so it is not a usable time
for programs with Pallas calls), the count of Pallas (Mosaic) custom calls in the compiled HLO, the
compile time on this host, and whether the peak fits the core's budget (HBM x 15/16: 7.5 GiB
of a v2 core's 8, 15 of v3 / v5e's 16, 30 of v6e's 32).

Programs:

* ``train``: :func:`goal_jax.train.make_train_step` with the mesh: the GOAL step (L_LDM +
  α L_DSA + β L_MAA, AdamW on fusers + attn1 + attn2), the batch split over the cores,
  parameters and AdamW state replicated or FSDP-sharded (``--params``) as
  :mod:`goal_jax.sharding` does;
* ``sample``: :class:`goal_jax.sampling.GLIGENPipeline`'s program: text encoding, 50 DDIM
  steps with classifier-free guidance and scheduled sampling (β = 0.3), VAE decode; the batch
  split over a ("data",) mesh, parameters replicated (as the sampler does).

Train variants (``VARIANTS``): ``fp32``; ``bf16_remat_einsum`` (today's default before the
fused kernels: bf16 compute, remat, einsum attention everywhere); ``bf16_remat`` (the same with
``attention="auto"``: Pallas flash attention in every layer but MAAlign's);
``bf16_remat_trimmed`` (+ ``train.encoded_box_slots=8``, ``train.encoded_phrase_tokens=16``);
``bf16_remat_frozen_bf16`` (+ ``train.frozen_dtype="bfloat16"``); ``lean`` (trimmed + frozen
bf16). Sample variants: ``bf16`` (weights and compute bf16, fused attention), ``bf16_einsum``,
``fp32``.

Every finished compile is appended to the JSONL at once; a rerun skips the (chip, program,
variant, params, batch) jobs the JSONL already has, so an interrupted run resumes. Each compile
of the full SD-1.4 train step takes 10-20 minutes of one CPU core; progress with an ETA is
printed. Run one process at a time, niced (two processes loading libtpu at once need
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
import types

GIB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
JSONL = os.path.join(HERE, "tpu_aot.jsonl")
RESULTS_KEY = "tpu-aot"
BUDGET_FRACTION = 15 / 16


@dataclasses.dataclass(frozen=True)
class Chip:
    """A Colab / Cloud TPU kind: topology name for ``get_topology_desc``, cores used, HBM per
    core in GiB, and per core the peak bf16 compute (TFLOP/s) and HBM bandwidth (GB/s) for the
    roofline time (Cloud TPU's published chip figures divided by the cores per chip: v2 46 TFLOP/s
    and 700 GB/s per 2-core chip (Jouppi et al., CACM 2020), v3 123 and 900 per 2-core chip,
    v5e 197 and 819, v6e 918 and 1640 per 1-core chip)."""

    name: str
    topology: str
    cores: int
    hbm_gib: float
    peak_tflops: float = 0.0
    hbm_gbps: float = 0.0

    @property
    def budget_bytes(self) -> int:
        return int(self.hbm_gib * BUDGET_FRACTION * GIB)


CHIPS = {
    "v2-8": Chip("v2-8", "v2:2x2", 8, 8.0, 23.0, 350.0),
    "v3-8": Chip("v3-8", "v3:2x2", 8, 16.0, 61.5, 450.0),
    "v5e-1": Chip("v5e-1", "v5e:1x1", 1, 16.0, 197.0, 819.0),
    "v5e-4": Chip("v5e-4", "v5e:2x2", 4, 16.0, 197.0, 819.0),
    "v5e-8": Chip("v5e-8", "v5e:2x4", 8, 16.0, 197.0, 819.0),
    "v6e-1": Chip("v6e-1", "v6e:1x1", 1, 32.0, 918.0, 1640.0),
}


def roofline_seconds(rec: dict) -> float | None:
    """max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) per core from XLA's cost
    analysis: a lower bound on the time of one call (no overlap loss, no collectives); None when
    XLA gave no costs (an out-of-memory compile) or the chip has no figures."""
    chip = CHIPS.get(rec["chip"])
    if chip is None or not chip.peak_tflops or rec.get("flops", -1) <= 0 or \
            rec.get("bytes_accessed", -1) <= 0:
        return None
    return max(rec["flops"] / (chip.peak_tflops * 1e12),
               rec["bytes_accessed"] / (chip.hbm_gbps * 1e9))

# name: (compute dtype, remat, (encoded_box_slots, encoded_phrase_tokens), frozen dtype,
#        attention)
VARIANTS = {
    "fp32": ("float32", False, (0, 0), "float32", "auto"),
    "bf16_remat_einsum": ("bfloat16", True, (0, 0), "float32", "einsum"),
    "bf16_remat": ("bfloat16", True, (0, 0), "float32", "auto"),
    "bf16_remat_trimmed": ("bfloat16", True, (8, 16), "float32", "auto"),
    "bf16_remat_frozen_bf16": ("bfloat16", True, (0, 0), "bfloat16", "auto"),
    "lean": ("bfloat16", True, (8, 16), "bfloat16", "auto"),
}
# name: (weights + compute dtype, attention)
SAMPLE_VARIANTS = {
    "bf16": ("bfloat16", "auto"),
    "bf16_einsum": ("bfloat16", "einsum"),
    "fp32": ("float32", "auto"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    chip: str
    program: str  # "train" | "sample"
    variant: str
    params: str  # "replicated" | "fsdp"
    per_core: int  # images per core

    @property
    def key(self) -> str:
        return f"{self.chip}/{self.program}/{self.variant}/{self.params}/{self.per_core}"

    @classmethod
    def parse(cls, text: str) -> "Job":
        parts = text.split("/")
        if len(parts) != 5:
            raise ValueError(f"job {text!r}: expected CHIP/PROGRAM/VARIANT/PARAMS/PER_CORE")
        chip, program, variant, params, per_core = parts
        job = cls(chip, program, variant, params, int(per_core))
        job.check()
        return job

    def check(self) -> None:
        if self.chip not in CHIPS:
            raise ValueError(f"job {self.key}: unknown chip {self.chip!r} ({sorted(CHIPS)})")
        table = {"train": VARIANTS, "sample": SAMPLE_VARIANTS}.get(self.program)
        if table is None:
            raise ValueError(f"job {self.key}: program must be 'train' or 'sample'")
        if self.variant not in table:
            raise ValueError(f"job {self.key}: unknown {self.program} variant {self.variant!r} "
                             f"({sorted(table)})")
        if self.params not in ("replicated", "fsdp"):
            raise ValueError(f"job {self.key}: params must be 'replicated' or 'fsdp'")
        if self.program == "sample" and self.params != "replicated":
            raise ValueError(f"job {self.key}: the sampler replicates its parameters")
        if self.per_core < 1:
            raise ValueError(f"job {self.key}: images per core must be >= 1")


# The measured targets first (v2-8 FSDP at 2 images/core einsum vs fused; v5e-1 at
# batch 4; the sampler on v5e at batch 1), then the remaining table.
TARGET_JOBS = (
    "v2-8/train/bf16_remat_einsum/fsdp/2",
    "v2-8/train/bf16_remat/fsdp/2",
    "v5e-1/train/bf16_remat/replicated/4",
    "v5e-1/sample/bf16/replicated/1",
)
MORE_JOBS = (
    "v5e-1/train/lean/replicated/4",
    "v2-8/train/lean/fsdp/2",
    "v5e-1/train/bf16_remat_einsum/replicated/1",
    "v5e-1/train/bf16_remat/replicated/1",
    "v5e-1/train/bf16_remat_frozen_bf16/replicated/4",
    "v5e-1/train/bf16_remat_trimmed/replicated/4",
    "v5e-1/sample/bf16_einsum/replicated/1",
    "v2-8/train/bf16_remat_einsum/fsdp/1",
    "v2-8/train/bf16_remat/fsdp/1",
    "v2-8/sample/bf16/replicated/1",
    "v3-8/train/lean/fsdp/2",
    "v3-8/train/bf16_remat/replicated/2",
    "v5e-8/train/lean/fsdp/4",
    "v5e-8/sample/bf16/replicated/1",
    "v6e-1/train/lean/replicated/8",
    "v6e-1/sample/bf16/replicated/1",
    "v5e-1/train/fp32/replicated/1",
    "v5e-1/sample/fp32/replicated/1",
)


# ----------------------------------------------------------------------------------------------
# Topology and programs.
# ----------------------------------------------------------------------------------------------


def topology_devices(chip: Chip) -> list:
    """The ``chip.cores`` TPU devices of ``chip``'s topology (no hardware needed)."""
    from jax.experimental import topologies

    kwargs = {}
    if chip.topology.endswith(":1x1"):  # one chip: one host of one chip
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    topo = topologies.get_topology_desc(topology_name=chip.topology, platform="tpu", **kwargs)
    devices = list(topo.devices)
    if len(devices) < chip.cores:
        raise ValueError(f"{chip.name}: topology {chip.topology} has {len(devices)} devices, "
                         f"need {chip.cores}")
    return devices[:chip.cores]


def _sds(tree, shardings):
    import jax

    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_train(size_name: str, variant: str, params_mode: str, devices: list, per_core: int,
                tokenizer_dir: str, fsdp_min_size: int | None = None):
    """(jitted step, abstract args) of the GOAL train step on a mesh over ``devices``:
    FSDP = ('data' 1, 'fsdp' n), replicated = ('data' n, 'fsdp' 1); FSDP shards the arrays of
    at least ``fsdp_min_size`` elements (None: the train config's default)."""
    import jax

    from benchmarks import models as bm
    from goal_jax import sharding, train

    dtype_name, remat, trim, frozen_dtype, attention = VARIANTS[variant]
    size = bm.SIZES[size_name]
    cfg = train.default_train_config()
    cfg.dtype, cfg.remat = dtype_name, remat
    cfg.encoded_box_slots, cfg.encoded_phrase_tokens = trim
    cfg.frozen_dtype = frozen_dtype
    n = len(devices)
    cfg.sharding.params = params_mode
    if fsdp_min_size is not None:
        cfg.sharding.fsdp_min_size = int(fsdp_min_size)
    mesh = (sharding.create_mesh(1, n, devices) if params_mode == "fsdp"
            else sharding.create_mesh(n, 1, devices))
    models, modules, _ = bm.goal_models(size, tokenizer_dir, cfg, attention)
    params = bm.jax_init(modules, abstract=True)
    opt, lr = train.make_optimizer(cfg)
    state, frozen = jax.eval_shape(lambda p: train.create_train_state(
        p, cfg, opt, jax.random.PRNGKey(0)), params)
    step = train.make_train_step(models, cfg, opt, lr, mesh=mesh, example_state=state,
                                 example_frozen=frozen)
    state_sh = train.state_shardings(state, mesh, params_mode, cfg.sharding.fsdp_min_size)
    frozen_sh = train.frozen_shardings(frozen, mesh, params_mode, cfg.sharding.fsdp_min_size)
    batch_sds = bm.train_batch_shapes(size, per_core * n, sharding.batch_sharding(mesh))
    return (step.jitted, (_sds(state, state_sh), _sds(frozen, frozen_sh), batch_sds), params,
            mesh)


def build_sample(size_name: str, variant: str, devices: list, per_core: int,
                 tokenizer_dir: str, num_steps: int = 50):
    """(jitted sampler program, abstract args): GLIGENPipeline's program (text encoding, DDIM
    ``num_steps`` with CFG and scheduled sampling, VAE decode) on a ("data",) mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from benchmarks import models as bm
    from goal_jax import sampling, schedule

    dtype_name, attention = SAMPLE_VARIANTS[variant]
    dtype = jnp.dtype(dtype_name)
    size = bm.SIZES[size_name]
    modules = bm.with_attention(bm.jax_modules(size, tokenizer_dir, dtype=dtype, remat=False),
                                attention)
    mesh = Mesh(np.asarray(devices), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # The program only reads these fields of the sampler (see GLIGENPipeline._program).
    host = types.SimpleNamespace(unet=modules["unet"], vae=modules["vae"],
                                 text_encoder=modules["text_encoder"], grounded=True,
                                 _batch_sharding=data)
    sampler = schedule.make_scheduler("ddim", bm.scheduler_config(), num_steps, eta=0.0)
    program = sampling.GLIGENPipeline._program(host, sampler, True)
    abstract = bm.jax_init({k: modules[k] for k in ("unet", "vae", "text_encoder")},
                           abstract=True)
    weights = {"unet": abstract["unet"], "vae": abstract["vae"],
               "text": abstract["text_encoder"]}
    weights = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                       else x.dtype, sharding=rep), weights)
    b, slots, lat = per_core * len(devices), sampling.MAX_BOXES, size.latent
    i32, f32 = jnp.int32, jnp.float32
    sds = lambda shape, d, s=data: jax.ShapeDtypeStruct(shape, d, sharding=s)  # noqa: E731
    args = (weights, sds((b, 77), i32), sds((b, 77), i32), sds((b, slots, 77), i32),
            sds((b, slots, 4), f32), sds((b, slots), f32), sds((b, lat, lat, 4), f32),
            sds((b, 2), jnp.uint32), sds((), f32, rep), sds((), i32, rep))
    return jax.jit(program), args, weights, mesh


def _bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def _git_commit() -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes): which code was compiled."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    # the records and the report this module writes do not make the compiled code dirty
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                ":!benchmarks/tpu_aot.jsonl", ":!benchmarks/RESULTS.md").strip()
    return head + ("-dirty" if dirty else "")


def compile_job(job: Job, size_name: str, tokenizer_dir: str,
                fsdp_min_size: int | None = None) -> dict:
    """Traces, lowers and compiles ``job`` for its TPU topology; returns the JSONL record
    (``fsdp_min_size``: see :func:`build_train`; recorded when given)."""
    import jax

    from goal_jax.models import ops

    chip = CHIPS[job.chip]
    devices = topology_devices(chip)
    rec = {"kind": "tpu_aot", "size": size_name, "chip": chip.name, "topology": chip.topology,
           "cores": chip.cores, "program": job.program, "variant": job.variant,
           "params": job.params, "per_core": job.per_core,
           "batch": job.per_core * chip.cores, "device_kind": devices[0].device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import importlib.metadata as md

        rec["libtpu"] = md.version("libtpu")
    except Exception:  # libtpu installed some other way
        rec["libtpu"] = "unknown"
    rec["commit"] = _git_commit()
    if fsdp_min_size is not None:
        rec["fsdp_min_size"] = int(fsdp_min_size)
    start = time.perf_counter()
    with ops.target_platform("tpu", devices[0].device_kind):
        if job.program == "train":
            jitted, args, params, mesh = build_train(size_name, job.variant, job.params,
                                                     devices, job.per_core, tokenizer_dir,
                                                     fsdp_min_size)
            rec["frozen_bytes_total"] = _bytes(args[1])
        else:
            jitted, args, params, mesh = build_sample(size_name, job.variant, devices,
                                                      job.per_core, tokenizer_dir)
        rec["param_bytes_total"] = _bytes(params)
        # The mesh context lets the Pallas kernels run under shard_map (goal_jax.models.ops).
        with jax.set_mesh(mesh):
            traced = jitted.trace(*args)
            lowered = traced.lower()
    rec["lower_s"] = time.perf_counter() - start
    rec["budget_bytes"] = chip.budget_bytes
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        # XLA:TPU refuses a program whose buffers exceed the core's HBM; what it needed is the
        # measurement (arguments: the per-core shards of the inputs, computed here).
        rec["compile_s"] = time.perf_counter() - start
        rec.update(argument_bytes=_shard_bytes(args), output_bytes=0, alias_bytes=0,
                   generated_code_bytes=0, flops=-1.0, transcendentals=-1.0,
                   bytes_accessed=-1.0, optimal_seconds=-1.0, pallas_custom_calls=-1,
                   fits=False)
        rec.update(oom)  # XLA's own argument bytes, where it gave them, win
        if "required_bytes" in rec:  # arguments + temporaries in one figure
            rec["temp_bytes"] = rec["required_bytes"] - rec["argument_bytes"]
            rec["peak_bytes"] = rec["required_bytes"]
        else:
            rec["peak_bytes"] = rec.get("total_bytes", rec["argument_bytes"]
                                        + rec.get("program_bytes", rec["temp_bytes"]))
        return rec
    rec["compile_s"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    for f in ("argument", "output", "alias", "temp", "generated_code"):
        rec[f"{f}_bytes"] = int(getattr(mem, f"{f}_size_in_bytes"))
    rec["peak_bytes"] = (rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"]
                         + rec["temp_bytes"])
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    rec["flops"] = float(cost.get("flops", -1.0))
    rec["transcendentals"] = float(cost.get("transcendentals", -1.0))
    rec["bytes_accessed"] = float(cost.get("bytes accessed", -1.0))
    rec["optimal_seconds"] = float(cost.get("optimal_seconds", -1.0))
    hlo = compiled.as_text()
    rec["pallas_custom_calls"] = hlo.count('custom_call_target="tpu_custom_call"')
    rec["fits"] = rec["peak_bytes"] <= chip.budget_bytes
    return rec


_OOM = re.compile(r"Ran out of memory in memory space (?P<space>\w+)|Ran out of memory on "
                  r"(?P<space2>\w+)")
_OOM_TEMP = re.compile(r"memory required for HLO temporaries \((?P<temp>[0-9.]+)(?P<unit>[KMG])\)"
                       r" exceeds available \w+ \((?P<avail>[0-9.]+)(?P<unit2>[KMG])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


_SIZE = r"(?P<n>[0-9.]+)(?P<u>[KMG])"
_OOM_USED = re.compile(r"Used " + _SIZE + r" of (?P<n2>[0-9.]+)(?P<u2>[KMG]) hbm")
_OOM_PART = {k: re.compile(rf"^\s*{label}\s+{_SIZE}", re.M) for k, label in (
    ("total", r"Total hbm usage >="), ("program", "program"), ("arguments", "arguments"),
    ("hlo_temp", "HLO temp"))}
_OOM_ALLOC = re.compile(r"Size: " + _SIZE + r"\s*\n\s*Operator: op_name=\"(?P<op>[^\"]+)\"")


def _size(m, n="n", u="u") -> int:
    return int(float(m[n]) * _UNITS[m[u]])


def parse_hbm_oom(message: str) -> dict | None:
    """The numbers of XLA:TPU's out-of-memory compile error; None for any other error. XLA
    prints sizes as "14.73G" / "326.62M" (GiB / MiB, two decimals), so the byte counts are good
    to 0.005 of the unit. Two forms, both from libtpu 0.0.42:

    * "Ran out of memory on HBM, the total memory required for HLO temporaries (14.73G)
      exceeds available HBM (7.48G)." -> {"required_bytes", "available_bytes"}. Despite its
      wording the figure includes the arguments: for a sort of an f32[65536, 65536] product
      (two 16 GiB buffers) of 0.06 GiB of arguments it said 32.06G (tests/test_tpu_aot.py).
      The caller subtracts the arguments to get the temporaries;
    * "E1000: CompileTimeHbmOom ... Used 16.07G of 15.75G hbm ... Total hbm usage >= 16.32G:
      reserved / program 7.44G / arguments 8.62G ... HLO temp 6.98G ... Largest program
      allocations ..." -> {"available_bytes", "used_bytes", "total_bytes", "program_bytes",
      "argument_bytes", "temp_bytes" (HLO temp), "largest": [{"bytes", "op"}] (up to 8)}.

    Both also give "oom": True and "oom_message" (the error's first line)."""
    if "RESOURCE_EXHAUSTED" not in message or not _OOM.search(message):
        return None
    first = next(line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line)
    out = {"oom": True, "oom_message": first.strip()}
    m = _OOM_TEMP.search(message)
    if m is not None:
        return dict(out, required_bytes=int(float(m["temp"]) * _UNITS[m["unit"]]),
                    available_bytes=int(float(m["avail"]) * _UNITS[m["unit2"]]))
    used = _OOM_USED.search(message)
    parts = {k: r.search(message) for k, r in _OOM_PART.items()}
    if used is None or parts["hlo_temp"] is None or parts["arguments"] is None:
        return None
    out.update(used_bytes=_size(used), available_bytes=_size(used, "n2", "u2"),
               temp_bytes=_size(parts["hlo_temp"]), argument_bytes=_size(parts["arguments"]))
    for k in ("total", "program"):
        if parts[k] is not None:
            out[f"{k}_bytes"] = _size(parts[k])
    out["largest"] = [{"bytes": _size(a), "op": a["op"]}
                      for a in _OOM_ALLOC.finditer(message)][:8]
    return out


def _shard_bytes(args) -> int:
    """Bytes per device of abstract arguments carrying shardings (one shard of each)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(args):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------------------------
# Records and the RESULTS.md section.
# ----------------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    return out


def record_key(rec: dict) -> str:
    return (f"{rec['chip']}/{rec['program']}/{rec['variant']}/{rec['params']}/"
            f"{rec['per_core']}")


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def _roofline(rec: dict) -> str:
    s = roofline_seconds(rec)
    return "–" if s is None else f"{s:.3g}"


def _seconds(s: float) -> str:
    """The cost model's time; XLA:TPU has returned negative values for programs with Pallas
    (Mosaic) custom calls, which are shown as such, not as a time."""
    return f"{s:.3g}" if s > 0 else f"invalid ({s:.3g})"


def _short_op(op: str, parts: int = 5) -> str:
    """The last ``parts`` components of an XLA op path, without JAX's transform wrappers."""
    names = [p for p in op.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))
             and p not in ("checkpoint", "rematted_computation")]
    return "/".join(names[-parts:])


def results_section(records: list[dict], pending: list[str], size_name: str) -> str:
    """The TPU block of RESULTS.md: one row per compiled program (latest record per job), then
    the jobs not compiled yet with the command that compiles them."""
    latest: dict[str, dict] = {}
    for r in records:
        if r.get("size") == size_name:
            latest[record_key(r)] = r
    rows = list(latest.values())
    title = ("the paper configuration (`sd14`)" if size_name == "sd14"
             else f"the `{size_name}` benchmark size (structure of SD-1.4, reduced widths)")
    lines = [
        f"### XLA:TPU compiles of {title}, per core",
        "",
        "Compiled without a TPU from libtpu's topologies (`make tpu-venv`, then "
        "`.venv-tpu/bin/python -m benchmarks.tpu_aot`; see that module's docstring). GiB per "
        "TPU core from XLA:TPU's buffer assignment: arguments (params / frozen weights / AdamW "
        "state / batch shards), temporaries, peak = arguments + outputs − donated + "
        "temporaries. TFLOP, the roofline time (per core, max of FLOPs / peak bf16 FLOP/s and "
        "bytes accessed / HBM bandwidth: a lower bound) and the cost model's time "
        "(`optimal_seconds`; shown as invalid when "
        "XLA returns a negative value, as it did for programs with Pallas calls) per core per call "
        "(train: one step; sample: one whole 50-step CFG sampling of the per-core batch + "
        "decode). Budget = 15/16 of the core's HBM. Pallas = fused-attention custom calls in "
        "the compiled HLO. Compile s on a shared 2-core x86 host (niced).",
        "",
        "| chip | program | variant | params | per core | batch | args | temp | peak | budget "
        "| fits | TFLOP | roofline s | cost-model s | Pallas | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {k: i for i, k in enumerate(TARGET_JOBS + MORE_JOBS)}
    rows.sort(key=lambda r: order.get(record_key(r), len(order)))
    for r in rows:
        if r.get("oom"):
            lines.append(
                f"| {r['chip']} | {r['program']} | {r['variant']} | {r['params']} | "
                f"{r['per_core']} | {r['batch']} | {_g(r['argument_bytes'])} | "
                f"≥ {_g(r['temp_bytes'])} | ≥ {_g(r['peak_bytes'])} | {_g(r['budget_bytes'])} "
                f"| **no** (XLA: out of HBM) | – | – | – | – | {r['compile_s']:.0f} |")
            continue
        lines.append(
            f"| {r['chip']} | {r['program']} | {r['variant']} | {r['params']} | "
            f"{r['per_core']} | {r['batch']} | {_g(r['argument_bytes'])} | {_g(r['temp_bytes'])} "
            f"| {_g(r['peak_bytes'])} | {_g(r['budget_bytes'])} | "
            f"{'yes' if r['fits'] else '**no**'} | {r['flops'] / 1e12:.2f} | "
            f"{_roofline(r)} | {_seconds(r['optimal_seconds'])} | {r['pallas_custom_calls']} | "
            f"{r['compile_s']:.0f} |")
    if not rows:
        lines.append("| (none compiled yet) | | | | | | | | | | | | | | | |")
    lines.append("")
    ooms = [r for r in rows if r.get("largest")]
    if ooms:
        lines.append("Out of HBM: the largest allocations XLA:TPU named (op path shortened to "
                     "its last parts):")
        lines.append("")
        for r in ooms:
            top = "; ".join(f"{a['bytes'] / 2 ** 20:.0f} MiB `{_short_op(a['op'])}`"
                            for a in r["largest"][:3])
            lines.append(f"- {record_key(r)}: arguments {_g(r['argument_bytes'])} + program "
                         f"{_g(r.get('program_bytes', r['temp_bytes']))} GiB (HLO temporaries "
                         f"{_g(r['temp_bytes'])}) against {_g(r['available_bytes'])} GiB; "
                         f"largest: {top}")
        lines.append("")
    if rows:
        r0 = rows[0]
        lines.append(f"jax {r0['jax']}, libtpu {r0.get('libtpu', '?')}; records in "
                     "`benchmarks/tpu_aot.jsonl`.")
        lines.append("")
    if pending:
        lines.append("Not compiled yet (each line is one resumable command):")
        lines.append("")
        for key in pending:
            lines.append(f"- `{key}`: `.venv-tpu/bin/python -m benchmarks.tpu_aot --only {key}`")
        lines.append("")
    return "\n".join(lines)


def write_results(path: str, records: list[dict], plan: list[str], size_name: str) -> None:
    from benchmarks.run import rewrite_results

    done = {record_key(r) for r in records if r.get("size") == size_name}
    pending = [k for k in plan if k not in done]
    section = results_section(records, pending, size_name)
    for other in ("sd14", "small", "tiny"):  # the other sizes' records, if any
        if other != size_name and any(r.get("size") == other for r in records):
            section += "\n" + results_section(records, [], other)
    rewrite_results(path, RESULTS_KEY, section)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.tpu_aot")
    p.add_argument("--size", default="sd14", choices=("sd14", "small", "tiny"))
    p.add_argument("--plan", default="all", choices=("targets", "all"),
                   help="targets: the issue's four measured targets; all: + the other chips")
    p.add_argument("--only", default="", help="comma-separated CHIP/PROGRAM/VARIANT/PARAMS/"
                   "PER_CORE jobs instead of the plan")
    p.add_argument("--jsonl", default=JSONL, help="records (appended; done jobs are skipped)")
    p.add_argument("--results", default=RESULTS, help="RESULTS.md to update, or 'none'")
    p.add_argument("--list", action="store_true", help="print the jobs and their state, exit")
    p.add_argument("--force", action="store_true", help="recompile jobs already in the JSONL")
    p.add_argument("--fsdp_min_size", type=int, default=None,
                   help="FSDP shards arrays of at least this many elements (default: the "
                        "train config's, 2**14; the tiny size's arrays are mostly smaller)")
    p.add_argument("--report", action="store_true",
                   help="only rewrite --results from the JSONL's records (no compile)")
    args = p.parse_args(argv)

    plan = list(TARGET_JOBS) + ([] if args.plan == "targets" else list(MORE_JOBS))
    jobs = [Job.parse(k) for k in (args.only.split(",") if args.only else plan) if k]
    if args.size != "sd14":  # the plan (and its "not compiled yet" list) is the real size's
        plan = [j.key for j in jobs]
    records = read_records(args.jsonl)
    done = {record_key(r) for r in records if r.get("size") == args.size}
    todo = [j for j in jobs if args.force or j.key not in done]
    if args.list:
        for j in jobs:
            print(f"{'done' if j.key in done else 'todo'}  {j.key}")
        return
    if args.report:
        if args.results == "none":
            raise SystemExit("tpu_aot: --report needs --results PATH")
        write_results(args.results, records, plan, args.size)
        print(f"tpu_aot: wrote {args.results} from {len(records)} records of {args.jsonl}")
        return
    print(f"tpu_aot: {len(jobs)} jobs, {len(jobs) - len(todo)} already in {args.jsonl}, "
          f"{len(todo)} to compile (size {args.size})", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="goal_tpu_tok_") as tmp:
        from benchmarks import models as bm

        tok = bm.write_tokenizer(tmp)
        for i, job in enumerate(todo):
            elapsed = time.perf_counter() - started
            eta = (f", ETA {elapsed / i * (len(todo) - i) / 60:.0f} min for the rest"
                   if i else "")
            print(f"[{i + 1}/{len(todo)}] compiling {job.key} ({elapsed / 60:.1f} min "
                  f"so far{eta})", flush=True)
            rec = compile_job(job, args.size, tok, args.fsdp_min_size)
            rec["command"] = "python -m benchmarks.tpu_aot " + " ".join(argv)
            if rec.get("oom"):
                print(f"[{i + 1}/{len(todo)}] {job.key}: does not fit: {rec['oom_message']} "
                      f"(arguments {_g(rec['argument_bytes'])} GiB per core; compile "
                      f"{rec['compile_s']:.0f} s)", flush=True)
            else:
                print(f"[{i + 1}/{len(todo)}] {job.key}: peak {_g(rec['peak_bytes'])} GiB "
                      f"(args {_g(rec['argument_bytes'])} + temp {_g(rec['temp_bytes'])}), "
                      f"{rec['flops'] / 1e12:.2f} TFLOP, cost model "
                      f"{rec['optimal_seconds']:.3g} s, {rec['pallas_custom_calls']} Pallas "
                      f"calls, fits {rec['fits']}, compile {rec['compile_s']:.0f} s",
                      flush=True)
            if args.jsonl:
                with open(args.jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            records.append(rec)
            if args.results != "none":
                write_results(args.results, records, plan, args.size)
    if args.results != "none":
        write_results(args.results, records, plan, args.size)


if __name__ == "__main__":
    main()
