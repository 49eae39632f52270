# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
#   make test       creates .venv, installs goal_jax[test] (and Debian's chromium when no
#                   Chromium is on the PATH), runs the whole pytest suite
#   make test-fast  the unit tests only (-m "not slow"; a couple of minutes on 2 cores)
#   make lint       ruff over the whole tree (rules in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint chromium install clean demo

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

test: $(STAMP) chromium
	$(PY) -m pytest -q -n auto --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

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
	rm -rf $(VENV) .pytest_cache
