# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
#   make test       creates .venv, installs goal_jax[test] (and Debian's chromium when no
#                   Chromium is on the PATH), runs the whole pytest suite (prints the 25 slowest)
#   make test-fast  the unit tests only (-m "not slow"; 98 CPU-seconds measured on 2 cores,
#                   see tests/conftest.py)
#   make lint       ruff over the whole tree (rules in pyproject.toml)
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

.PHONY: test test-fast lint chromium install clean demo demo-goal world tpu-venv tpu-aot

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The data_prep review page is tested in headless Chromium (tests/test_data_prep_review.py):
# install Debian's package when no Chromium is on the PATH (as root, else through sudo).
CHROMIUM_NAMES := chromium chromium-browser google-chrome
chromium:
	@for name in $(CHROMIUM_NAMES); do \
	  if command -v $$name >/dev/null 2>&1; then echo "chromium: $$(command -v $$name)"; exit 0; fi; \
	done; \
	echo "chromium: installing Debian's chromium package"; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium && \
	command -v chromium

test: $(STAMP) $(TPU_STAMP) chromium
	$(PY) -m pytest -q -n auto --dist loadfile --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

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

# The demo: GOAL fine-tuning of the shipped shapes world (assets/shapes_world) for a few
# minutes on the CPU, then the same fixed layouts sampled with the base world and the fine-tuned
# U-Net: runs/demo/demo.png (side by side, boxes drawn) and the oracle's scores of both.
# Rerunning resumes / skips what is done.
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(PY) scripts/demo.py --workdir $(DEMO_DIR)

# Base world vs the shipped GOAL fine-tune (assets/shapes_world/goal, written by
# experiments.shapes_world.export): no training, sampling and scoring only.
demo-goal: $(STAMP)
	$(PY) scripts/demo.py --workdir $(DEMO_DIR)-goal --goal assets/shapes_world/goal

# The shapes world itself, trained from scratch (80 minutes measured on 2 idle CPU cores;
# resumable: rerun to continue). Writes assets/shapes_world/{pipeline,clip,world.json,world_samples.png}.
WORLD_DIR ?= runs/world
world: $(STAMP)
	$(PY) scripts/world.py --config configs/world.py --workdir $(WORLD_DIR) --out assets/shapes_world

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache
