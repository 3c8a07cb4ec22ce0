# Two commands for a fresh machine: `make serve` and `make test` (CI runs the second).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-dev serve test lint typecheck pytest bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

# Starts Redis (embedded Valkey), the simulated provider, 2 workers and the API on :8000.
serve: install
	$(BIN)/freeference serve --demo

lint: install-dev
	$(BIN)/ruff check .

typecheck: install-dev
	$(BIN)/mypy .

pytest: install-dev
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: install-dev
	$(BIN)/python -m bench.gateway_overhead
