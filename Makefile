# Two commands set everything up on a fresh machine:
#   make demo   - install into .venv, then run the main job on embedded defaults
#   make test   - install into .venv (with dev tools), then lint, type-check and run the tests
PYTHON ?= python3
VENV   ?= .venv
# CPU-only machines: install this torch first so nothing pulls a multi-GB CUDA build.
# On a GPU machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The demo keeps its storage, MLflow store and outputs under ./runs of this checkout: it sets
# MSGAN_HOME here explicitly (jobs elsewhere default to ~/.msgan, never the working directory).
demo: $(VENV)/.installed
	MSGAN_HOME=$(CURDIR) $(BIN)/python jobs/train_all_scales.py --config configs/demo.yaml

lint: $(VENV)/.installed
	$(BIN)/ruff check msgan tests benchmarks jobs
	$(BIN)/ruff format --check msgan tests benchmarks jobs
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
