# stockward: `make run` serves the demo (server with a demo catalogue, ERP simulator
# and bridge), `make test` runs every check. Both create the virtualenv and bring up
# Postgres and Redis when they need to.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=

export STOCKWARD_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: run test lint types unit integration reliability bench bench-quick proto services clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "stockward needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

services: $(STAMP)
	$(PY) -m server.devenv postgres
	$(PY) -m server.devenv redis

# The whole demo in the foreground: Redis (a private one if none answers), the ERP
# simulator, the server with the demo catalogue and the ERP bridge; Ctrl-C stops them.
# Ports and schema: see `$(PY) -m server.stack --help`, e.g. STACK_FLAGS=--help.
STACK_FLAGS ?=

run: services
	$(PY) -m server.stack $(STACK_FLAGS)

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(PY) proto/generate.py --check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

types: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS) tests/engine

integration: services
	$(PY) -m pytest $(PYTEST_FLAGS) tests --ignore=tests/engine -m "not reliability"

reliability: services
	$(PY) -m pytest $(PYTEST_FLAGS) tests -m reliability

test: lint types unit integration reliability

# Benchmarks: every scenario and baseline side by side; report in benchmarks/results/.
# gRPC's fork notices are silenced: the runner forks its services on purpose.
bench: services
	GRPC_VERBOSITY=ERROR $(PY) -m benchmarks

bench-quick: services
	GRPC_VERBOSITY=ERROR $(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
