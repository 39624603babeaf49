# The README's commands. Each one sets itself up: it creates .venv and installs the
# pinned project when .venv is missing or older than pyproject.toml / requirements.lock.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.asmwatch-installed
export ASMWATCH_DATA ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(ASMWATCH_DATA)/dagster_home

.PHONY: demo test test-all ui bench lint setup clean browser ogrinfo

# `make test` leaves out the tests marked slow (end-to-end runs: the demo, the Dagster UI,
# dask clusters of processes, tile invariance, killed runs); CI (CI=true) and `make
# test-all` run every test.
SLOW := $(if $(filter true 1,$(CI)),,-m "not slow")

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asmwatch demo

# Debian's Chromium for the web-map test (tests/pipelines/stages/test_reports.py drives it with Playwright,
# which never downloads a browser of its own). Installed when missing and we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the web-map test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing (sudo apt-get install chromium); the web-map test will skip"; fi; }

# Debian's ogrinfo (gdal-bin: GDAL 3.6, no Parquet driver, as QGIS on Debian uses) for
# the export test (tests/pipelines/stages/test_export.py), installed when missing and we are root.
ogrinfo:
	@command -v ogrinfo >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's gdal-bin for the export test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gdal-bin >/dev/null; \
	  else echo "ogrinfo is missing (sudo apt-get install gdal-bin); the export test will skip"; fi; }

test: $(STAMP) browser ogrinfo
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(SLOW)

test-all: $(STAMP) browser ogrinfo
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

ui: $(STAMP)
	$(BIN)/asmwatch ui

bench: $(STAMP)
	@for f in bench/bench_normalize.py bench/composite.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	@echo "(full-tile memory bound, about 10 min: $(BIN)/python bench/composite_memory.py)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
