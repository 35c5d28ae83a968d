# Two entry points for a fresh machine (Python 3.11): `make main` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= qwen2.5-coder-1.5b
STAMP := $(VENV)/.kvnotes-installed

.PHONY: main test env weights figures reanalyse

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

# Re-analyse every record whose probe keeps its raw logits (probes whose CONTRACT says reanalysable): current code
# and statistics, no model run (tokenizers only), then the figures. Each record gets a `reanalysed` entry; a record
# that cannot be re-analysed (its prompts changed, no tokenizer cache) is listed at the end and left as it was.
REANALYSABLE = $(shell $(PY) -c 'from pathlib import Path; from probes.base import load_probe; \
	print(*[p.stem for p in sorted(Path("configs/probe").glob("*.yaml")) if load_probe(p.stem).spec.reanalysable])')
reanalyse: $(STAMP)
	@failed=; for p in $(REANALYSABLE); do for f in results/$$p/*/*.json; do \
	  [ -e "$$f" ] || continue; m=$$(basename $$(dirname $$f)); s=$$(basename $$f .json); t=$${s#*-}; s=$${s%%-*}; \
	  if [ "$$t" = "$$s" ]; then t=; fi; echo "[make reanalyse] $$f"; \
	  $(PY) run.py probe=$$p model=$$m scenario=$$s $${t:+tag=$$t} reanalyse=true make_figures=false \
	    || failed="$$failed $$f"; \
	done; done; \
	$(MAKE) --no-print-directory figures; \
	if [ -n "$$failed" ]; then echo "[make reanalyse] not re-analysed (see the errors above):$$failed"; exit 1; fi
