# Two entry points for a fresh machine (Python 3.11): `make main` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= qwen2.5-coder-1.5b
STAMP := $(VENV)/.kvnotes-installed

.PHONY: main test env weights figures

# The environment: the CPU torch first (a plain `torch` would pull a CUDA build), then the pinned project.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

weights: $(STAMP)
	$(PY) -m kvnotes.models install $(MODEL)

# The main job: the locality probe on the default model -> results/locality/<model>/diverse.json + figures/.
main: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m kvnotes.models install $(MODEL) && \
	$(PY) run.py model=$(MODEL) && \
	echo "[make main] total wall time including set-up: $$(( $$(date +%s) - start )) s"

test: $(STAMP)
	$(PY) -m kvnotes.models install smollm2-135m
	$(PY) -m pytest -q -rs

figures: $(STAMP)
	$(PY) figures/make_figures.py
	$(PY) -m figures.fig3
