# Two commands on a fresh machine:
#   make quickstart   set up .venv, prepare the bundled corpus, run the quick ablation -> results/quick/
#   make test         set up .venv (with dev extras) and run the tests (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build (a bare `torch` would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: setup setup-dev setup-postgres quickstart train test test-fast test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .

setup-dev: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"

quickstart: setup
	$(BIN)/pcl prepare --config conf/baseline.yaml
	$(BIN)/pcl ablate conf/ablation/quick.yaml

train: setup
	$(BIN)/pcl train --config conf/baseline.yaml

# The tests marked `servers` start a real PostgreSQL server: Debian's package, installed here when its binaries
# are missing (needs root; elsewhere install it yourself or set PCL_PG_BIN to a directory holding initdb/pg_ctl).
setup-postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || [ -x "$$PCL_PG_BIN/pg_ctl" ] || { \
	  echo "installing PostgreSQL (apt-get install postgresql) for the server tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Fast suite first, then the tests marked slow (CI runs both; pytest's exit code 5 = nothing collected is ok).
# Each pass runs on every core (pytest-xdist: one worker per core, each with cores // workers torch threads; the
# server tests on one worker, so their servers start once). PYTEST_ARGS adds pytest options (e.g. -n 0: serial).
PYTEST := $(BIN)/python -m pytest -q --durations=15 -n auto --dist loadgroup $(PYTEST_ARGS)
OK5 := rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

test: setup-dev setup-postgres
	$(PYTEST) -m "not slow"; $(OK5)
	$(PYTEST) -m slow; $(OK5)

test-fast: setup-dev
	$(PYTEST) -m "not slow"; $(OK5)

test-slow: setup-dev setup-postgres
	$(PYTEST) -m slow; $(OK5)

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/layers.py

clean:
	rm -rf $(VENV) .cache results/mlflow.db results/optuna.db results/checkpoints results/mlartifacts
