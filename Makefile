# `make test` is the one command CI runs (.ci/run): it builds .venv if missing, installs
# everything (CPU torch 2.13.0 first, so pip never pulls a CUDA build), then runs ruff and pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test quickstart clean

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

quickstart: install
	$(BIN)/promoe-ds quickstart

clean:
	rm -rf $(VENV) runs
