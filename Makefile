# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install clean demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests

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
