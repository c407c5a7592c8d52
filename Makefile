# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the CPU build of torch and the package, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/lavender: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/lavender

demo: install
	$(BIN)/lavender demo --output runs/demo

test: install
	$(BIN)/python -m pytest tests

.PHONY: install demo test
