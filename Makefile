# Two commands for a new user: `make demo` and `make test`. Both install into ./.venv first if needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the declared dependencies change (install is idempotent and cheap when nothing did).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast test-faults lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/transfer-flow demo --output demo-output

# The whole suite, after the house checks (lint, line length, the import-layer contract), on two processes: a test
# file runs whole on one of them, so its module fixtures (a served schedule, a trained run) are built once.
PYTEST_PARALLEL := -n 2 --dist loadfile

# The slowest tests are listed at the end: where the next minutes of the suite are.
test: lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --durations=15

# What needs no server of its own, no cluster and no Keras training: a quick loop while editing.
test-fast: lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

# Every kill -9 point of the fault-injection suite on both stores (`make test` runs three).
test-faults: install
	TRANSFER_FLOW_ALL_FAULTS=1 $(BIN)/python -m pytest tests/flows/test_fault_injection.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Speed and memory figures (recorded in BENCHMARKS.md with these commands); not part of `make test`.
bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/caching.py
	$(BIN)/python bench/feature_store.py
	$(BIN)/python bench/sgd_out_of_core.py

clean:
	rm -rf demo-output .pytest_cache
