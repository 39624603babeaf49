# The README's commands. Each one sets itself up: it creates .venv and installs the
# pinned project when .venv is missing or older than pyproject.toml / requirements.lock.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.asmwatch-installed
export ASMWATCH_DATA ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(ASMWATCH_DATA)/dagster_home

.PHONY: demo test ui bench lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asmwatch demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

ui: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(STAMP)
	@for f in bench/bench_normalize.py bench/composite.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	@echo "(full-tile memory bound, about 10 min: $(BIN)/python bench/composite_memory.py)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
