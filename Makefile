# fot — two commands work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
WORKDIR ?= runs/quickstart

.PHONY: run test install install-test bench clean-run

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Core install (jax CPU, flax, optax, orbax, gin, clu). Stamp files make re-runs instant.
$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

# Test extras: pytest, chex, torch==2.13.0 (CPU wheel), transformers, safetensors, faiss-cpu, seqio + tensorflow.
$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Train the embedded default (dictionary lookup through the memory layer) on CPU and print results.
run: $(VENV)/.installed
	rm -rf $(WORKDIR) && mkdir -p $(dir $(WORKDIR))
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m fot.train --gin_file=gin/quickstart.gin --workdir=$(WORKDIR)

# The whole suite (slow tests included); CI calls this.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.crossbatch
	$(PY) -m benchmarks.topk
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.memory_inference
