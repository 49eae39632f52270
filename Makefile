# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A second venv with libtpu (the version jax[tpu]==$(JAX_TPU_VERSION) pins) for compiling
# programs for TPU topologies without a TPU (benchmarks/tpu_aot.py, tests/test_tpu_aot.py).
# It is separate so that JAX in $(VENV) keeps choosing the CPU backend.
JAX_TPU_VERSION ?= 0.10.2
TPU_VENV ?= .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: test install clean demo tpu-venv tpu-aot

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) $(TPU_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests


$(TPU_PY):
	$(PYTHON) -m venv $(TPU_VENV)

$(TPU_STAMP): pyproject.toml | $(TPU_PY)
	$(TPU_PY) -m pip install --upgrade pip
	$(TPU_PY) -m pip install 'jax[tpu]==$(JAX_TPU_VERSION)' -e .
	touch $(TPU_STAMP)

tpu-venv: $(TPU_STAMP)

# The full TPU compile table (hours of CPU; resumable, see benchmarks/RESULTS.md).
tpu-aot: $(TPU_STAMP)
	$(TPU_PY) -m benchmarks.tpu_aot --jsonl benchmarks/tpu_aot.jsonl --results benchmarks/RESULTS.md

# The demo: tiny random models + the synthetic shapes dataset, trained on the CPU in a few
# minutes (checkpoints, TensorBoard and metrics.jsonl in runs/demo), then a few layouts sampled
# from the last checkpoint into runs/demo/samples. Rerunning resumes / skips what is done.
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(PY) scripts/train.py --config configs/goal.py:demo --workdir $(DEMO_DIR)
	$(PY) scripts/sample.py --pretrained $(DEMO_DIR)/demo_models/pipeline \
	  --checkpoint $(DEMO_DIR)/checkpoints --jsonl $(DEMO_DIR)/sample_layouts.jsonl \
	  --steps 10 --cfg 3.0 --output_dir $(DEMO_DIR)/samples

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache
