# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install what they need first; CPU torch is installed before anything else so that
# no dependency can pull a CUDA build (and torchvision is never installed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-cpu

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gotr1 train --preset shapes

test: $(STAMP)
	$(PY) -m pytest

bench-cpu: $(STAMP)
	$(PY) -m bench rollout --preset tiny --device cpu --repeats 5 --json bench/results/rollout-tiny-cpu.json
	for b in kernels reward sampling; do $(PY) -m bench $$b --device cpu --json bench/results/$$b-cpu.json || exit 1; done
