# peftbench: `make train` and `make test` install what is missing on first use, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair pinned for this kind of machine (they lie on local disk); override on yours, e.g.
#   make test TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?= -n 2

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow lint format pretrain clean bench tables gpu-check

help: ## list every target
	@grep -hE '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo ">> installing peftbench into $(VENV) (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the package editable with its extras (skipped when done)

train: $(STAMP) ## run the default job (LoRA on vit_micro / embedded digits, offline); pass ARGS="key=value ..."
	$(PY) -m peftbench.train $(ARGS)

test: $(STAMP) ## run the default test suite (no network, no GPU)
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

test-slow: $(STAMP) ## run the slow tests as well
	$(PY) -m pytest $(PYTEST_ARGS) -m "" $(ARGS)

scale ?= smoke
bench ?= cpu
# tables at scale=paper run `jobs` runs at once per GPU (conf/hydra/launcher/gpu_shared.yaml); scale=smoke one at a
# time. Override with launcher=<name> (launcher= for none) and jobs=<n>.
launcher ?= $(if $(filter paper,$(scale)),gpu_shared,)
jobs ?= 4
JOBLIB_LAUNCHERS := gpu_shared local_parallel joblib

bench: $(STAMP) ## measure every method's cost side by side (bench=cpu|gpu); JSON + Markdown under outputs/bench
	$(PY) -m peftbench.bench bench=$(bench) $(ARGS)

table-%: $(STAMP) ## regenerate a paper table, e.g. make table-spt-1 scale=smoke|mini|paper (skips finished runs)
	$(PY) -m peftbench.tables $* scale=$(scale) $(if $(launcher),launcher=$(launcher)) $(if $(filter $(JOBLIB_LAUNCHERS),$(launcher)),hydra.launcher.n_jobs=$(jobs)) $(ARGS)

gpu-check: ## the prepared GPU check (<= 8 min on one H200; GPU_CHECK_SMOKE=1: vit_micro on the CPU in ~1 min)
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash scripts/gpu_check.sh

tables: $(STAMP) ## list the table specs
	$(PY) -m peftbench.tables --list

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check peftbench tests scripts

format: $(STAMP) ## ruff format + autofix
	$(PY) -m ruff check --fix peftbench tests scripts
	$(PY) -m ruff format peftbench tests scripts

pretrain: $(STAMP) ## re-run the embedded backbone's pre-training (writes peftbench/assets/vit_micro.*)
	$(PY) -m peftbench.pretrain $(ARGS)

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
