#!/usr/bin/env bash
# Downloads (from PyPI, on a machine with internet) the wheels that benchmarks/gpu.sh installs
# offline on a GPU image that lacks them: diffusers (the PyTorch side: GLIGEN pipeline and
# models), ml_collections (imported by goal_jax.train) and the small pure-Python dependencies
# that such an image may lack; Pillow (a diffusers dependency) for CPython 3.10-3.13.
# The folder benchmarks/wheels/ is git-ignored (about 35 MB): carry it to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
DIFFUSERS=${DIFFUSERS:-$($PY -c 'import importlib.metadata as m; print(m.version("diffusers"))' 2>/dev/null || echo 0.42.1)}
mkdir -p wheels
$PY -m pip download --no-deps --only-binary=:all: -d wheels \
  "diffusers==${DIFFUSERS}" ml_collections absl-py importlib_metadata zipp
for v in 310 311 312 313; do
  $PY -m pip download --no-deps --only-binary=:all: -d wheels --python-version "$v" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 Pillow
done
ls -la wheels
