"""benchmarks/tpu_aot.py compiles goal_jax's programs for a TPU without a TPU.

The compile runs in a subprocess with the interpreter of the separate libtpu venv
(``make tpu-venv``, made by ``make test``), so that JAX in the test venv keeps the CPU backend.
At the ``tiny`` size, the GOAL train step (bf16 + remat, fused attention, FSDP over the 4 chips
of a v5e:2x2 topology, every array of at least 64 elements sharded, 1 image per chip), the same
step with replicated parameters (to compare) and the 50-step CFG sampler (batch 1 per chip)
compile for XLA:TPU; their HLO contains the Pallas flash-attention custom calls; the recorded
memory adds up; the RESULTS section lists every row; a rerun skips the finished jobs. (The
``small`` size took 774 s for its train step alone on the loaded 2-core machine: 228 Pallas
calls against tiny's 52; the three tiny compiles took 236 s of wall time in all there.)

Also here: the frozen weights stored in bf16 (``train.frozen_dtype``), which the TPU table
measures.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.environ.get("GOAL_TPU_PYTHON", os.path.join(REPO, ".venv-tpu", "bin", "python"))
JOBS = ("v5e-4/train/bf16_remat/fsdp/1", "v5e-4/sample/bf16/replicated/1",
        "v5e-4/train/bf16_remat/replicated/1")


def _tpu_python(argv, timeout):
    """Runs the libtpu venv's python with ``argv`` in the repository; its stdout (the exit
    status must be 0)."""
    if not os.path.isfile(TPU_PYTHON):
        pytest.fail(f"{TPU_PYTHON} does not exist: run `make tpu-venv` (made by `make test`) or "
                    "set GOAL_TPU_PYTHON to a python with jax[tpu]==0.10.2 and goal_jax")
    env = dict(os.environ, PYTHONPATH=REPO, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated CPU devices
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([TPU_PYTHON, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _run(args):
    return _tpu_python(["-m", "benchmarks.tpu_aot", *args], timeout=1200)


def test_tiny_train_step_and_sampler_compile_for_v5e_2x2(tmp_path):
    jsonl, results = tmp_path / "tpu.jsonl", tmp_path / "RESULTS.md"
    args = ["--size", "tiny", "--only", ",".join(JOBS), "--jsonl", str(jsonl),
            "--results", str(results), "--fsdp_min_size", "64"]
    out = _run(args)
    assert f"[{len(JOBS)}/{len(JOBS)}]" in out
    records = {f"{r['chip']}/{r['program']}/{r['variant']}/{r['params']}/{r['per_core']}": r
               for r in map(json.loads, jsonl.read_text().splitlines())}
    assert sorted(records) == sorted(JOBS)
    for key, r in records.items():
        assert r["device_kind"] == "TPU v5 lite" and r["cores"] == 4 and r["batch"] == 4, key
        assert r["pallas_custom_calls"] > 0, key  # the fused attention is in the TPU program
        assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                   + r["temp_bytes"]), key
        # (the cost model's optimal_seconds is recorded as XLA gives it; with the Mosaic calls
        # of the fused attention it came out negative for the small train step)
        assert r["size"] == "tiny", key
        assert r["flops"] > 0 and r["bytes_accessed"] > 0, key
        assert r["fits"] and r["peak_bytes"] < r["budget_bytes"] == int(15 * 2 ** 30), key
    train = records[JOBS[0]]
    assert train["fsdp_min_size"] == 64
    # FSDP: a chip holds a quarter of each parameter (and AdamW moment) array, so its arguments
    # are far below the same step's with replicated parameters (measured: 2.89 vs 8.07 MB; the
    # TPU's tile padding makes either exceed the parameters' 2.73 MB at this size).
    replicated = records[JOBS[2]]
    assert replicated["param_bytes_total"] == train["param_bytes_total"]
    assert train["argument_bytes"] < 0.5 * replicated["argument_bytes"]
    assert train["alias_bytes"] > 0  # the train state is donated
    text = results.read_text()
    assert "<!-- tpu-aot:begin -->" in text and "<!-- tpu-aot:end -->" in text
    for key in JOBS:
        chip, program, variant, params, per_core = key.split("/")
        assert f"| {chip} | {program} | {variant} | {params} | {per_core} |" in text
    # Resumable: a second run finds both jobs in the JSONL and compiles nothing.
    again = _run(args)
    assert f"{len(JOBS)} already in" in again and "0 to compile" in again
    assert len(jsonl.read_text().splitlines()) == len(JOBS)


KINDS_SCRIPT = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from goal_jax.models import ops
for topology in ("v2:2x2", "v3:2x2", "v5e:2x2"):
    dev = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    x = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16,
                             sharding=jax.sharding.SingleDeviceSharding(dev))
    def loss(q, k, v):
        return ops.attention(q, k, v, implementation="pallas").astype(jnp.float32).sum()
    with ops.target_platform("tpu", dev.device_kind):
        lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(x, x, x).lower()
        lowered.compile()
    print("COMPILED", dev.device_kind, lowered.as_text().count("tpu_custom_call"))
"""


