#!/usr/bin/env bash
# GPU benchmark: goal_jax vs the PyTorch reference at the SD-1.4 size on one H100 / H200,
# random weights (no download), bf16 compute. Budget: under 8 minutes in all.
#
#   bash benchmarks/gpu.sh                 # -> benchmarks/gpu_results/{jax,torch}.jsonl, table.md
#   OUT=/some/dir SIZE=small bash benchmarks/gpu.sh   # other output folder / size (tiny|small|sd14)
#
# What runs (see benchmarks/gpu_bench.py):
#   1. goal_jax (own process, time limit JAX_LIMIT s): sampling 512x512, 50 DDIM steps, CFG 7.5,
#      batch 1 and 8; GOAL train step (all losses, remat) batch 1 and 8; MFU from XLA's FLOPs.
#   2. PyTorch (own process, TORCH_LIMIT s): diffusers' StableDiffusionGLIGENPipeline (bf16, SDPA)
#      with the same settings; tests/reference/goal_reference.train_step under bf16 autocast with
#      gradient checkpointing of U-Net and VAE.
#   3. The table (python -m benchmarks.gpu_bench --report).
# Each measurement is appended to its .jsonl when done, so a time limit keeps what finished.
#
# The GPU image is expected to have jax[cuda], flax, optax, torch and transformers. Missing
# diffusers / ml_collections (and their small dependencies) are installed OFFLINE from
# benchmarks/wheels/ (git-ignored; fill it with benchmarks/fetch_wheels.sh on a machine with
# internet and carry it along). Without diffusers the PyTorch half is skipped (reported).
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-sd14}
OUT=${OUT:-benchmarks/gpu_results}
JAX_LIMIT=${JAX_LIMIT:-320}
TORCH_LIMIT=${TORCH_LIMIT:-120}
STEPS=${STEPS:-"--steps 5 --warmup 1 --sample-repeats 3"}  # timed train steps / sampling runs
EXTRA=${EXTRA:---clip-remat}  # PyTorch side: CLIP gradient checkpointing, as goal_jax's remat
PY=${PYTHON:-python}
WHEELS=benchmarks/wheels
mkdir -p "$OUT"
rm -f "$OUT"/jax.jsonl "$OUT"/torch.jsonl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
unset XLA_FLAGS

need() {  # need <module> <pip name>: install offline from $WHEELS when the import fails
  if ! $PY -c "import $1" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
      echo "[gpu.sh] installing $2 from $WHEELS (offline)"
      $PY -m pip install -q --no-index --find-links "$WHEELS" "$2" \
        || $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$2" || true
    fi
  fi
  $PY -c "import $1" 2>/dev/null
}

echo "[gpu.sh] $(date -u +%FT%TZ) size=$SIZE out=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY - <<'PY'
import jax, sys
print("[gpu.sh] python", sys.version.split()[0], "jax", jax.__version__, "devices", jax.devices())
PY
need ml_collections ml_collections || { echo "[gpu.sh] ml_collections missing: goal_jax.train needs it"; exit 1; }

start=$(date +%s)
timeout "$JAX_LIMIT" $PY -m benchmarks.gpu_bench --side jax --size "$SIZE" --out "$OUT" $STEPS $EXTRA
echo "[gpu.sh] goal_jax side: exit $? after $(( $(date +%s) - start )) s"

if need diffusers diffusers; then
  start=$(date +%s)
  timeout "$TORCH_LIMIT" $PY -m benchmarks.gpu_bench --side torch --size "$SIZE" --out "$OUT" $STEPS $EXTRA
  echo "[gpu.sh] PyTorch side: exit $? after $(( $(date +%s) - start )) s"
else
  echo "[gpu.sh] diffusers is not importable and $WHEELS has no wheel for it: PyTorch side skipped"
fi

$PY -m benchmarks.gpu_bench --report "$OUT" | tee "$OUT/table.md"
