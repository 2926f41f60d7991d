# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-hub chaos services-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m orchestrator.demo

services-check: $(STAMP)
	@$(BIN)/python -m tests.services

test: services-check
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# End to end on real PostgreSQL, Redis, Celery and loopback targets; `make bench SCENARIO=drain` runs one.
# Sizes: BENCH_DRAIN_N, BENCH_LATENCY_RATE, BENCH_LATENCY_SECONDS, BENCH_RESYNC_SIZES, BENCH_NAIVE_N, ...
# (see benchmarks/__main__.py); results in build/bench/results.json.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks $(if $(SCENARIO),--scenario $(SCENARIO))

bench-hub: $(STAMP)
	$(BIN)/python -m benchmarks.hub

# Faults while 20,000 changes flow (own PostgreSQL and Redis, four targets, workers SIGKILLed); then every
# target is compared with the hub. `make chaos CHAOS_CHANGES=2000` for a shorter one; report in build/chaos.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos $(if $(CHAOS_CHANGES),--changes $(CHAOS_CHANGES)) --report build/chaos/report.json

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache idhub.db
