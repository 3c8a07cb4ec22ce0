# Two commands for a fresh machine: `make serve` and `make test` (CI runs the second).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps: pip runs only when pyproject.toml changed since the last install (or the venv is
# new). The code is installed editable, so editing it needs no reinstall.
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

.PHONY: install install-dev serve test lint typecheck pytest bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

# The dev install includes the runtime one, so it stamps both.
$(INSTALLED_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(INSTALLED)

install: $(INSTALLED)

install-dev: $(INSTALLED_DEV)

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