def test_pallas_attention_compiles_for_tpu_v2_v3_and_v5e():
    """The fused attention's forward and backward in bfloat16 compile for TPU v2 and v3 (whose
    Mosaic has no bfloat16 matmul: the kernel runs in float32 there) and v5e."""
    out = _tpu_python(["-c", KINDS_SCRIPT], timeout=600)
    lines = [x.split() for x in out.splitlines() if x.startswith("COMPILED")]
    assert [" ".join(x[1:-1]) for x in lines] == ["TPU v2", "TPU v3", "TPU v5 lite"]
    assert all(int(x[-1]) >= 3 for x in lines)  # forward + the two backward kernels


OOM_SCRIPT = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from benchmarks import tpu_aot
dev = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
sh = jax.sharding.SingleDeviceSharding(dev)
x = jax.ShapeDtypeStruct((65536, 128), jnp.float32, sharding=sh)
w = jax.ShapeDtypeStruct((128, 65536), jnp.float32, sharding=sh)
# sorting the 16 GiB product needs it (and the sort's copy) in HBM at once
lowered = jax.jit(lambda x, w: jnp.sort(x @ w, axis=0)[:8]).trace(x, w).lower()
try:
    lowered.compile()
    print("COMPILED")
except jax.errors.JaxRuntimeError as e:
    print("PARSED", tpu_aot.parse_hbm_oom(str(e)))
"""


def test_out_of_memory_compile_is_a_measurement(tmp_path):
    """XLA:TPU refuses a program that needs more than a core's HBM; tpu_aot records the refusal
    (the temporaries XLA asked for, the HBM it had) as a "does not fit" row. Checked against
    libtpu's own message for a v5e chip (16 GiB): a 16 GiB intermediate that must be sorted."""
    out = _tpu_python(["-c", OOM_SCRIPT], timeout=600)
    line = next(x for x in out.splitlines() if x.startswith(("PARSED", "COMPILED")))
    assert line.startswith("PARSED {"), line
    rec = eval(line[len("PARSED "):])  # a dict literal printed by the subprocess
    assert rec["oom"] is True
    # XLA prints GiB with two decimals: 15.75G of a v5e's 16 GiB are available to programs
    assert abs(rec["available_bytes"] / 2 ** 30 - 15.75) < 0.006
    # "required for HLO temporaries" counts the arguments too: the sort holds the 16 GiB
    # product and its 16 GiB sorted copy, and the arguments are 2 x 32 MiB = 0.0625 GiB
    assert abs(rec["required_bytes"] / 2 ** 30 - (32 + 0.0625)) < 0.006
    sys.path.insert(0, REPO)
    from benchmarks import tpu_aot

    assert tpu_aot.parse_hbm_oom("INTERNAL: something else") is None
    rec["temp_bytes"] = rec["required_bytes"] - 2 ** 30
    row = tpu_aot.results_section([dict(
        rec, size="sd14", chip="v2-8", program="train", variant="bf16_remat", params="fsdp",
        per_core=2, batch=16, argument_bytes=2 ** 30, peak_bytes=rec["required_bytes"],
        budget_bytes=int(7.5 * 2 ** 30), compile_s=321.0, jax="0.10.2", libtpu="0.0.42.1")],
        [], "sd14")
    assert "| v2-8 | train | bf16_remat | fsdp | 2 | 16 | 1.00 | ≥ " in row
    assert "| **no** (XLA: out of HBM) |" in row
    # --report rewrites the RESULTS block from the JSONL alone, compiling nothing
    jsonl, md = tmp_path / "tpu.jsonl", tmp_path / "RESULTS.md"
    jsonl.write_text(json.dumps(dict(
        rec, kind="tpu_aot", size="sd14", chip="v2-8", program="train", variant="bf16_remat",
        params="fsdp", per_core=2, batch=16, argument_bytes=2 ** 30,
        peak_bytes=rec["required_bytes"], budget_bytes=int(7.5 * 2 ** 30),
        compile_s=321.0, jax="0.10.2", libtpu="0.0.42.1")) + "\n")
    md.write_text("# R\n\n<!-- tpu-aot:begin -->\nold\n<!-- tpu-aot:end -->\n")
    tpu_aot.main(["--report", "--jsonl", str(jsonl), "--results", str(md)])
    text = md.read_text()
    assert "old" not in text and text.count("| v2-8 | train | bf16_remat | fsdp | 2 | 16 |") == 1
    assert "v2-8/train/bf16_remat/fsdp/2`:" not in text  # done, so not in the to-do list
    assert "- `v5e-1/sample/bf16/replicated/1`:" in text


def test_out_of_memory_report_is_parsed():
    """libtpu's detailed out-of-HBM report (E1000, as it came for the sd14 train step on one
    v5e chip at batch 4; tests/fixtures/tpu_oom_e1000.txt) -> the sizes it names."""
    sys.path.insert(0, REPO)
    from benchmarks import tpu_aot

    with open(os.path.join(REPO, "tests", "fixtures", "tpu_oom_e1000.txt"), encoding="utf-8") as f:
        rec = tpu_aot.parse_hbm_oom(f.read())
    gib, mib = 2 ** 30, 2 ** 20
    assert rec["oom"] is True and rec["oom_message"].startswith("RESOURCE_EXHAUSTED: E1000")
    expected = {"used_bytes": 16.07 * gib, "available_bytes": 15.75 * gib,
                "total_bytes": 16.32 * gib, "program_bytes": 7.44 * gib,
                "argument_bytes": 8.62 * gib, "temp_bytes": 6.98 * gib}
    for key, value in expected.items():
        assert rec[key] == int(value), key
    assert rec["largest"][0] == {"bytes": int(520 * mib), "op": (
        "jit(fn)/transpose(jvp(AutoencoderKL.decode))/decoder/jvp(AutoencoderKL.decode)/decoder/"
        "checkpoint/rematted_computation/up_blocks_3/resnets_0/norm2/norm2/square")}
    assert tpu_aot._short_op(rec["largest"][0]["op"]) == "up_blocks_3/resnets_0/norm2/norm2/square"
    row = dict(rec, size="sd14", chip="v5e-1", program="train", variant="bf16_remat",
               params="replicated", per_core=4, batch=4, peak_bytes=rec["total_bytes"],
               budget_bytes=15 * gib, compile_s=3600.0, jax="0.10.2", libtpu="0.0.42.1")
    text = tpu_aot.results_section([row], [], "sd14")
    assert "| v5e-1 | train | bf16_remat | replicated | 4 | 4 | 8.62 | ≥ 6.98 | ≥ 16.32 |" in text
    assert ("- v5e-1/train/bf16_remat/replicated/4: arguments 8.62 + program 7.44 GiB (HLO "
            "temporaries 6.98) against 15.75 GiB; largest: 520 MiB "
            "`up_blocks_3/resnets_0/norm2/norm2/square`") in text


def test_roofline_time_per_core():
    sys.path.insert(0, REPO)
    from benchmarks import tpu_aot

    # bandwidth-bound on a v5e chip (197 TFLOP/s, 819 GB/s): 50.6 GB / 819 GB/s
    rec = {"chip": "v5e-1", "flops": 7.34e12, "bytes_accessed": 50.6e9}
    assert tpu_aot.roofline_seconds(rec) == pytest.approx(50.6e9 / 819e9)
    # compute-bound on a v2 core (half a 46 TFLOP/s chip)
    rec = {"chip": "v2-8", "flops": 25.9e12, "bytes_accessed": 1e9}
    assert tpu_aot.roofline_seconds(rec) == pytest.approx(25.9 / 23.0)
    # an out-of-memory compile has no costs
    assert tpu_aot.roofline_seconds({"chip": "v2-8", "flops": -1.0, "bytes_accessed": -1.0}) \
        is None


def test_job_names_are_checked():
    sys.path.insert(0, REPO)
    from benchmarks import tpu_aot

    assert tpu_aot.Job.parse("v2-8/train/lean/fsdp/2").per_core == 2
    with pytest.raises(ValueError, match="unknown chip 'v9-8'"):
        tpu_aot.Job.parse("v9-8/train/lean/fsdp/2")
    with pytest.raises(ValueError, match="unknown train variant 'bf8'"):
        tpu_aot.Job.parse("v2-8/train/bf8/fsdp/2")
    with pytest.raises(ValueError, match="the sampler replicates its parameters"):
        tpu_aot.Job.parse("v2-8/sample/bf16/fsdp/1")
    with pytest.raises(ValueError, match="expected CHIP/PROGRAM/VARIANT/PARAMS/PER_CORE"):
        tpu_aot.Job.parse("v2-8/train/lean")
    for key in tpu_aot.TARGET_JOBS + tpu_aot.MORE_JOBS:
        tpu_aot.Job.parse(key)


def test_frozen_weights_stored_in_bf16():
    from goal_jax import train

    cfg = train.default_train_config()
    assert cfg.frozen_dtype == "float32"
    params = {
        "unet": {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {
            "attn1": {"to_q": {"kernel": jnp.ones((4, 4))}},
            "ff": {"net_2": {"kernel": jnp.full((4, 4), 1 / 3)}}}}}},
        "vae": {"conv_in": {"kernel": jnp.full((3,), 0.1)}},
        "text_encoder": {"ids": jnp.arange(3)},
        "clip": {"logit_scale": jnp.float32(2.6592)},
    }
    opt, _ = train.make_optimizer(cfg)
    cfg.frozen_dtype = "bfloat16"
    state, frozen = train.create_train_state(params, cfg, opt, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves(frozen)
    assert {str(x.dtype) for x in leaves} == {"bfloat16", "int32"}
    ff = frozen["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]
    np.testing.assert_array_equal(ff["net_2"]["kernel"],
                                  jnp.full((4, 4), 1 / 3).astype(jnp.bfloat16))
    # trainable weights and AdamW state stay float32
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)} == {"float32"}
    # abstract trees (jax.eval_shape) are cast too: what benchmarks/tpu_aot.py compiles
    abstract = jax.eval_shape(lambda p: train.create_train_state(p, cfg, opt)[1], params)
    assert abstract["vae"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="config.frozen_dtype must be one of"):
        train.cast_frozen(params, "float8")
